"""Launch and traffic model of one transformer block per family, eager diffusers vs patched, at real shapes.

Nothing runs on a GPU: the model is built on the meta device and each path is walked under a
``TorchDispatchMode`` that sees every aten op. Every aten op that launches a kernel (views and allocations
launch none) is one launch that reads its tensor inputs and writes its outputs; each fused op
(``dit_kernels.ops``, one ``dit_kernels::`` custom op under a dispatch mode) is one launch with its own
operands (``bench.launches.fused_operands``), its insides unseen. GEMMs (matmuls, convolutions) and
attention are listed apart from the rest ("other"): the fused kernels target the other part. Where ATen's
CUDA GEMM launches more than the GEMM (``gemm_side_launches``: a bias it copies into the output first, a GELU
it applies after), those launches are counted as "other". Attention outputs have the layout the GPU kernels
give them (SDPA: q's layout; ``joint_attention``: contiguous [B, S, H, Dh]), not the meta device's.

The roofline floor of a path's "other" part (``Floor``, from that path's own ops) is what a perfectly fused
implementation of it must still move with the path's GEMMs and attention left as they are. Its ops split
into fusion groups by GEMM depth: each op goes in the group just before the first GEMM/attention launch that
(directly or through other "other" ops) needs its result, i.e. it is scheduled as late as possible, so ops
of one group could be one kernel and ops of different groups cannot (a GEMM sits between them). Each group
reads every tensor it takes from outside the group once (block inputs, parameters, GEMM/attention outputs,
earlier groups' results) and writes once every tensor needed outside it (by a GEMM, attention, a later
group, or the block's caller); a tensor passing between ops of one group costs nothing. The table's floor
is the patched block's: how far the patched launches are from the best fusion of that same graph (a patcher
that makes GEMMs write where attention reads, as SD3's projections into the joint buffers, changes the graph
and so the floor).

Each family's real shape and depth are its ``Family.traffic_shape`` / ``traffic_depth``; rows at batch 1 and
batch 2 (a CFG call). ``python -m dit_kernels.bench.traffic`` prints the table; the last column is the
"other" bytes at H100 SXM's 3.35 TB/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dit_kernels.bench import zoo
from dit_kernels.bench.launches import fused_operands, is_fused_op
from dit_kernels.bench.ops import H100_HBM_BYTES_PER_S
from dit_kernels.models import FAMILY_MODULES, family_named
from dit_kernels.patching import OpBackends, Patcher

# _addmm_activation: a GEMM with its bias + GELU in the epilogue (cuBLASLt), as the patchers' FeedForwards run.
GEMM_OPS = {"mm", "addmm", "addmm_", "_addmm_activation", "bmm", "baddbmm", "baddbmm_", "convolution", "_convolution",
            "matmul"}  # fmt: skip
NO_LAUNCH_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
                 "_unsafe_view", "alias", "clone_if_needed", "_local_scalar_dense", "sym_size", "sym_stride"}  # fmt: skip
BATCHES = (1, 2)  # one sample, and a CFG call's two


def category(func) -> str | None:
    """"gemm", "attention", "other", or None for ops that launch no kernel (views, allocations)."""
    name = func.overloadpacket.__name__
    if func.is_view or name in NO_LAUNCH_OPS:
        return None
    if is_fused_op(func):
        return "attention" if name.startswith("joint_attention") else "other"
    if name in GEMM_OPS:
        return "gemm"
    return "attention" if "attention" in name else "other"


def gemm_side_launches(name: str, args, kwargs, out) -> tuple[list, list]:
    """The launches ATen's CUDA GEMM (``Blas.cpp``) makes besides the GEMM itself, as (before, after) lists of
    (name, read, written): ``baddbmm`` with beta != 0 first copies its (broadcast) bias into the output;
    ``addmm`` / ``_addmm_activation`` do too unless cuBLASLt takes the bias in its epilogue (a contiguous
    1-D bias, beta 1, a contiguous 2-D output not the bias itself), and without cuBLASLt
    ``_addmm_activation`` applies its GELU after the GEMM, in place."""
    if name not in ("addmm", "_addmm_activation", "baddbmm") or kwargs.get("beta", 1) == 0:
        return [], []
    bias = args[0]
    if _same_view(bias, out):  # in place (addmm_): the GEMM accumulates into it, nothing copied
        return [], []
    in_epilogue = (
        name != "baddbmm"
        and kwargs.get("beta", 1) == 1
        and bias.is_contiguous()
        and bias.squeeze().dim() <= 1
        and out.dim() == 2
        and out.is_contiguous()
    )
    if in_epilogue:
        return [], []
    gelu = [(f"{name} GELU after the GEMM", [out], [out])] if kwargs.get("use_gelu", False) else []
    return [(f"{name} bias copied into the output", [bias], [out])], gelu


def _same_view(a, b) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and _storage(a) == _storage(b)
        and (a.storage_offset(), a.shape, a.stride()) == (b.storage_offset(), b.shape, b.stride())
    )


@dataclass
class PathCounts:
    """Launches and bytes per category for one block kind on one path, and the path's floor."""

    launches: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    floor: "Floor" = field(default_factory=lambda: Floor())

    def record(self, kind: str, name: str, read, written) -> None:
        """One launch of ``kind`` reading ``read`` and writing ``written`` (tensors, nested in tuples, lists,
        dicts); also seen by the floor."""
        self.launches[kind] += 1
        self.bytes[kind] += sum(_nbytes(t) for t in (*_tensors(read), *_tensors(written)))
        self.ops[name] += 1
        self.floor.see(kind, read, written)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


@dataclass
class _Op:
    kind: str
    inputs: list
    outputs: list
    depth: int = 0  # GEMM/attention launches on the longest path from the block's inputs
    group: int = 0


@dataclass
class Floor:
    """The roofline floor of a block's "other" part, from the ops it sees (the grouping: module doc).

    Tensors are identified by their storage, so a view is the tensor it views; a tensor's size is the
    largest view of it seen. Every tensor seen is kept alive while the block runs, so that no storage
    address is reused for another tensor (meta tensors cost no memory)."""

    ops: list = field(default_factory=list)
    block_outputs: list = field(default_factory=list)

    def see(self, kind: str, inputs, outputs) -> None:
        self.ops.append(_Op(kind, list(_tensors(inputs)), list(_tensors(outputs))))

    def finish(self, block_outputs) -> None:
        self.block_outputs = list(_tensors(block_outputs))

    @property
    def bytes(self) -> int:
        producer, depth = {}, {}
        for op in self.ops:  # ASAP depth, forwards
            op.depth = max((depth.get(_storage(t), 0) for t in op.inputs), default=0)
            for t in op.outputs:
                producer[_storage(t)], depth[_storage(t)] = op, op.depth + (op.kind != "other")
        end = max((op.depth for op in self.ops), default=0)
        latest = {_storage(t): end for t in self.block_outputs}
        for op in reversed(self.ops):  # as late as the first GEMM/attention needing the result allows
            op.group = min((latest.get(_storage(t), end) for t in op.outputs), default=end)
            reach = op.group if op.kind == "other" else op.depth
            for t in op.inputs:
                latest[_storage(t)] = min(latest.get(_storage(t), end), reach)
        reads, writes = {}, {}
        for op in self.ops:
            for t in op.inputs:
                made_by = producer.get(_storage(t))
                from_group = made_by is not None and made_by.kind == "other" and made_by.group == op.group
                if op.kind == "other" and not from_group:
                    _keep_largest(reads, (op.group, _storage(t)), t)
                if made_by is not None and made_by.kind == "other" and not (op.kind == "other" and from_group):
                    _keep_largest(writes, _storage(t), t)
        for t in self.block_outputs:
            made_by = producer.get(_storage(t))
            if made_by is not None and made_by.kind == "other":
                _keep_largest(writes, _storage(t), t)
        return sum(reads.values()) + sum(writes.values())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _keep_largest(sizes: dict, key, t: torch.Tensor) -> None:
    sizes[key] = max(sizes.get(key, 0), _nbytes(t))


class _BlockScopedCounter(TorchDispatchMode):
    """Counts launches while a block runs (``current`` set by forward hooks), skipping the insides of SDPA
    (``_SdpaAsOneLaunch``). A fused op is one custom op here, whose insides no mode sees; a
    ``joint_attention`` result is replaced by a contiguous [B, S, H, Dh] tensor, the layout its GPU
    backends return (the torch reference's fake is a transposed view, which would cost a copy the GPU
    never makes)."""

    def __init__(self):
        super().__init__()
        self.current: PathCounts | None = None
        self.inside_sdpa = False

    def counting(self) -> bool:
        return self.current is not None and not self.inside_sdpa

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = category(func)
        if kind == "attention" and is_fused_op(func):
            out = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        if kind and self.counting():
            self._count(func, kind, args, kwargs, out)
        return out

    def _count(self, func, kind: str, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        if is_fused_op(func):
            read, written = fused_operands(func, args, kwargs, out)
        else:
            read, written = (args, {k: v for k, v in kwargs.items() if k != "out"}), out  # out=: written, not read
        before, after = gemm_side_launches(name, args, kwargs, out) if kind == "gemm" else ([], [])
        for launch in before:
            self.current.record("other", *launch)
        self.current.record(kind, name, read, written)
        for launch in after:
            self.current.record("other", *launch)


class _SdpaAsOneLaunch(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` is one fused kernel on a GPU; on meta/CPU tensors it decomposes
    into the math path before the dispatch mode sees it. Count it once, as attention, with its output in
    q's layout, as the GPU kernels (flash, memory-efficient, cuDNN) return it: diffusers' [B, H, S, Dh]
    views of [B, S, H, Dh] projections give a [B, S, H, Dh]-major output, which its reshape then only views."""

    def __init__(self, counter: _BlockScopedCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention or not self.counter.counting():
            return func(*args, **(kwargs or {}))
        self.counter.inside_sdpa = True
        try:
            out = func(*args, **(kwargs or {}))
            query = args[0] if args else kwargs["query"]
            if out.shape == query.shape:
                out = torch.empty_like(query)
        finally:
            self.counter.inside_sdpa = False
        self.counter.current.record("attention", "scaled_dot_product_attention", (args, kwargs), out)
        return out


def block_kind(block: torch.nn.Module) -> str:
    """The block's class, marked when its structure differs (SD3's last block, HunyuanDiT's skip blocks)."""
    kind = type(block).__name__
    if getattr(block, "context_pre_only", False):
        kind += " (context_pre_only)"
    if getattr(block, "skip_linear", None) is not None:
        kind += " (long skip)"
    return kind


def _blocks(model: torch.nn.Module):
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList):
            yield from child


def _kinds(model: torch.nn.Module) -> dict[int, str]:
    """id(block) -> its kind; a class that several block lists hold (Latte's spatial and temporal blocks)
    is told apart by the list's name."""
    lists = {name: child for name, child in model.named_children() if isinstance(child, torch.nn.ModuleList)}
    owners: dict[str, set[str]] = {}
    for name, blocks in lists.items():
        for block in blocks:
            owners.setdefault(type(block).__name__, set()).add(name)
    return {id(block): block_kind(block) + (f" ({name})" if len(owners[type(block).__name__]) > 1 else "")
            for name, blocks in lists.items() for block in blocks}  # fmt: skip


def count_blocks(model: torch.nn.Module, inputs: dict) -> dict[str, PathCounts]:
    """Run ``model(**inputs)`` once; per block kind, the counts of its last block of that kind."""
    counter = _BlockScopedCounter()
    results: dict[str, PathCounts] = {}
    hooks = []

    kinds = _kinds(model)

    def enter(block, *_):
        counter.current = results[kinds[id(block)]] = PathCounts()  # the last block of each kind is the one kept

    def leave(block, _args, output):
        if counter.current is not None:
            counter.current.floor.finish(output)
        counter.current = None

    for block in _blocks(model):
        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    try:
        with torch.no_grad(), counter, _SdpaAsOneLaunch(counter):
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return results


# The GPU path walked on meta tensors: the fused ops as one custom op each (their torch reference's fakes),
# the FeedForward GELUs in their GEMMs' epilogues.
GPU_PATH = OpBackends(norm="torch", rope="torch", attention="torch", gelu_epilogue=True)


@functools.cache
def family_counts(family: str, dtype=torch.bfloat16, batch: int = 1,
                  variant: str = "") -> tuple[dict[str, PathCounts], dict[str, PathCounts]]:  # fmt: skip
    """(eager, patched) counts per block kind for ``family`` at its real shape with ``batch`` samples and
    ``traffic_depth`` (every block kind twice, the last of each counted), on the meta device; ``variant``: one
    of its ``traffic_variants`` (another width). Cached: the same walk serves the table and the tests."""
    spec = family_named(family)
    with torch.device("meta"):
        model = zoo.to_dtype(spec.build("real", **spec.traffic_variants.get(variant, {}), **spec.traffic_depth),
                             dtype)  # fmt: skip
    shape = dataclasses.replace(spec.traffic_shape, batch=batch)
    inputs = zoo.transformer_inputs(family, model, shape, dtype, device="meta")
    eager = count_blocks(model, inputs)
    spec.apply(model, Patcher(GPU_PATH))  # a shape-only model: no public checks
    return eager, count_blocks(model, inputs)


COLUMNS = ("block", "batch", "tokens", "path", "GEMM launches", "attention launches", "other launches", "other MB",
           "all MB", "other launches vs eager", "other bytes vs eager", "other bytes vs floor",
           "other at 3.35 TB/s (us)")  # fmt: skip


def table(families=FAMILY_MODULES, dtype=torch.bfloat16, batches=BATCHES) -> str:
    """The markdown table: per family, batch and block kind, the eager, patched and floor rows (the floor
    of the patched graph)."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for family, variant in variants(families):
        tokens = _tokens(family)
        for batch in batches:
            eager, patched = family_counts(family, dtype, batch, variant)
            for kind in eager:
                block = f"{family} {variant}: {kind}" if variant else f"{family}: {kind}"
                floor = patched[kind].floor.bytes
                rows += [_row(block, batch, tokens, "eager", eager[kind], eager[kind], floor),
                         _row(block, batch, tokens, "patched", patched[kind], eager[kind], floor),
                         _row(block, batch, tokens, "floor", None, eager[kind], floor)]  # fmt: skip
    return "\n".join(rows)


def variants(families=FAMILY_MODULES) -> list[tuple[str, str]]:
    """(family, variant) of every traffic row set: each family's real config ("") and its traffic_variants."""
    return [(family, variant) for family in families for variant in ("", *family_named(family).traffic_variants)]


def _row(block: str, batch: int, tokens: str, path: str, counts: PathCounts | None, eager: PathCounts,
         floor: int) -> str:  # fmt: skip
    """One table row; ``counts`` None: the patched graph's roofline floor (bytes only)."""
    moved = floor if counts is None else counts.bytes["other"]
    cells = [block, batch, tokens, path]
    if counts is None:
        cells += ["-"] * 3 + [f"{moved / 1e6:.1f}", "-", "-"]
    else:
        cells += [counts.launches[k] for k in ("gemm", "attention", "other")]
        cells += [f"{moved / 1e6:.1f}", f"{counts.total_bytes / 1e6:.1f}",
                  f"{counts.launches['other'] / max(1, eager.launches['other']):.0%}"]  # fmt: skip
    cells += [f"{moved / max(1, eager.bytes['other']):.0%}", f"{moved / max(1, floor):.2f}x",
              f"{moved / H100_HBM_BYTES_PER_S * 1e6:.1f}"]  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + " |"


def _tokens(family: str) -> str:
    spec = family_named(family)
    shape = spec.traffic_shape
    image = zoo.tokens(family, spec.configs["real"], shape)
    return f"{image}+{shape.text_len}" if shape.text_len else str(image)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=FAMILY_MODULES, action="append", help="families (default: all patched)")
    parser.add_argument("--batch", type=int, action="append", help=f"batch sizes (default: {BATCHES})")
    args = parser.parse_args(argv)
    print("device: meta (shape-only model; no kernel runs), dtype bfloat16; floor: the patched graph's\n")
    print(table(args.model or FAMILY_MODULES, batches=tuple(args.batch or BATCHES)))


if __name__ == "__main__":
    main()
