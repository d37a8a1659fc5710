"""What patching shares, below ``api``, the families, the step cache and the graph runner (no import circle):

- ``OpBackends``: the backend each op runs with in a patched model, resolved once by ``patch``, and the
  per-op switches (an op switched off runs diffusers' own computation);
- ``Patcher``: applies a family's replacements and records each one, so that ``undo`` is exact;
- ``BlockLayout``: where a transformer's blocks are and how they are called (what the step cache and the
  per-block graph runners need; each family declares one);
- ``find_transformer(s)``: the transformer(s) of a pipeline (or the transformer itself).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from torch import Tensor, nn

_MISSING = object()

# The op families a patch can switch one by one (``patch(kernels={...})``).
OPS = ("norm", "rope", "attention")
EAGER = "eager"  # an op switched off: diffusers' own computation for it


@dataclass(frozen=True)
class OpBackends:
    """The backend each op family runs with in a patched model (``EAGER``: switched off).

    ``norm``: layernorm_modulate / gated_residual(_layernorm_modulate) ("torch", "triton", "cuda", "cuda_emu";
    None: the device's best, chosen per call). ``rope``: ``qk_norm_rope`` (per-head q/k norm + RoPE), same
    values. ``attention``: ``joint_attention`` (None: chosen per call, see ``dit_kernels.ops.attention_backend``).
    ``gelu_epilogue``: run a FeedForward's tanh GELU in its first GEMM's epilogue (``torch._addmm_activation``);
    None: on CUDA tensors only (on CPU that op computes the exact erf GELU); True: on any device (a
    shape-only walk of the GPU path on meta tensors, as the bench's traffic model does).
    The defaults are what a processor built with no arguments uses (diffusers rebuilds processors as
    ``type(processor)()`` when it loads an IP-adapter)."""

    norm: Optional[str] = None
    rope: Optional[str] = None
    attention: Optional[str] = None
    gelu_epilogue: Optional[bool] = None

    def on(self, op: str) -> bool:
        """Whether ``op`` ("norm", "rope" or "attention") runs fused."""
        return getattr(self, op) != EAGER


@dataclass(frozen=True)
class BlockLayout:
    """Where a transformer's blocks are and how they are called (declared by each family).

    ``block_lists``: the transformer's ModuleList attributes, run one after the other. ``joint``: blocks take
    ``hidden_states`` (image) and ``encoder_hidden_states`` (text) and return ``(encoder_hidden_states,
    hidden_states)`` (the text one may be None, as from SD3's ``context_pre_only`` last block); otherwise
    ``hidden_states -> hidden_states``. ``batch_args``: block arguments whose first dim is the batch
    (tensors of another batch size are passed whole). ``bypass_args``: transformer keyword arguments that
    add to the residual stream between blocks (ControlNet residuals) or leave blocks out (skip-layer
    guidance): a call passing any of them runs every block, uncached; ``bypass_values``: (argument, value)
    pairs with the same effect when the call passes that value.

    ``interleaved``: the lists' blocks run in turns (list 0's first, list 1's first, list 0's second, ...:
    Latte's spatial and temporal blocks) instead of one list after the other. ``reshapes``: the transformer
    reshapes the residual stream between blocks of different lists (Latte swaps its batch and sequence
    axes), so the blocks' batch is not the call's and no block may run on part of the batch."""

    block_lists: tuple[str, ...]
    joint: bool
    batch_args: frozenset[str]
    bypass_args: tuple[str, ...] = ()
    bypass_values: tuple[tuple[str, object], ...] = ()
    interleaved: bool = False
    reshapes: bool = False

    @property
    def streams(self) -> tuple[str, ...]:
        """The block arguments that are residual streams, the one the cache measures (image) first."""
        return ("hidden_states", "encoder_hidden_states") if self.joint else ("hidden_states",)

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """The blocks in the order they run."""
        lists = [list(getattr(transformer, name)) for name in self.block_lists]
        return [block for turn in zip(*lists) for block in turn] if self.interleaved else sum(lists, [])

    def streams_of(self, output) -> tuple[Optional[Tensor], ...]:
        """A block's output as its streams, in ``streams`` order."""
        return (output[1], output[0]) if self.joint else (output,)

    def output(self, streams: tuple[Optional[Tensor], ...]):
        """Streams (``streams`` order) in the block's output format."""
        return (streams[1], streams[0]) if self.joint else streams[0]


@dataclass
class Patcher:
    """Applies a family's replacements and records each one so that ``undo`` restores the model exactly.

    Every change is an instance attribute set on a module (a block's ``forward``, an attention module's
    ``processor``, ...); ``undo`` puts back the previous instance attribute, or removes ours when the
    module had none (so the class's method shows through again)."""

    ops: OpBackends
    replaced: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    _undo: list[tuple[object, str, object]] = field(default_factory=list)
    _names: dict[int, str] = field(default_factory=dict)

    def name_modules(self, root: nn.Module) -> None:
        """Remember qualified names (``transformer_blocks.3.attn``) for the report."""
        self._names = {id(module): name or type(root).__name__ for name, module in root.named_modules()}

    def set_attr(self, obj: object, name: str, value: object, what: str) -> None:
        """``obj.<name> = value`` (bypassing nn.Module's registration), recorded for ``undo``."""
        self._undo.append((obj, name, obj.__dict__.get(name, _MISSING)))
        object.__setattr__(obj, name, value)
        self.replaced.append(f"{self._names.get(id(obj), type(obj).__name__)}.{name}: {what}")

    def replace_forward(self, module: nn.Module, forward: Callable, what: str) -> None:
        """Bind ``forward(module, ...)`` as ``module.forward`` (an instance attribute)."""
        self.set_attr(module, "forward", types.MethodType(forward, module), what)

    def set_processor(self, attention: nn.Module, processor: object) -> None:
        self.set_attr(attention, "processor", processor, type(processor).__name__)

    def replace_block(self, block: nn.Module, forward: Callable, what: str, attentions: Sequence[Optional[nn.Module]],
                      processor_cls: type) -> None:  # fmt: skip
        """With the norm ops on, ``block``'s forward becomes ``forward`` (reported as ``what``); with the rope
        or attention op on, each attention module of ``attentions`` that is there (not None) gets
        ``processor_cls(its processor, self.ops)``."""
        if self.ops.on("norm"):
            self.replace_forward(block, forward, what)
        if self.ops.on("rope") or self.ops.on("attention"):
            for attention in attentions:
                if attention is not None:
                    self.set_processor(attention, processor_cls(attention.processor, self.ops))

    def fallback(self, what: str, why: str) -> None:
        """Something stays on diffusers' eager path; the report says what and why."""
        self.fallbacks.append(f"{what}: {why}")

    def undo(self) -> None:
        while self._undo:
            obj, name, previous = self._undo.pop()
            if previous is _MISSING:
                del obj.__dict__[name]
            else:
                object.__setattr__(obj, name, previous)


def find_transformer(obj) -> nn.Module:
    """``obj`` if it is a module, else its first transformer module (a diffusers pipeline's ``.transformer``,
    see ``find_transformers``); else TypeError."""
    return find_transformers(obj)[0][1]


def find_transformers(obj) -> list[tuple[str, nn.Module]]:
    """(attribute, module) of every transformer ``obj`` holds: ``[("", obj)]`` for a module; for a diffusers
    pipeline its ``.transformer`` and each other component named ``transformer_<n>`` that is a module, in
    that order (Wan 2.2 A14B's ``transformer_2`` denoises the low-noise steps); TypeError when there is none."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    names = ["transformer", *sorted(n for n in getattr(obj, "components", {}) if n.startswith("transformer_"))]
    found = [(name, getattr(obj, name, None)) for name in names]
    found = [(name, module) for name, module in found if isinstance(module, nn.Module)]
    if not found:
        what = "None" if obj is None else type(obj).__name__
        raise TypeError(f"{what} is neither a transformer module nor a pipeline with a `.transformer` module")
    return found
