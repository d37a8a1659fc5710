"""Launch and traffic model of one transformer block per family, eager diffusers vs patched, at real shapes.

Nothing runs on a GPU: the model is built on the meta device and each path is walked under a
``TorchDispatchMode`` that sees every aten op. Eager: every aten op that launches a kernel (views and
allocations launch none) is one launch that reads its tensor inputs and writes its outputs. Patched: each
fused op (``dit_kernels.ops``) is one launch with its own inputs and outputs (``LaunchTracer``), the aten
ops of its reference implementation are not counted, and whatever the patched forward still does in aten
(the GEMMs, SiLU of the conditioning, ...) is counted like eager's. GEMMs (matmuls, convolutions) and
attention are listed apart from the rest ("other"): the fused kernels target the other part.

The roofline floor of the "other" part (``Floor``, from the eager walk) is what a perfectly fused
implementation of it must still move with the GEMMs and attention left as they are. Its ops split into
fusion groups by GEMM depth: each op goes in the group just before the first GEMM/attention launch that
(directly or through other "other" ops) needs its result, i.e. it is scheduled as late as possible, so
ops of one group could be one kernel and ops of different groups cannot (a GEMM sits between them). Each
group reads every tensor it takes from outside the group once (block inputs, parameters, GEMM/attention
outputs, earlier groups' results) and writes once every tensor needed outside it (by a GEMM, attention, a
later group, or the block's caller); a tensor passing between ops of one group costs nothing.
A patched block can go below this floor where it changes what a GEMM writes (SD3's projections written
straight into the joint attention buffers; on CUDA, the FeedForward GELU in its GEMM's epilogue, which the
walk asks for explicitly: ``OpBackends(gelu_epilogue=True)``, since its tensors are on the meta device).

Each family's real shape and depth are its ``Family.traffic_shape`` / ``traffic_depth``.

``python -m dit_kernels.bench.traffic`` prints the table; the H100 column is the "other" bytes at 3.35 TB/s.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dit_kernels.bench import zoo
from dit_kernels.bench.ops import H100_HBM_BYTES_PER_S
from dit_kernels.bench.launches import LaunchTracer, is_fused_op, tensor_bytes
from dit_kernels.models import FAMILY_MODULES, family_named
from dit_kernels.patching import OpBackends, Patcher

# _addmm_activation: a GEMM with its bias + GELU in the epilogue (cuBLASLt), as the SD3 patcher's FeedForward runs.
GEMM_OPS = {"mm", "addmm", "_addmm_activation", "bmm", "baddbmm", "convolution", "_convolution", "matmul"}
NO_LAUNCH_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
                 "_unsafe_view", "alias", "clone_if_needed", "_local_scalar_dense", "sym_size", "sym_stride"}  # fmt: skip

def category(func) -> str | None:
    """"gemm", "attention", "other", or None for ops that launch no kernel (views, allocations)."""
    name = func.overloadpacket.__name__
    if func.is_view or name in NO_LAUNCH_OPS or is_fused_op(func):  # fused ops: counted by the LaunchTracer
        return None
    if name in GEMM_OPS:
        return "gemm"
    return "attention" if "attention" in name else "other"


@dataclass
class PathCounts:
    """Launches and bytes per category for one block kind on one path."""

    launches: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    floor: "Floor" = field(default_factory=lambda: Floor())

    def add(self, kind: str, name: str, moved: int) -> None:
        self.launches[kind] += 1
        self.bytes[kind] += moved
        self.ops[name] += 1


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


def _keep_largest(sizes: dict, key, t: torch.Tensor) -> None:
    sizes[key] = max(sizes.get(key, 0), t.numel() * t.element_size())


class _BlockScopedCounter(TorchDispatchMode):
    """Counts aten launches while a block runs (``current`` set by forward hooks), skipping the insides of
    SDPA (``_SdpaAsOneLaunch``). A fused op is one custom op here, whose insides no mode sees."""

    def __init__(self):
        super().__init__()
        self.current: PathCounts | None = None
        self.inside_sdpa = False

    def counting(self) -> bool:
        return self.current is not None and not self.inside_sdpa

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = category(func)
        if kind and self.counting():
            read = (args, {k: v for k, v in (kwargs or {}).items() if k != "out"})  # out=: written, not read
            self.current.add(kind, func.overloadpacket.__name__, _moved(*read, out))
            self.current.floor.see(kind, read, out)
        return out


class _SdpaAsOneLaunch(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` is one fused kernel on a GPU; on meta/CPU tensors it decomposes
    into the math path before the dispatch mode sees it. Count it once, as attention."""

    def __init__(self, counter: _BlockScopedCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention or not self.counter.counting():
            return func(*args, **(kwargs or {}))
        self.counter.inside_sdpa = True
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.counter.inside_sdpa = False
        self.counter.current.add("attention", "scaled_dot_product_attention", _moved(args, kwargs, out))
        self.counter.current.floor.see("attention", (args, kwargs), out)
        return out


def _moved(args, kwargs, out) -> int:
    return tensor_bytes(list(args)) + tensor_bytes(list((kwargs or {}).values())) + tensor_bytes(out)


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


def count_blocks(model: torch.nn.Module, inputs: dict, tracer: LaunchTracer | None = None) -> dict[str, PathCounts]:
    """Run ``model(**inputs)`` once; per block kind, the counts of its last block of that kind."""
    counter = _BlockScopedCounter()
    results: dict[str, PathCounts] = {}
    hooks, launches_before = [], [0]

    def enter(block, *_):
        kind = block_kind(block)
        counter.current = results[kind] = PathCounts()  # the last block of each kind is the one kept
        launches_before[0] = len(tracer.launches) if tracer else 0

    def leave(block, _args, output):
        if counter.current is not None:
            counter.current.floor.finish(output)
        if counter.current is not None and tracer is not None:
            for launch in tracer.launches[launches_before[0] :]:
                kind = "attention" if launch.name.startswith("joint_attention") else "other"
                counter.current.add(kind, launch.name, launch.read_bytes + launch.written_bytes)
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


# The GPU path walked on meta tensors: the reference ops (one launch each, LaunchTracer), GELU epilogues.
GPU_PATH = OpBackends(norm="torch", rope="torch", attention="torch", gelu_epilogue=True)


def family_counts(family: str, dtype=torch.bfloat16) -> tuple[dict[str, PathCounts], dict[str, PathCounts]]:
    """(eager, patched) counts per block kind for ``family`` at its real shape and ``traffic_depth`` (every
    block kind twice, the last of each counted), on the meta device."""
    spec = family_named(family)
    with torch.device("meta"):
        model = spec.build("real", **spec.traffic_depth).to(dtype)
    inputs = zoo.transformer_inputs(family, model, spec.traffic_shape, dtype, device="meta")
    eager = count_blocks(model, inputs)
    spec.apply(model, Patcher(GPU_PATH))  # a shape-only model: no public checks
    with LaunchTracer() as tracer:
        patched = count_blocks(model, inputs, tracer)
    return eager, patched


def table(families=FAMILY_MODULES, dtype=torch.bfloat16) -> str:
    rows = [
        "| block | tokens | path | GEMM launches | attention launches | other launches | other MB | "
        "other launches vs eager | other bytes vs eager | other bytes vs floor | other at 3.35 TB/s (us) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family in families:
        tokens = _tokens(family)
        eager, patched = family_counts(family, dtype)
        for kind in eager:
            for path, counts in (("eager", eager[kind]), ("patched", patched[kind])):
                rows.append(_row(f"{family}: {kind}", tokens, path, counts, eager[kind]))
            rows.append(_row(f"{family}: {kind}", tokens, "floor", None, eager[kind]))
    return "\n".join(rows)


def _row(block: str, tokens: str, path: str, counts: PathCounts | None, eager: PathCounts) -> str:
    """One table row; ``counts`` None: the roofline floor (bytes only)."""
    moved = eager.floor.bytes if counts is None else counts.bytes["other"]
    launches = ["-"] * 3 if counts is None else [counts.launches[k] for k in ("gemm", "attention", "other")]
    vs_launches = "-" if counts is None else f"{counts.launches['other'] / max(1, eager.launches['other']):.0%}"
    return (
        f"| {block} | {tokens} | {path} | {' | '.join(map(str, launches))} | {moved / 1e6:.1f} | {vs_launches} | "
        f"{moved / max(1, eager.bytes['other']):.0%} | {moved / max(1, eager.floor.bytes):.2f}x | "
        f"{moved / H100_HBM_BYTES_PER_S * 1e6:.1f} |"
    )


def _tokens(family: str) -> str:
    spec = family_named(family)
    shape = spec.traffic_shape
    image = zoo.tokens(family, spec.configs["real"], shape)
    return f"{image}+{shape.text_len}" if shape.text_len else str(image)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=FAMILY_MODULES, action="append", help="families (default: all patched)")
    args = parser.parse_args(argv)
    print("device: meta (shape-only model; no kernel runs), dtype bfloat16, batch 1\n")
    print(table(args.model or FAMILY_MODULES))


if __name__ == "__main__":
    main()
