"""diffusers' ``BasicTransformerBlock`` on fused ops, shared by DiT (``norm_type="ada_norm_zero"``) and
PixArt-α/Σ (``"ada_norm_single"``), diffusers 0.42.

A family supplies a ``BasicBlockKind``: its norm type, where the six modulation tensors come from
(``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp``, [B, D] or [B, 1, D]), which
LayerNorm precedes the self-attention and which the feed-forward, and whether the block may have a
cross-attention. Per block, h [B, S, D]::

    x     = layernorm_modulate(h, shift_msa, scale_msa)               # attn_norm (DiT norm1.norm, PixArt norm1)
    a     = attn1(x, attention_mask)                                   # FusedAttnProcessor
    if attn2 (PixArt: cross-attention to the text on the *un-normalised* h, no gate, as diffusers does):
        h = gated_residual(h, a, gate_msa)
        a = attn2(h, encoder_hidden_states, encoder_attention_mask)    # mask: additive bias [B, 1, T]
        gate_msa = None
    h, x2 = gated_residual_layernorm_modulate(h, a, gate_msa, shift_mlp, scale_mlp)  # ff_norm (DiT norm3, PixArt norm2)
    h     = gated_residual(h, ff(x2), gate_mlp)        # on CUDA: ff's GELU in its first GEMM (feed_forward)

DiT: 3 fused launches per block, PixArt: 4. Non-GEMM launches per block: ``python -m
dit_kernels.bench.traffic``. The attention modules, the FeedForward (chunked as diffusers chunks it after
``set_chunk_feed_forward``) and every Linear are the model's own (peft LoRA keeps working); only the
LayerNorms' eps/weight/bias are read.
``validate_blocks`` refuses every block option whose path this forward does not take.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, Optional

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor, nn

from dit_kernels.models.shared import (
    FusedAttnProcessor,
    block_feed_forward,
    call_attention,
    check_type,
    check_unwrapped,
    gated_feed_forward,
    modulate,
    validate_legacy_attention,
)
from dit_kernels.ops import gated_residual
from dit_kernels.patching import BlockLayout, OpBackends, Patcher

# (block, hidden_states [B, S, D], timestep, class_labels) -> the six modulation tensors, diffusers' order
Modulation = Callable[[BasicTransformerBlock, Tensor, Optional[Tensor], Optional[Tensor]], tuple[Tensor, ...]]


# The step cache's view of a model whose blocks are ``transformer_blocks`` of BasicTransformerBlock.
BLOCKS = BlockLayout(("transformer_blocks",), joint=False,
                     batch_args=frozenset({"hidden_states", "attention_mask", "encoder_hidden_states",
                                           "encoder_attention_mask", "timestep", "class_labels"}))  # fmt: skip


@dataclass(frozen=True)
class BasicBlockKind:
    """What differs between the families that use ``BasicTransformerBlock``.

    ``attn_norm`` / ``ff_norm``: dotted paths (from the block) of the LayerNorms before attn1 and before the
    feed-forward; ``cross_attention``: whether attn2 (on the un-normalised h, ungated) may be present;
    ``check``: the family's own module checks, ``check(block, name)`` raising ValueError."""

    family: str
    norm_type: str
    modulation: Modulation
    attn_norm: str
    ff_norm: str
    cross_attention: bool
    check: Callable[[BasicTransformerBlock, str], None]


# ----------------------------------------------------------------------------------------- validate


def validate_blocks(transformer: nn.Module, kind: BasicBlockKind, blocks: str = "transformer_blocks") -> None:
    """Every ``transformer.<blocks>[i]`` is one the fused forward reproduces exactly."""
    for i, block in enumerate(getattr(transformer, blocks)):
        validate_block(block, kind, f"{blocks}.{i}")


def validate_block(block: nn.Module, kind: BasicBlockKind, name: str) -> None:
    """Stock, unhooked BasicTransformerBlock of the kind's norm type, none of the options the fused forward
    leaves out, plain LayerNorms, the family's own checks, attentions with AttnProcessor2_0."""
    family = kind.family
    check_type(block, BasicTransformerBlock, name, family)
    check_unwrapped(block, name, family)
    if block.norm_type != kind.norm_type:
        raise ValueError(f"{family}: {name} has norm_type={block.norm_type!r}, expected {kind.norm_type!r}")
    options = {
        "only_cross_attention": block.only_cross_attention,
        "double_self_attention": block.double_self_attention,
        "positional_embeddings": block.pos_embed is not None,
        "a GLIGEN fuser (attention_type 'gated')": hasattr(block, "fuser"),
        "a cross-attention (attn2)": block.attn2 is not None and not kind.cross_attention,
    }
    unsupported = [option for option, on in options.items() if on]
    if unsupported:
        raise ValueError(f"{family}: {name} uses {', '.join(unsupported)}, which the fused {family} block does not")
    kind.check(block, name)
    for path in (kind.attn_norm, kind.ff_norm):
        _check_layer_norm(attrgetter(path)(block), f"{name}.{path}", family)
    for attn in ("attn1", "attn2"):
        if getattr(block, attn) is not None:
            validate_legacy_attention(getattr(block, attn), AttnProcessor2_0, f"{name}.{attn}", family)


def _check_layer_norm(norm: nn.Module, name: str, family: str) -> None:
    """A plain LayerNorm over the last dim (affine or not, any eps: layernorm_modulate reads them)."""
    check_type(norm, nn.LayerNorm, name, family)
    if len(norm.normalized_shape) != 1:
        raise ValueError(f"{family}: {name} normalises over {tuple(norm.normalized_shape)}, expected the last dim only")


# ----------------------------------------------------------------------------------------- apply


def apply_blocks(transformer: nn.Module, patcher: Patcher, kind: BasicBlockKind,
                 blocks: str = "transformer_blocks") -> None:  # fmt: skip
    """Swap the forward of every block of ``transformer.<blocks>`` and its attention processors for the fused
    ones."""
    forward = block_forward(patcher.ops, kind)
    for block in getattr(transformer, blocks):
        patcher.replace_block(block, forward, _fused_ops(block), (block.attn1, block.attn2), FusedAttnProcessor)


def _fused_ops(block: BasicTransformerBlock) -> str:
    residuals = "gated_residual x2" if block.attn2 is not None else "gated_residual"
    return f"layernorm_modulate, gated_residual_layernorm_modulate, {residuals}"


def block_forward(ops: OpBackends, kind: BasicBlockKind):
    """BasicTransformerBlock.forward (same signature) on fused ops: the math in the module docstring."""
    attn_norm, ff_norm = attrgetter(kind.attn_norm), attrgetter(kind.ff_norm)

    def forward(
        block,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        timestep: Optional[Tensor] = None,
        cross_attention_kwargs: Optional[dict] = None,
        class_labels: Optional[Tensor] = None,
        added_cond_kwargs: Optional[dict] = None,
    ) -> Tensor:
        shift_msa, scale_msa, gate_msa, *mlp = kind.modulation(block, hidden_states, timestep, class_labels)
        kwargs = _attention_kwargs(cross_attention_kwargs)
        normed = modulate(hidden_states, attn_norm(block), shift_msa, scale_msa, ops)
        attn = call_attention(block.attn1, FusedAttnProcessor, hidden_states=normed, encoder_hidden_states=None,
                              attention_mask=attention_mask, **kwargs)  # fmt: skip
        if block.attn2 is not None:
            hidden_states = gated_residual(hidden_states, attn, gate_msa, backend=ops.norm)
            attn = call_attention(block.attn2, FusedAttnProcessor, hidden_states=hidden_states,
                                  encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                                  **kwargs)  # fmt: skip
            gate_msa = None
        ff = block_feed_forward(block, block.ff, ops)
        return gated_feed_forward(hidden_states, attn, (gate_msa, *mlp), ff_norm(block), ff, ops)

    return forward


def _attention_kwargs(cross_attention_kwargs: Optional[dict]) -> dict:
    """What the block passes on to its attentions: ``cross_attention_kwargs`` without GLIGEN's entry, which
    would need the fuser ``validate_block`` refuses (diffusers raises on it too, having no fuser)."""
    kwargs = dict(cross_attention_kwargs or {})
    if kwargs.pop("gligen", None) is not None:
        raise ValueError("cross_attention_kwargs['gligen'] needs a GLIGEN fuser, which this block does not have")
    return kwargs
