"""The traffic model's roofline floor (dit_kernels.bench.traffic.Floor) on hand-built op sequences, and the
floor and patched traffic of every registered family's blocks against eager's."""

import pytest
import torch

from dit_kernels.bench import traffic
from dit_kernels.models import FAMILY_MODULES

MB = 1 << 20


def _t(*shape):
    return torch.empty(*shape, device="meta", dtype=torch.bfloat16)


def test_floor_fuses_a_group_and_rematerialises_across_a_gemm():
    """x -> norm -> mul(scale) -> GEMM -> add(x): the norm and the modulate are one group (x read once,
    the GEMM input written once), the residual add after the GEMM is another (x read again)."""
    x, scale, weight = _t(MB // 2), _t(MB // 2), _t(1)  # 1 MiB each in bf16
    floor = traffic.Floor()
    normed, modulated, projected, out = _t(MB // 2), _t(MB // 2), _t(MB // 2), _t(MB // 2)
    floor.see("other", (x, weight), normed)
    floor.see("other", (normed, scale), modulated)
    floor.see("gemm", (modulated,), projected)
    floor.see("other", (x, projected), out)
    floor.finish(out)
    reads = MB + 2 + MB + MB + MB  # x, weight, scale (group 0); x again and the GEMM output (group 1)
    writes = MB + MB  # the GEMM input, the block output
    assert floor.bytes == reads + writes


def test_floor_schedules_independent_ops_late():
    """An op that only reads the block input (a LayerNorm) joins the group of the op that consumes its
    output after a GEMM (the modulate needing the modulation GEMM): its output is never written."""
    x, temb, weight = _t(8), _t(8), _t(8)
    emb, normed, modulated = _t(8), _t(8), _t(8)
    floor = traffic.Floor()
    floor.see("other", (x,), normed)
    floor.see("gemm", (temb, weight), emb)
    floor.see("other", (normed, emb), modulated)
    floor.finish(modulated)
    assert floor.bytes == (8 + 8 + 8) * 2  # read x and emb, write modulated


@pytest.mark.parametrize("family", FAMILY_MODULES)
def test_floor_and_patched_move_less_than_eager(family):
    """The floor is below eager's traffic, and so is the patched block. (Patched may go below the floor: the
    floor keeps the GEMMs as they are, and a patcher may make a GEMM write where the next op reads, as the
    SD3 patcher's projections into the joint attention buffers do.)"""
    eager, patched = traffic.family_counts(family)
    for kind in eager:
        assert 0 < eager[kind].floor.bytes < eager[kind].bytes["other"], kind
        assert patched[kind].bytes["other"] < eager[kind].bytes["other"], kind


def test_table_has_a_floor_row_per_block_kind():
    rows = traffic.table(("flux",)).splitlines()
    assert sum("| floor |" in row for row in rows) == 2 and all("1.00x" in r for r in rows if "| floor |" in r)
