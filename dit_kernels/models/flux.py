"""FLUX.1 patcher: ``FluxTransformer2DModel`` (dev: ``guidance_embeds=True``; schnell: False), diffusers 0.42.

Per double block (``FluxTransformerBlock``), on each stream (image ``h`` [B, S, D], text ``c`` [B, T, D]),
with ``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1.linear(silu(temb)).chunk(6)``
(``norm1_context`` for the text stream), 3 fused launches per stream instead of ~12 elementwise ops::

    x       = layernormmodulate(h, shift_msa, scale_msa)                     # norm1 (AdaLayerNormZero)
    a, a_c  = attn(x, x_c)                                                    # FluxFusedAttnProcessor
    h, x2   = gated_residual_layernormmodulate(h, a, gate_msa, shift_mlp, scale_mlp)   # + norm2
    h       = gated_residual(h, ff(x2), gate_mlp)       # on CUDA: ff's GELU in its first GEMM (feed_forward)
    c       = clip_fp16(same on the text stream)        # diffusers clips only the text stream here

Per single block (``FluxSingleTransformerBlock``), on the joint sequence ``j = cat(c, h)`` [B, T + S, D]
with ``shift, scale, gate = norm.linear(silu(temb)).chunk(3)``::

    x = layernormmodulate(j, shift, scale)                                   # norm (AdaLayerNormZeroSingle)
    j = clip_fp16(gated_residual(j, proj_out(cat(attn(x), act_mlp(proj_mlp(x)))), gate))
    return j[:, :T], j[:, T:]

where ``proj_out(cat(a, m))`` runs as two GEMMs over proj_out's weight's column blocks, the second
accumulating into the first's output (no concatenation buffer), ``act_mlp(proj_mlp(x))`` on CUDA as one GEMM
with the GELU in its epilogue, and ``attn`` takes the single stream's V projection as it is (no copy).

Attention (both block kinds): each stream's projections go through one ``qk_norm_rope`` launch (per-head
RMSNorm of q and k, interleaved RoPE, V copied along; a single block's one stream keeps its V projection
as it is) into joint [B, T + S, H, Dh] buffers, text first
(rows 0..T-1 of the RoPE table, which FLUX builds over ``cat(txt_ids, img_ids)``), image at
``seq_offset = T``; no ``torch.cat``. ``pos_embed`` hands the kernels fp32 contiguous tables once per
transformer call (``rope_tables``), so no block converts them.

Every Linear, the FeedForwards and the GELU stay the model's own modules (peft LoRA keeps working); only
the norm modules' eps/weight/bias are read. ``validate`` refuses anything else (a custom or IP-adapter
processor, another norm type, a forward already wrapped by a hook) before anything changes.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    _get_qkv_projections,
)
from torch import Tensor, nn

from dit_kernels.models.family import Family, Shape
from dit_kernels.models.shared import (
    JOINT_BLOCK_BATCH_ARGS,
    Stream,
    WrappingProcessor,
    attend,
    call_attention,
    check_qk_norms,
    check_type,
    check_unwrapped,
    clip_fp16,
    diffusers_dispatch_asked,
    feed_forward,
    gated_feed_forward,
    gelu_epilogue_on,
    is_hooked,
    is_plain_linear,
    joint_buffers,
    linear_gelu_tanh,
    modulate,
    modulation,
    plain_inference,
    project,
)
from dit_kernels.ops import gated_residual, rope_tables
from dit_kernels.parallel.plan import gather, split
from dit_kernels.patching import BlockLayout, OpBackends, Patcher

NAME = "flux"


# ----------------------------------------------------------------------------------------- validate


def validate(transformer: FluxTransformer2DModel) -> None:
    """Raise ValueError naming the first module or config value the fused path would not reproduce."""
    _check_unwrapped(transformer.pos_embed, "pos_embed")
    _check_type(transformer.pos_embed, FluxPosEmbed, "pos_embed")
    for i, block in enumerate(transformer.transformer_blocks):
        _validate_double(block, f"transformer_blocks.{i}")
    for i, block in enumerate(transformer.single_transformer_blocks):
        _validate_single(block, f"single_transformer_blocks.{i}")
    axes = list(transformer.pos_embed.axes_dim)
    head_dims = {attn.head_dim for attn in _attentions(transformer)}
    if any(d % 2 for d in axes) or head_dims - {sum(axes)}:
        raise ValueError(
            f"flux: config axes_dims_rope={axes} must be even and sum to attention_head_dim {sorted(head_dims)} "
            "(one interleaved RoPE table row per head dim)"
        )


def _validate_double(block: nn.Module, name: str) -> None:
    _check_type(block, FluxTransformerBlock, name)
    _check_unwrapped(block, name)
    for norm in ("norm1", "norm1_context"):
        _check_ada_norm(getattr(block, norm), AdaLayerNormZero, f"{name}.{norm}")
        if getattr(block, norm).emb is not None:
            raise ValueError(f"flux: {name}.{norm} embeds its own timestep/class (AdaLayerNormZero.emb); not FLUX's")
    for norm in ("norm2", "norm2_context"):
        _check_type(getattr(block, norm), nn.LayerNorm, f"{name}.{norm}")
    _validate_attention(block.attn, f"{name}.attn", joint=True)


def _validate_single(block: nn.Module, name: str) -> None:
    _check_type(block, FluxSingleTransformerBlock, name)
    _check_unwrapped(block, name)
    _check_ada_norm(block.norm, AdaLayerNormZeroSingle, f"{name}.norm")
    _check_type(block.act_mlp, nn.GELU, f"{name}.act_mlp")
    _validate_attention(block.attn, f"{name}.attn", joint=False)


def _validate_attention(attn: nn.Module, name: str, joint: bool) -> None:
    """A FluxAttention with diffusers' default processor, RMSNorm-like q/k norms, text projections iff
    ``joint`` (double blocks) and an output projection iff ``joint`` (single blocks project in proj_out)."""
    _check_type(attn, FluxAttention, name)
    _check_type(attn.processor, FluxAttnProcessor, f"{name}.processor")
    if (attn.added_kv_proj_dim is not None) != joint or attn.pre_only == joint:
        raise ValueError(
            f"flux: {name} has added_kv_proj_dim={attn.added_kv_proj_dim}, pre_only={attn.pre_only}; a "
            f"{'double' if joint else 'single'} block's attention has {'both' if joint else 'neither'} "
            "text projections and an output projection"
        )
    check_qk_norms(attn, [("norm_q", "norm_k")] + [("norm_added_q", "norm_added_k")] * joint, name, NAME)


def _check_ada_norm(norm: nn.Module, cls: type, name: str) -> None:
    _check_type(norm, cls, name)
    _check_type(norm.norm, nn.LayerNorm, f"{name}.norm")


_check_type = functools.partial(check_type, family=NAME)


_check_unwrapped = functools.partial(check_unwrapped, family=NAME)


def _attentions(transformer: FluxTransformer2DModel) -> list[FluxAttention]:
    return [block.attn for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]


# ----------------------------------------------------------------------------------------- apply


def apply(transformer: FluxTransformer2DModel, patcher: Patcher) -> None:
    """Swap pos_embed's forward (for the fused RoPE), every block's forward and every attention processor."""
    if patcher.ops.on("rope"):
        patcher.replace_forward(transformer.pos_embed, _pos_embed_forward, "rope_tables once per call")
    double = _double_block_forward(patcher.ops)
    single = _single_block_forward(patcher.ops)
    what = "layernorm_modulate x2, gated_residual_layernorm_modulate x2, gated_residual x2"
    for block in transformer.transformer_blocks:
        patcher.replace_block(block, double, what, (block.attn,), FluxFusedAttnProcessor)
    for block in transformer.single_transformer_blocks:
        patcher.replace_block(block, single, "layernorm_modulate, gated_residual", (block.attn,),
                              FluxFusedAttnProcessor)  # fmt: skip


def _pos_embed_forward(pos_embed: FluxPosEmbed, ids: Tensor) -> tuple[Tensor, Tensor]:
    """FluxPosEmbed's (cos, sin) [S_txt + S_img, Dh] as the fp32 contiguous tables the kernels read (no copy:
    diffusers already builds them so), converted here once per transformer call, never per block."""
    return rope_tables(*FluxPosEmbed.forward(pos_embed, ids))


def _double_block_forward(ops: OpBackends):
    """FluxTransformerBlock.forward on fused ops (the math in the module docstring)."""

    def forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        img = modulation(block.norm1, temb, 6)
        txt = modulation(block.norm1_context, temb, 6)
        attn_img, attn_txt, *ip_adapter = call_attention(
            block.attn,
            FluxFusedAttnProcessor,
            hidden_states=modulate(hidden_states, block.norm1.norm, img[0], img[1], ops),
            encoder_hidden_states=modulate(encoder_hidden_states, block.norm1_context.norm, txt[0], txt[1], ops),
            image_rotary_emb=image_rotary_emb,
            **(joint_attention_kwargs or {}),
        )
        hidden_states = gated_feed_forward(hidden_states, attn_img, img[2:], block.norm2,
                                           functools.partial(feed_forward, block.ff, ops=ops), ops)  # fmt: skip
        if ip_adapter:  # FluxIPAdapterAttnProcessor's third output, added after the feed-forward as diffusers does
            hidden_states = hidden_states + ip_adapter[0]
        encoder_hidden_states = gated_feed_forward(encoder_hidden_states, attn_txt, txt[2:], block.norm2_context,
                                                   functools.partial(feed_forward, block.ff_context, ops=ops),
                                                   ops)  # fmt: skip
        return clip_fp16(encoder_hidden_states), hidden_states

    return forward


def _single_block_forward(ops: OpBackends):
    """FluxSingleTransformerBlock.forward on fused ops (the math in the module docstring)."""

    def forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        text_len = encoder_hidden_states.shape[1]
        residual = _joined(encoder_hidden_states, hidden_states)
        shift, scale, gate = modulation(block.norm, temb, 3)
        normed = modulate(residual, block.norm.norm, shift, scale, ops)
        attn = call_attention(block.attn, FluxFusedAttnProcessor, hidden_states=normed,
                              image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))  # fmt: skip
        out = _project_out(block, attn, _mlp(block, normed, ops))
        joint = clip_fp16(gated_residual(residual, out, gate, backend=ops.norm))
        return joint[:, :text_len], joint[:, text_len:]

    return forward


def _mlp(block: FluxSingleTransformerBlock, normed: Tensor, ops: OpBackends) -> Tensor:
    """``act_mlp(proj_mlp(normed))`` [B, S, D_mlp]: one GEMM with the tanh GELU in its epilogue where that
    applies (``gelu_epilogue_on``: CUDA, eager inference; a plain biased ``proj_mlp``), else the modules."""
    proj, act = block.proj_mlp, block.act_mlp
    fits = is_plain_linear(proj) and proj.bias is not None and act.approximate == "tanh" and not is_hooked(act)
    return linear_gelu_tanh(proj, normed) if fits and gelu_epilogue_on(normed, ops) else act(proj(normed))


def _project_out(block: FluxSingleTransformerBlock, attn: Tensor, mlp: Tensor) -> Tensor:
    """``proj_out(cat([attn, mlp], dim=2))`` [B, S, D] for attn [B, S, D], mlp [B, S, D_mlp]. A plain
    ``proj_out`` at eager inference runs without the concatenation: with its weight's column blocks
    ``W = [W_a | W_m]``, ``out = attn @ W_a^T + bias`` (bias in the epilogue), then ``out += mlp @ W_m^T``
    by a second GEMM accumulating in place (beta 1), so neither the attention output nor the GELU is
    copied into a [B, S, D + D_mlp] buffer (2 x that buffer's traffic saved; the GEMM output is read once
    more instead). Otherwise (LoRA, autograd, torch.compile: the compiler fuses the cat) the module on the cat."""
    proj = block.proj_out
    if not (is_plain_linear(proj) and plain_inference(attn)):
        return proj(torch.cat([attn, mlp], dim=2))
    width = attn.shape[2]
    weight = proj.weight.t()  # [D + D_mlp, D]; row blocks of it are the column blocks of W, read in place
    rows = attn.reshape(-1, width)
    out = torch.mm(rows, weight[:width]) if proj.bias is None else torch.addmm(proj.bias, rows, weight[:width])
    out.addmm_(mlp.flatten(0, 1), weight[width:])
    return out.unflatten(0, attn.shape[:2])


def _joined(txt: Tensor, img: Tensor) -> Tensor:
    """``torch.cat([txt, img], dim=1)`` [B, T + S, D]. When txt and img are the two halves the previous
    single block returned, the tensor they are views of: the same values, no copy. Under torch.compile
    (which cannot trace storage offsets) always the cat: the compiler plans its own buffers."""
    base = txt._base
    if not torch.compiler.is_compiling() and base is not None and _are_halves(base, txt, img):
        return base
    return torch.cat([txt, img], dim=1)


def _are_halves(base: Tensor, txt: Tensor, img: Tensor) -> bool:
    """Whether txt and img are exactly ``base[:, :T]`` and ``base[:, T:]`` of a contiguous [B, T + S, D]."""
    if img._base is not base or base.dim() != 3 or not base.is_contiguous():
        return False
    batch, total, dim = base.shape
    text_len = txt.shape[1]
    return (
        txt.shape == (batch, text_len, dim)
        and img.shape == (batch, total - text_len, dim)
        and txt.stride() == img.stride() == base.stride()
        and txt.storage_offset() == base.storage_offset()
        and img.storage_offset() == base.storage_offset() + text_len * dim
    )


# ----------------------------------------------------------------------------------------- attention


class FluxFusedAttnProcessor(WrappingProcessor):
    """FluxAttnProcessor with q/k RMSNorm + RoPE + concatenation fused into ``qk_norm_rope`` launches.

    ``attn(hidden_states [B, S, D], encoder_hidden_states [B, T, D] | None, attention_mask,
    image_rotary_emb (cos, sin) [T + S, Dh])``: the text stream (``add_*_proj``, ``norm_added_*``) lands
    at rows 0..T-1 of joint q/k/v [B, T + S, H, Dh], the image stream (``to_*``, ``norm_*``) at T..; then
    attention, then ``to_out`` on the image rows and ``to_add_out`` on the text rows (double blocks), or
    the flattened [B, S, H * Dh] output (single blocks, no text stream).

    Which attention runs. diffusers routes this call through ``dispatch_attention_fn(backend=
    self._attention_backend, parallel_config=self._parallel_config)``; that is what carries
    ``set_attention_backend``, the ``attention_backend`` context manager / ``DIFFUSERS_ATTN_BACKEND``,
    context parallelism (Ulysses/Ring all-to-alls happen inside it) and attention masks. When no backend
    is asked for (none on the processor, diffusers' active backend the default "native", i.e. plain SDPA)
    and there is no mask, the call runs ``joint_attention(backend=ops.attention)`` instead: the same
    softmax attention on our own choice of kernel (flash-attention / Triton / SDPA), which is where the
    speed is; under context parallelism it runs as the local op of diffusers' Ulysses / Ring attention
    (``dit_kernels.parallel.attention``). Whenever the user asked diffusers for a backend or passed a mask,
    the joint buffers go to ``dispatch_attention_fn`` exactly as FluxAttnProcessor passes them, so those
    features keep working.

    The original (a fresh FluxAttnProcessor when built with no arguments, as diffusers rebuilds single
    blocks' processors when it loads an IP-adapter) and the forwarded attributes: ``WrappingProcessor``."""

    new_original = staticmethod(FluxAttnProcessor)

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None,
    ):
        query, key, value, txt_query, txt_key, txt_value = _get_qkv_projections(attn, hidden_states,
                                                                                encoder_hidden_states)  # fmt: skip
        streams = [Stream(query, key, value, attn.norm_q, attn.norm_k)]
        if attn.added_kv_proj_dim is not None:
            streams.insert(0, Stream(txt_query, txt_key, txt_value, attn.norm_added_q, attn.norm_added_k))
        heads = query.shape[-1] // attn.head_dim  # tensor-parallel shards hold fewer heads, as in diffusers
        q, k, v = joint_buffers(streams, heads, self.ops, image_rotary_emb)
        out = self._attend(q, k, v, attention_mask).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        txt, img = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        return attn.to_out[1](project(attn.to_out[0], img)), project(attn.to_add_out, txt)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """[B, T + S, H, Dh] -> [B, T + S, H, Dh]: our kernel (context-parallel when configured), or
        diffusers' dispatch (see the class doc; also with the attention op switched off)."""
        if not self.ops.on("attention") or diffusers_dispatch_asked(self._attention_backend, mask):
            return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend,
                                         parallel_config=self._parallel_config)  # fmt: skip
        return attend(q, k, v, self.ops, parallel_config=self._parallel_config)


# ----------------------------------------------------------------------------------------- examples


def inputs(config, shape: Shape, randn: Callable, dtype: torch.dtype) -> dict:
    """FluxPipeline's transformer call. The pipeline packs 2x2 latent patches into tokens: ``height x width``
    here is the token grid; ids [S, 3] = (0, row, col) in the latents' dtype (positions stay exact up to
    256 in bf16); guidance in fp32, as the pipeline makes it."""
    b = shape.batch
    rows, cols = torch.meshgrid(torch.arange(shape.height), torch.arange(shape.width), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).flatten(0, 1).to(dtype)
    kwargs = {
        "hidden_states": randn(b, shape.height * shape.width, config.in_channels),
        "encoder_hidden_states": randn(b, shape.text_len, config.joint_attention_dim),
        "pooled_projections": randn(b, config.pooled_projection_dim),
        "timestep": ((torch.arange(b) * 37 % 1000 + 1) / 1000).to(dtype),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(shape.text_len, 3, dtype=dtype),
    }
    if config.guidance_embeds:
        kwargs["guidance"] = torch.full((b,), 3.5)
    return kwargs


_REAL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56))  # FLUX.1-dev  # fmt: skip
CONFIGS = {
    "real": _REAL,
    "small": _REAL | dict(num_layers=1, num_single_layers=1),
    # 16 = 4 x 4 packed latent channels; RoPE axes sum to the head dim
    "tiny": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6)),  # fmt: skip
}

FAMILY = Family(
    name=NAME,
    classes=(FluxTransformer2DModel,),
    validate=validate,
    apply=apply,
    # double blocks, then single blocks; both return (text, image)
    blocks=BlockLayout(("transformer_blocks", "single_transformer_blocks"), joint=True,
                       batch_args=JOINT_BLOCK_BATCH_ARGS,
                       bypass_args=("controlnet_block_samples", "controlnet_single_block_samples")),  # fmt: skip
    configs=CONFIGS,
    inputs=inputs,
    text_len=lambda config: 512,
    traffic_shape=Shape(1, 64, 64, 512),  # 1024 px: 64 x 64 tokens
    traffic_depth={"num_layers": 2, "num_single_layers": 2},
    timestep_scale=1 / 1000,
    timestep_in_model_dtype=True,
    latent_packing=2,
    # diffusers' own plan (FluxTransformer2DModel._cp_plan), stated here: the image and text tokens and their
    # RoPE ids split along the sequence at the transformer's input (each rank's joint attention sees its text
    # and image shards), the image tokens gathered after proj_out
    parallel_plan={
        "": {"hidden_states": split(1, dims=3), "encoder_hidden_states": split(1, dims=3),
             "img_ids": split(0, dims=2), "txt_ids": split(0, dims=2)},
        "proj_out": gather(1, dims=3),
    },  # fmt: skip
)
