"""The traffic model's roofline floor (dit_kernels.bench.traffic.Floor) on hand-built op sequences, the GEMM
side launches it counts, and every registered family's patched blocks against their own floor and eager's."""

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


def test_bias_copies_of_gemms_without_a_cublaslt_epilogue_are_counted():
    """ATen copies a GEMM's bias into its output first where cuBLASLt cannot add it in the epilogue: always in
    baddbmm, in addmm when the output is not a contiguous 2-D tensor; a 1-D bias into a contiguous output
    and an in-place accumulation copy nothing."""
    bias, rows, weight = _t(16), _t(8, 4), _t(4, 16)
    out = _t(8, 16)
    assert traffic.gemm_side_launches("addmm", (bias, rows, weight), {}, out) == ([], [])
    assert traffic.gemm_side_launches("addmm", (out, rows, weight), {}, out) == ([], [])  # addmm_
    strided = _t(8, 32)[:, :16]
    (copy,), after = traffic.gemm_side_launches("addmm", (bias, rows, weight), {"out": strided}, strided)
    assert copy[1:] == ([bias], [strided]) and after == []
    batched = _t(2, 8, 16)
    assert len(traffic.gemm_side_launches("baddbmm", (bias, _t(2, 8, 4), _t(2, 4, 16)), {}, batched)[0]) == 1
    assert traffic.gemm_side_launches("baddbmm", (bias, _t(2, 8, 4), _t(2, 4, 16)), {"beta": 0}, batched) == ([], [])
    assert len(traffic.gemm_side_launches("_addmm_activation", (bias, rows, weight), {"use_gelu": True},
                                          strided)[1]) == 1  # fmt: skip


# HunyuanDiT's long-skip blocks normalise cat([h, skip]): the floor reads both into the LayerNorm, the patched
# block writes the concatenation first (a two-input norm kernel would close it): 1.17x.
KNOWN_OVER_FLOOR = {("hunyuan", "HunyuanDiTBlock (long skip)")}


@pytest.mark.parametrize("batch", traffic.BATCHES)
@pytest.mark.parametrize("family, variant", traffic.variants(), ids=lambda v: v or "real")
def test_patched_blocks_within_10_percent_of_their_floor(family, variant, batch):
    """Every block kind of every family, at batch 1 and 2: the floor (of the patched graph) is a floor
    (patched moves at least that much) and below eager's traffic, and the patched block is within 1.10x
    of it, i.e. its launches leave at most 10 % of its non-GEMM traffic to a better fusion."""
    eager, patched = traffic.family_counts(family, batch=batch, variant=variant)
    assert eager.keys() == patched.keys()
    for kind in eager:
        moved, floor = patched[kind].bytes["other"], patched[kind].floor.bytes
        assert 0 < floor <= moved < eager[kind].bytes["other"], kind
        if (family, kind) in KNOWN_OVER_FLOOR:
            continue
        ops = dict(patched[kind].ops)
        assert moved <= 1.10 * floor, f"{family} {kind} batch {batch}: {moved / floor:.2f}x its floor ({ops})"



def test_sd3_at_batch_2_moves_at_most_twice_its_batch_1_bytes():
    """A CFG call (batch 2) costs at most two single calls: the projections write into the joint buffers
    without a pre-copied bias (baddbmm's 6 extra launches per block before)."""
    one, two = (traffic.family_counts("sd3", batch=b)[1] for b in (1, 2))
    for kind in one:
        assert two[kind].total_bytes <= 2 * one[kind].total_bytes, kind
        assert two[kind].bytes["other"] <= 2 * one[kind].bytes["other"] * 1.001, kind  # 0.1 %: chunk views of [B, 6D]
        assert not any("bias copied" in op for op in two[kind].ops), dict(two[kind].ops)


def test_flux_single_block_copies_neither_v_nor_the_mlp_concatenation():
    """The single block's non-GEMM launches: its norm, one q/k norm + RoPE without V, its gated residual, the
    modulation's SiLU; no copy (cat, clone, copy_) and no separate GELU."""
    _, patched = traffic.family_counts("flux")
    ops = patched["FluxSingleTransformerBlock"].ops
    assert not {"cat", "clone", "copy_", "gelu"} & set(ops), dict(ops)
    assert patched["FluxSingleTransformerBlock"].launches["other"] == 4, dict(ops)


def test_table_has_a_floor_row_per_block_kind_and_batch():
    rows = traffic.table(("flux",)).splitlines()
    floors = [row for row in rows if "| floor |" in row]
    assert len(floors) == 2 * len(traffic.BATCHES) and all("1.00x" in row for row in floors)
