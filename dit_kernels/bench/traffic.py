"""Launch and traffic model of one transformer block per family, eager diffusers vs patched, at real shapes.

Nothing runs on a GPU: the model is built on the meta device and each path is walked under a
``TorchDispatchMode`` that sees every aten op. Eager: every aten op that launches a kernel (views and
allocations launch none) is one launch that reads its tensor inputs and writes its outputs. Patched: each
fused op (``dit_kernels.ops``) is one launch with its own inputs and outputs (``LaunchTracer``), the aten
ops of its reference implementation are not counted, and whatever the patched forward still does in aten
(the GEMMs, SiLU of the conditioning, ...) is counted like eager's. GEMMs (matmuls, convolutions) and
attention are listed apart from the rest ("other"): the fused kernels target the other part.

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
from dit_kernels.models import FAMILY_MODULES, family_of
from dit_kernels.models.shared import OpBackends, Patcher
from dit_kernels.ops.launch_trace import LaunchTracer, tensor_bytes

GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "matmul"}
NO_LAUNCH_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
                 "_unsafe_view", "alias", "clone_if_needed", "_local_scalar_dense", "sym_size", "sym_stride"}  # fmt: skip

# Real shapes of the issue: (latent height, width) at 1024 px (DiT-XL/2 at 256 px), text tokens.
REAL_SHAPES = {"dit": zoo.Shape(1, 32, 32, 0), "pixart": zoo.Shape(1, 128, 128, 300),
               "sd3": zoo.Shape(1, 128, 128, 333), "flux": zoo.Shape(1, 64, 64, 512),
               "hunyuan": zoo.Shape(1, 128, 128, 77)}  # fmt: skip
# Enough blocks to see each block kind once (SD3's last block is context_pre_only; HunyuanDiT's second
# half takes long skips; FLUX has double and single blocks).
REAL_DEPTH = {"dit": {"num_layers": 1}, "pixart": {"num_layers": 1}, "sd3": {"num_layers": 2},
              "flux": {"num_layers": 1, "num_single_layers": 1}, "hunyuan": {"num_layers": 4}}  # fmt: skip


def category(func) -> str | None:
    """"gemm", "attention", "other", or None for ops that launch no kernel (views, allocations)."""
    name = func.overloadpacket.__name__
    if func.is_view or name in NO_LAUNCH_OPS:
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

    def add(self, kind: str, name: str, moved: int) -> None:
        self.launches[kind] += 1
        self.bytes[kind] += moved
        self.ops[name] += 1


class _BlockScopedCounter(TorchDispatchMode):
    """Counts aten launches while a block runs (``current`` set by forward hooks), skipping the insides of
    fused ops when a ``LaunchTracer`` is given, and of SDPA (``_SdpaAsOneLaunch``)."""

    def __init__(self, tracer: LaunchTracer | None):
        super().__init__()
        self.tracer = tracer
        self.current: PathCounts | None = None
        self.inside_sdpa = False

    def counting(self) -> bool:
        fused = self.tracer is not None and self.tracer.inside_fused_op
        return self.current is not None and not fused and not self.inside_sdpa

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = category(func)
        if kind and self.counting():
            self.current.add(kind, func.overloadpacket.__name__, _moved(args, kwargs, out))
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
    """Run ``model(**inputs)`` once; per block kind, the counts of its first block of that kind."""
    counter = _BlockScopedCounter(tracer)
    results: dict[str, PathCounts] = {}
    hooks, launches_before = [], [0]

    def enter(block, *_):
        kind = block_kind(block)
        counter.current = None if kind in results else results.setdefault(kind, PathCounts())
        launches_before[0] = len(tracer.launches) if tracer else 0

    def leave(block, *_):
        if counter.current is not None and tracer is not None:
            for launch in tracer.launches[launches_before[0] :]:
                kind = "attention" if launch.name == "joint_attention" else "other"
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


def family_counts(family: str, dtype=torch.bfloat16) -> tuple[dict[str, PathCounts], dict[str, PathCounts]]:
    """(eager, patched) counts per block kind for ``family`` at its real shape, on the meta device."""
    with torch.device("meta"):
        model = zoo.build(family, "real", **REAL_DEPTH[family]).to(dtype)
    inputs = zoo.transformer_inputs(family, model, REAL_SHAPES[family], dtype, device="meta")
    eager = count_blocks(model, inputs)
    family_of(model).apply(model, Patcher(OpBackends("torch", "torch")))  # a shape-only model: no public checks
    with LaunchTracer() as tracer:
        patched = count_blocks(model, inputs, tracer)
    return eager, patched


def table(families=FAMILY_MODULES, dtype=torch.bfloat16) -> str:
    rows = [
        "| block | tokens | path | GEMM launches | attention launches | other launches | other MB | "
        "other launches vs eager | other bytes vs eager | other at 3.35 TB/s (us) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family in families:
        shape = REAL_SHAPES[family]
        eager, patched = family_counts(family, dtype)
        for kind in eager:
            for path, counts in (("eager", eager[kind]), ("patched", patched[kind])):
                launches = counts.launches["other"] / max(1, eager[kind].launches["other"])
                moved = counts.bytes["other"] / max(1, eager[kind].bytes["other"])
                rows.append(
                    f"| {family}: {kind} | {_tokens(family, shape)} | {path} | {counts.launches['gemm']} | "
                    f"{counts.launches['attention']} | {counts.launches['other']} | {counts.bytes['other'] / 1e6:.1f} "
                    f"| {launches:.0%} | {moved:.0%} | {counts.bytes['other'] / H100_HBM_BYTES_PER_S * 1e6:.1f} |"
                )
    return "\n".join(rows)


def _tokens(family: str, shape: zoo.Shape) -> str:
    patch = 1 if family == "flux" else 2
    image = shape.height * shape.width // patch**2
    return f"{image}+{shape.text_len}" if shape.text_len else str(image)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=FAMILY_MODULES, action="append", help="families (default: all patched)")
    args = parser.parse_args(argv)
    print("device: meta (shape-only model; no kernel runs), dtype bfloat16, batch 1\n")
    print(table(args.model or FAMILY_MODULES))


if __name__ == "__main__":
    main()
