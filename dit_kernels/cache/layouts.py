"""What the step cache knows about each family: one ``Layout`` per transformer class.

The cache wraps block forwards without knowing their math; it needs only which ModuleLists hold the
blocks (in execution order), the block's residual streams and output format, and which block arguments
carry the batch first (to run the remaining blocks on one CFG half).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

# Transformer keyword arguments that add to the residual stream between blocks (ControlNet residuals) or
# leave blocks out (SD3's skip-layer guidance): a call passing any of them runs every block, uncached.
BYPASS_ARGS = ("block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples",
               "skip_layers")  # fmt: skip

_BASIC = frozenset({"hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                    "timestep", "class_labels"})  # fmt: skip
_JOINT = frozenset({"hidden_states", "encoder_hidden_states", "temb"})


@dataclass(frozen=True)
class Layout:
    """``block_lists``: the transformer's ModuleList attributes, run one after the other.
    ``joint``: blocks take ``hidden_states`` (image) and ``encoder_hidden_states`` (text) and return
    ``(encoder_hidden_states, hidden_states)``, the text one None from SD3's ``context_pre_only`` last
    block; otherwise ``hidden_states -> hidden_states``. ``batch_args``: block arguments whose first dim
    is the batch (tensors of another batch size are passed whole)."""

    block_lists: tuple[str, ...]
    joint: bool
    batch_args: frozenset[str]

    @property
    def streams(self) -> tuple[str, ...]:
        """The block arguments that are residual streams, the one the cache measures (image) first."""
        return ("hidden_states", "encoder_hidden_states") if self.joint else ("hidden_states",)

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        return [block for name in self.block_lists for block in getattr(transformer, name)]

    def streams_of(self, output) -> tuple[Optional[Tensor], ...]:
        """A block's output as its streams, in ``streams`` order."""
        return (output[1], output[0]) if self.joint else (output,)

    def output(self, streams: tuple[Optional[Tensor], ...]):
        """Streams (``streams`` order) in the block's output format."""
        return (streams[1], streams[0]) if self.joint else streams[0]


LAYOUTS = {
    "DiTTransformer2DModel": Layout(("transformer_blocks",), False, _BASIC),
    "PixArtTransformer2DModel": Layout(("transformer_blocks",), False, _BASIC),
    "SD3Transformer2DModel": Layout(("transformer_blocks",), True, _JOINT),
    # Double blocks, then single blocks; both return (text, image).
    "FluxTransformer2DModel": Layout(("transformer_blocks", "single_transformer_blocks"), True, _JOINT),
    # Long skips are handed from block to block by the transformer's loop (the ``skip`` argument).
    "HunyuanDiT2DModel": Layout(("blocks",), False, frozenset({"hidden_states", "encoder_hidden_states", "temb",
                                                               "skip"})),
}  # fmt: skip


def layout_of(transformer: nn.Module) -> Layout:
    """The layout of ``transformer``'s class (exactly the diffusers class), else ValueError."""
    import diffusers

    name = type(transformer).__name__
    if name not in LAYOUTS or type(transformer) is not getattr(diffusers, name):
        raise ValueError(f"step cache: no block layout for {type(transformer).__qualname__}; "
                         f"known: {', '.join(LAYOUTS)}")  # fmt: skip
    return LAYOUTS[name]
