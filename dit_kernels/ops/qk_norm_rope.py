"""Per-head QK normalisation fused with rotary embeddings, written straight into a joint buffer.

Shapes: q [B, Sq, H, Dh], k and v [B, Sk, H, Dh] (Sq may differ from Sk), any strides with a unit last
stride (views of a fused QKV projection are read in place). Per tensor, all in fp32, one rounding::

    normed = rms:   x * rsqrt(mean(x^2) + eps) * weight (+ bias)           over Dh, per head
             layer: (x - mean) * rsqrt(var + eps) * weight + bias
             None:  x
    out    = normed * cos[r] + rotate(normed) * sin[r],   r = seq_offset + s   (when RoPE applies)

``rotate`` is diffusers' ``apply_rotary_emb(use_real=True)``: "interleaved" (``use_real_unbind_dim=-1``,
FLUX and HunyuanDiT) maps pairs (x0, x1) -> (-x1, x0); "half" (``-2``) maps halves (a, b) -> (-b, a).
cos/sin: [S_table, Dh] real tables (fp32); a table of one row is broadcast over the sequence, as diffusers
broadcasts it. V is copied unchanged. With ``out_q``/``out_k``/``out_v``
([B, S_total, H, Dh]) the results land at rows ``seq_offset ...`` of those buffers: that is how the
text and image streams of SD3 ([image, text]) and FLUX ([text, image]) meet in one joint attention
buffer without ``torch.cat``. One launch handles q, k and v.

``across_heads=True`` normalises each token's q (and k) over all its H * Dh values together instead of
per head (Wan's ``RMSNorm(heads * head_dim)``, diffusers' "rms_norm_across_heads"), with weight/bias of
[H * Dh]; the RoPE still rotates each head with the token's table row. Same launch, own kernel.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dit_kernels import backends
from dit_kernels.aot_spec import AotSpec
from dit_kernels.ops.dispatch import concrete_backend, launch_directly, register_custom_op, row_alignment

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a Linux dependency; without it only the torch and CUDA backends exist
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NORMS = {None: 0, "rms": 1, "layer": 2}
ROPE_LAYOUTS = ("interleaved", "half")
MAX_HEAD_DIM = 512


@dataclass(frozen=True)
class Slot:
    """One tensor of the launch: ``source`` [B, S, H, Dh] -> ``dest`` (same shape, possibly a view into a
    joint buffer); ``normalize``/``rotate`` say what applies; weight/bias [Dh] or None."""

    source: Tensor
    dest: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    normalize: bool
    rotate: bool


# ----------------------------------------------------------------------------------------- reference


def rotate_pairs(x: Tensor, rope: str) -> Tensor:
    """diffusers' ``x_rotated``: interleaved (x0, x1) -> (-x1, x0); half (a, b) -> (-b, a)."""
    if rope == "interleaved":
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((-x1, x0), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def swap_pairs(x: Tensor, rope: str) -> Tensor:
    """``rotate_pairs`` without its signs, one copy: interleaved (x0, x1) -> (x1, x0); half (a, b) -> (b, a)."""
    if rope == "interleaved":
        return torch.stack((x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def signed_rows(table: Tensor, rope: str) -> Tensor:
    """A fresh copy of ``table`` [..., Dh] negated where ``rotate_pairs`` negates (interleaved: even
    positions; half: the first half), so ``rotate_pairs(x) * sin == swap_pairs(x) * signed_rows(sin)``
    exactly (a sign flip rounds nothing)."""
    signed = table.clone(memory_format=torch.contiguous_format)
    negated = signed[..., ::2] if rope == "interleaved" else signed[..., : table.shape[-1] // 2]
    negated.neg_()
    return signed


def _reference_slot(slot: Slot, norm: Optional[str], eps: float, cos, sin, rope: str, seq_offset: int,
                    across_heads: bool) -> None:  # fmt: skip
    """The slot's math in fp32 (``F.rms_norm`` / ``F.layer_norm``: one fused op each), rounded once into
    ``slot.dest``. RoPE as ``swap_pairs(x) * signed_rows(sin) + x * cos``."""
    x = slot.source.float()
    normed = x.shape[-2:] if across_heads else x.shape[-1:]  # [H, Dh] or [Dh]
    weight, bias = (None if t is None else t.float().view(normed) for t in (slot.weight, slot.bias))
    if slot.normalize and norm == "layer":
        x = F.layer_norm(x, normed, weight, bias, eps)
    elif slot.normalize and norm == "rms":
        x = F.rms_norm(x, normed, weight, eps)
        x = x if bias is None else x + bias
    if slot.rotate:
        rows = slice(seq_offset, seq_offset + x.shape[1])
        # [S, H, Dh] tables: broadcast over the batch only (over the heads too, a [S, 1, Dh] operand costs ~3x)
        c, s = (t[rows, None].expand(-1, x.shape[-2], -1) for t in (cos, sin))
        x = swap_pairs(x, rope).mul_(signed_rows(s, rope)).add_(x * c.contiguous())
    slot.dest.copy_(x)


def _reference(slots, norm, eps, cos, sin, rope, seq_offset, across_heads) -> None:
    for slot in slots:
        _reference_slot(slot, norm, eps, cos, sin, rope, seq_offset, across_heads)


# ------------------------------------------------------------------------------------------ Triton

if triton is not None:

    @triton.jit
    def _load_pairs(row_ptr, row_ok, SPLIT_HALVES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):  # fmt: skip
        """The rows at ``row_ptr`` ([BLOCK_R, 1] pointers) as fp32 pairs ``(a, b)``, each [BLOCK_R, BLOCK_D // 2]:
        RoPE's rotation partners. Interleaved (and no RoPE): even and odd elements, split from one load of
        the whole tile (16-byte vectors when aligned); halves: the first and the second half."""
        if SPLIT_HALVES:
            cols = tl.arange(0, BLOCK_D // 2)
            mask = row_ok[:, None] & (cols < HEAD_DIM // 2)[None, :]
            a = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            b = tl.load(row_ptr + HEAD_DIM // 2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            cols = tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
            x = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            a, b = tl.split(tl.reshape(x, [BLOCK_R, BLOCK_D // 2, 2]))
        return a, b

    @triton.jit
    def _store_pairs(row_ptr, a, b, row_ok, SPLIT_HALVES: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        """Inverse of ``_load_pairs``: one store of the whole tile (interleaved), or of each half."""
        ty = row_ptr.dtype.element_ty
        if SPLIT_HALVES:
            cols = tl.arange(0, BLOCK_D // 2)
            mask = row_ok[:, None] & (cols < HEAD_DIM // 2)[None, :]
            tl.store(row_ptr + cols[None, :], a.to(ty), mask=mask)
            tl.store(row_ptr + HEAD_DIM // 2 + cols[None, :], b.to(ty), mask=mask)
        else:
            cols = tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
            tl.store(row_ptr + cols[None, :], tl.reshape(tl.join(a, b), [BLOCK_R, BLOCK_D]).to(ty), mask=mask)

    @triton.jit
    def _slot_rows(
        pid, x_ptr, x_sb, x_ss, x_sh, o_ptr, o_sb, o_ss, o_sh, w_ptr, b_ptr, cos_ptr, sin_ptr,
        batch, seq_len, heads, rope_offset, eps,
        NORM: tl.constexpr, ROTATE: tl.constexpr, HALF: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        HEAD_DIM: tl.constexpr, TABLE_STRIDE: tl.constexpr, ALIGN: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """BLOCK_R rows (b, s, h) of one tensor; each row is one head vector of HEAD_DIM values, held as
        pairs (a, b) of rotation partners, so RoPE needs no second load. Strides come divided by ALIGN
        (8 or 1): with 8 every row starts at a multiple of 8 elements, which Triton cannot infer from a
        head stride such as 88, and the loads and stores become 16-byte vectors."""
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < batch * seq_len * heads
        rows = rows.to(tl.int64)
        h = rows % heads
        s = (rows // heads) % seq_len
        b = rows // (heads * seq_len)
        split_halves: tl.constexpr = HALF and ROTATE
        x_row = x_ptr + ((b * x_sb + s * x_ss + h * x_sh) * ALIGN)[:, None]
        a, bb = _load_pairs(x_row, row_ok, split_halves, HEAD_DIM, BLOCK_R, BLOCK_D)
        pairs = tl.arange(0, BLOCK_D // 2)
        if split_halves:
            a_ok = pairs < HEAD_DIM // 2
            b_ok = a_ok
        else:
            a_ok = 2 * pairs < HEAD_DIM
            b_ok = 2 * pairs + 1 < HEAD_DIM
        if NORM == 1:
            rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=1) + tl.sum(bb * bb, axis=1)) / HEAD_DIM + eps)
            a = a * rstd[:, None]
            bb = bb * rstd[:, None]
        if NORM == 2:
            mean = (tl.sum(a, axis=1) + tl.sum(bb, axis=1)) / HEAD_DIM
            a = tl.where(a_ok[None, :], a - mean[:, None], 0.0)
            bb = tl.where(b_ok[None, :], bb - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=1) + tl.sum(bb * bb, axis=1)) / HEAD_DIM + eps)
            a = a * rstd[:, None]
            bb = bb * rstd[:, None]
        # weight and bias: the same vector at every row, loaded in the tile's layout (vector loads, no
        # layout conversion through shared memory; the repeats hit L1)
        vector = tl.zeros([BLOCK_R, 1], tl.int32)
        if HAS_W:
            wa, wb = _load_pairs(w_ptr + vector, row_ok, split_halves, HEAD_DIM, BLOCK_R, BLOCK_D)
            a = a * wa
            bb = bb * wb
        if HAS_B:
            ba, bw = _load_pairs(b_ptr + vector, row_ok, split_halves, HEAD_DIM, BLOCK_R, BLOCK_D)
            a = a + ba
            bb = bb + bw
        if ROTATE:
            table = ((rope_offset + s) * TABLE_STRIDE)[:, None]
            ca, cb = _load_pairs(cos_ptr + table, row_ok, split_halves, HEAD_DIM, BLOCK_R, BLOCK_D)
            sa, sb = _load_pairs(sin_ptr + table, row_ok, split_halves, HEAD_DIM, BLOCK_R, BLOCK_D)
            a, bb = a * ca - bb * sa, bb * cb + a * sb
        o_row = o_ptr + ((b * o_sb + s * o_ss + h * o_sh) * ALIGN)[:, None]
        _store_pairs(o_row, a, bb, row_ok, split_halves, HEAD_DIM, BLOCK_R, BLOCK_D)

    @triton.jit
    def _qk_norm_rope_kernel(
        q_ptr, q_sb, q_ss, q_sh, qo_ptr, qo_sb, qo_ss, qo_sh, qw_ptr, qb_ptr, q_len,
        k_ptr, k_sb, k_ss, k_sh, ko_ptr, ko_sb, ko_ss, ko_sh, kw_ptr, kb_ptr, k_len,
        v_ptr, v_sb, v_ss, v_sh, vo_ptr, vo_sb, vo_ss, vo_sh,
        cos_ptr, sin_ptr, batch, heads, rope_offset, eps,
        NORM_Q: tl.constexpr, ROTATE_Q: tl.constexpr, HAS_QW: tl.constexpr, HAS_QB: tl.constexpr,
        NORM_K: tl.constexpr, ROTATE_K: tl.constexpr, HAS_KW: tl.constexpr, HAS_KB: tl.constexpr,
        HAS_V: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr, TABLE_STRIDE: tl.constexpr,
        ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Grid (row tiles, 2 or 3): axis 1 picks q, k or v, so one launch serves all three. TABLE_STRIDE:
        elements between cos/sin rows (HEAD_DIM, or 0 for a one-row table broadcast over the sequence)."""
        pid = tl.program_id(0)
        which = tl.program_id(1)
        if which == 0:
            _slot_rows(pid, q_ptr, q_sb, q_ss, q_sh, qo_ptr, qo_sb, qo_ss, qo_sh, qw_ptr, qb_ptr, cos_ptr, sin_ptr,
                       batch, q_len, heads, rope_offset, eps, NORM_Q, ROTATE_Q, HALF, HAS_QW, HAS_QB,
                       HEAD_DIM, TABLE_STRIDE, ALIGN, BLOCK_R, BLOCK_D)  # fmt: skip
        elif which == 1:
            _slot_rows(pid, k_ptr, k_sb, k_ss, k_sh, ko_ptr, ko_sb, ko_ss, ko_sh, kw_ptr, kb_ptr, cos_ptr, sin_ptr,
                       batch, k_len, heads, rope_offset, eps, NORM_K, ROTATE_K, HALF, HAS_KW, HAS_KB,
                       HEAD_DIM, TABLE_STRIDE, ALIGN, BLOCK_R, BLOCK_D)  # fmt: skip
        elif HAS_V:
            _slot_rows(pid, v_ptr, v_sb, v_ss, v_sh, vo_ptr, vo_sb, vo_ss, vo_sh, v_ptr, v_ptr, v_ptr, v_ptr,
                       batch, k_len, heads, 0, eps, 0, False, HALF, False, False,
                       HEAD_DIM, TABLE_STRIDE, ALIGN, BLOCK_R, BLOCK_D)  # fmt: skip


    @triton.jit
    def _slot_tokens(
        pid, x_ptr, x_sb, x_ss, x_sh, o_ptr, o_sb, o_ss, o_sh, w_ptr, b_ptr, cos_ptr, sin_ptr,
        batch, seq_len, heads, dim, table_stride, rope_offset, eps,
        NORM: tl.constexpr, ROTATE: tl.constexpr, HALF: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """BLOCK_T tokens (b, s) of one tensor, each normalised over all its H * Dh values: heads in chunks
        of BLOCK_H, a pass for the mean (layer norm), one for the squares, one that normalises, rotates
        each head with the token's table row and stores (the token is re-read from L1/L2, not held: Wan
        14B's 5120 values would not fit a program's registers). Tiles [BLOCK_T, BLOCK_H, BLOCK_D]."""
        tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        token_ok = tokens < batch * seq_len
        tokens = tokens.to(tl.int64)
        s = tokens % seq_len
        b = tokens // seq_len
        x_tok = x_ptr + (b * x_sb + s * x_ss)[:, None, None]
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        chunk = tl.arange(0, BLOCK_H)
        count = heads * dim
        mean = tl.zeros([BLOCK_T], dtype=tl.float32)
        rstd = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
        if NORM == 2:
            total = tl.zeros([BLOCK_T], dtype=tl.float32)
            for h0 in range(0, heads, BLOCK_H):
                h = h0 + chunk
                mask = token_ok[:, None, None] & ((h < heads)[:, None] & col_ok[None, :])[None, :, :]
                x = tl.load(x_tok + (h.to(tl.int64) * x_sh)[None, :, None] + cols[None, None, :], mask=mask, other=0.0)
                total += tl.sum(tl.sum(x.to(tl.float32), axis=2), axis=1)
            mean = total / count
        if NORM != 0:
            squares = tl.zeros([BLOCK_T], dtype=tl.float32)
            for h0 in range(0, heads, BLOCK_H):
                h = h0 + chunk
                mask = token_ok[:, None, None] & ((h < heads)[:, None] & col_ok[None, :])[None, :, :]
                x = tl.load(x_tok + (h.to(tl.int64) * x_sh)[None, :, None] + cols[None, None, :], mask=mask, other=0.0)
                centred = tl.where(mask, x.to(tl.float32) - mean[:, None, None], 0.0)
                squares += tl.sum(tl.sum(centred * centred, axis=2), axis=1)
            rstd = 1.0 / tl.sqrt(squares / count + eps)
        if ROTATE:
            if HALF:
                partner = tl.where(cols < dim // 2, cols + dim // 2, cols - dim // 2)
                sign = tl.where(cols < dim // 2, -1.0, 1.0)
            else:
                partner = cols ^ 1
                sign = tl.where(cols % 2 == 0, -1.0, 1.0)
            table = ((rope_offset + s) * table_stride)[:, None, None] + cols[None, None, :]
            table_ok = token_ok[:, None, None] & col_ok[None, None, :]
            c = tl.load(cos_ptr + table, mask=table_ok, other=0.0)
            sn = tl.load(sin_ptr + table, mask=table_ok, other=0.0)
        for h0 in range(0, heads, BLOCK_H):
            h = (h0 + chunk).to(tl.int64)
            head_ok = (h < heads)[:, None] & col_ok[None, :]
            mask = token_ok[:, None, None] & head_ok[None, :, :]
            x_head = x_tok + (h * x_sh)[None, :, None]
            x = tl.load(x_head + cols[None, None, :], mask=mask, other=0.0).to(tl.float32)
            x = (x - mean[:, None, None]) * rstd[:, None, None]
            vector = (h * dim)[:, None]  # weight / bias [H * Dh]: this chunk's heads
            if ROTATE:
                xp = tl.load(x_head + partner[None, None, :], mask=mask, other=0.0).to(tl.float32)
                xp = (xp - mean[:, None, None]) * rstd[:, None, None]
            if HAS_W:
                x = x * tl.load(w_ptr + vector + cols[None, :], mask=head_ok, other=0.0).to(tl.float32)[None, :, :]
                if ROTATE:
                    wp = tl.load(w_ptr + vector + partner[None, :], mask=head_ok, other=0.0).to(tl.float32)
                    xp = xp * wp[None, :, :]
            if HAS_B:
                x = x + tl.load(b_ptr + vector + cols[None, :], mask=head_ok, other=0.0).to(tl.float32)[None, :, :]
                if ROTATE:
                    bp = tl.load(b_ptr + vector + partner[None, :], mask=head_ok, other=0.0).to(tl.float32)
                    xp = xp + bp[None, :, :]
            if ROTATE:
                x = x * c + sign[None, None, :] * xp * sn
            o_head = o_ptr + (b * o_sb + s * o_ss)[:, None, None] + (h * o_sh)[None, :, None]
            tl.store(o_head + cols[None, None, :], x.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_across_kernel(
        q_ptr, q_sb, q_ss, q_sh, qo_ptr, qo_sb, qo_ss, qo_sh, qw_ptr, qb_ptr, q_len,
        k_ptr, k_sb, k_ss, k_sh, ko_ptr, ko_sb, ko_ss, ko_sh, kw_ptr, kb_ptr, k_len,
        v_ptr, v_sb, v_ss, v_sh, vo_ptr, vo_sb, vo_ss, vo_sh,
        cos_ptr, sin_ptr, batch, heads, dim, table_stride, rope_offset, eps,
        NORM_Q: tl.constexpr, ROTATE_Q: tl.constexpr, HAS_QW: tl.constexpr, HAS_QB: tl.constexpr,
        NORM_K: tl.constexpr, ROTATE_K: tl.constexpr, HAS_KW: tl.constexpr, HAS_KB: tl.constexpr,
        HAS_V: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """``across_heads``: the grid of ``_qk_norm_rope_kernel`` over token tiles (axis 1: q, k or v)."""
        pid = tl.program_id(0)
        which = tl.program_id(1)
        if which == 0:
            _slot_tokens(pid, q_ptr, q_sb, q_ss, q_sh, qo_ptr, qo_sb, qo_ss, qo_sh, qw_ptr, qb_ptr, cos_ptr, sin_ptr,
                         batch, q_len, heads, dim, table_stride, rope_offset, eps, NORM_Q, ROTATE_Q, HALF, HAS_QW,
                         HAS_QB, BLOCK_T, BLOCK_H, BLOCK_D)  # fmt: skip
        elif which == 1:
            _slot_tokens(pid, k_ptr, k_sb, k_ss, k_sh, ko_ptr, ko_sb, ko_ss, ko_sh, kw_ptr, kb_ptr, cos_ptr, sin_ptr,
                         batch, k_len, heads, dim, table_stride, rope_offset, eps, NORM_K, ROTATE_K, HALF, HAS_KW,
                         HAS_KB, BLOCK_T, BLOCK_H, BLOCK_D)  # fmt: skip
        elif HAS_V:
            _slot_tokens(pid, v_ptr, v_sb, v_ss, v_sh, vo_ptr, vo_sb, vo_ss, vo_sh, v_ptr, v_ptr, v_ptr, v_ptr,
                         batch, k_len, heads, dim, 0, 0, eps, 0, False, HALF, False, False,
                         BLOCK_T, BLOCK_H, BLOCK_D)  # fmt: skip

@dataclass(frozen=True)
class TritonConfig:
    """Rows per program and warps for one head dim; every value the rule yields is in triton_configs()."""

    block_r: int
    block_d: int
    num_warps: int


def triton_config(head_dim: int) -> TritonConfig:
    """~2048-element tiles at 8 fp32 values per thread (a RoPE tile of 64 rows x 128 at 4 warps spills)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"qk_norm_rope takes head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    block_r = max(1, 2048 // block_d)
    return TritonConfig(block_r, block_d, block_r * block_d // 256)


def triton_configs() -> list[TritonConfig]:
    return sorted({triton_config(1 << p) for p in range(MAX_HEAD_DIM.bit_length())}, key=lambda c: c.block_d)


@dataclass(frozen=True)
class AcrossConfig:
    """``across_heads``: tokens per program, heads per chunk and warps for one head dim (every value the
    rule yields is in ``across_configs()``)."""

    block_t: int
    block_h: int
    block_d: int
    num_warps: int


def across_config(head_dim: int) -> AcrossConfig:
    """2048-element tiles at 8 fp32 values per thread: chunks of up to 16 heads (Dh 128: one token per
    program, Wan's 12 / 40 heads in 1 / 3 chunks), several tokens per program for small heads."""
    block_d = triton_config(head_dim).block_d
    block_h = min(16, 2048 // block_d)
    return AcrossConfig(2048 // (block_h * block_d), block_h, block_d, 8)


def across_configs() -> list[AcrossConfig]:
    return sorted({across_config(1 << p) for p in range(MAX_HEAD_DIM.bit_length())}, key=lambda c: c.block_d)


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_triton(slots, norm, eps, cos, sin, rope, seq_offset, across_heads) -> None:
    from torch.library import wrap_triton

    if across_heads:
        return _launch_triton_across(slots, norm, eps, cos, sin, rope, seq_offset)
    q, k, *rest = slots
    v = rest[0] if rest else None
    batch, _, heads, dim = q.source.shape
    config = triton_config(dim)
    rows = max(slot.source.shape[1] for slot in slots) * batch * heads
    tensors = [t for slot in slots for t in (slot.source, slot.dest)]
    align = row_alignment(tensors, [s for t in tensors for s in _strides(t)])
    table = q.source if cos is None else cos
    tables = (table, table if sin is None else sin)
    vs = (_triton_tensor(v.source, align), _triton_tensor(v.dest, align)) if v else ((q.source, 0, 0, 0),) * 2
    wrap_triton(_qk_norm_rope_kernel)[(triton.cdiv(rows, config.block_r), len(slots))](
        *_triton_slot(q, align), q.source.shape[1], *_triton_slot(k, align), k.source.shape[1], *vs[0], *vs[1],
        *tables, batch, heads, seq_offset, eps,
        NORM_Q=NORMS[norm] if q.normalize else 0, ROTATE_Q=q.rotate, HAS_QW=q.weight is not None,
        HAS_QB=q.bias is not None, NORM_K=NORMS[norm] if k.normalize else 0, ROTATE_K=k.rotate,
        HAS_KW=k.weight is not None, HAS_KB=k.bias is not None, HAS_V=v is not None, HALF=rope == "half",
        HEAD_DIM=dim, TABLE_STRIDE=0 if cos is None else cos.stride(0), ALIGN=align,
        BLOCK_R=config.block_r, BLOCK_D=config.block_d, num_warps=config.num_warps,
    )  # fmt: skip


def _launch_triton_across(slots, norm, eps, cos, sin, rope, seq_offset) -> None:
    from torch.library import wrap_triton

    q, k, *rest = slots
    v = rest[0] if rest else None
    batch, _, heads, dim = q.source.shape
    config = across_config(dim)
    tokens = max(slot.source.shape[1] for slot in slots) * batch
    table = q.source if cos is None else cos
    tables = (table, table if sin is None else sin)
    vs = (_triton_tensor(v.source, 1), _triton_tensor(v.dest, 1)) if v else ((q.source, 0, 0, 0),) * 2
    wrap_triton(_qk_norm_rope_across_kernel)[(triton.cdiv(tokens, config.block_t), len(slots))](
        *_triton_slot(q, 1), q.source.shape[1], *_triton_slot(k, 1), k.source.shape[1], *vs[0], *vs[1],
        *tables, batch, heads, dim, 0 if cos is None else cos.stride(0), seq_offset, eps,
        NORM_Q=NORMS[norm] if q.normalize else 0, ROTATE_Q=q.rotate, HAS_QW=q.weight is not None,
        HAS_QB=q.bias is not None, NORM_K=NORMS[norm] if k.normalize else 0, ROTATE_K=k.rotate,
        HAS_KW=k.weight is not None, HAS_KB=k.bias is not None, HAS_V=v is not None, HALF=rope == "half",
        BLOCK_T=config.block_t, BLOCK_H=config.block_h, BLOCK_D=config.block_d, num_warps=config.num_warps,
    )  # fmt: skip


def _triton_tensor(t: Tensor, align: int) -> tuple:
    return (t, *(s // align for s in _strides(t)))


def _triton_slot(slot: Slot, align: int):
    absent = slot.source  # a valid pointer that the slot's flags never read
    return (
        *_triton_tensor(slot.source, align), *_triton_tensor(slot.dest, align),
        absent if slot.weight is None else slot.weight, absent if slot.bias is None else slot.bias,
    )  # fmt: skip


# ------------------------------------------------------------------------------ CUDA C++ (_C, _C_cpu)

MAX_CUDA_HEAD_DIM = 512  # kQkNormRopeMaxHeadDim (csrc/include/dit_kernels/params.h); the binding checks it too


def _launch_native(module, stream: int, slots, norm, eps, cos, sin, rope, seq_offset, across_heads) -> None:
    """One launch of qk_norm_rope_kernel (csrc/include/dit_kernels/qk_norm_rope.cuh), or with ``across_heads``
    of qk_norm_rope_across_kernel (qk_norm_rope_across.cuh), for all slots."""
    q, k, *rest = slots
    batch, _, heads, dim = q.source.shape
    if dim > MAX_CUDA_HEAD_DIM:
        raise ValueError(f"the CUDA qk_norm_rope kernel takes head_dim <= {MAX_CUDA_HEAD_DIM}, got {dim}")
    absent = (0,) * 11 + (False, False)
    module.qk_norm_rope(
        str(q.source.dtype).removeprefix("torch."), batch, heads, dim,
        _native_slot(q), _native_slot(k), _native_slot(rest[0]) if rest else absent,
        NORMS[norm], eps, _pointer(cos), _pointer(sin), seq_offset, 0 if cos is None else cos.stride(0),
        rope == "half", across_heads, stream,
    )  # fmt: skip


def _pointer(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _native_slot(slot: Slot) -> tuple:
    """(src, strides, seq_len, dest, strides, weight, bias, normalize, rotate); weight and bias only
    when the slot is normalised (the kernel reads them only then)."""
    weight, bias = (slot.weight, slot.bias) if slot.normalize else (None, None)
    return (
        slot.source.data_ptr(), *_strides(slot.source), slot.source.shape[1],
        slot.dest.data_ptr(), *_strides(slot.dest),
        _pointer(weight), _pointer(bias), slot.normalize, slot.rotate,
    )  # fmt: skip


def _launch_cuda(slots, norm, eps, cos, sin, rope, seq_offset, across_heads) -> None:
    stream = torch.cuda.current_stream(slots[0].source.device).cuda_stream
    _launch_native(backends.native_module(), stream, slots, norm, eps, cos, sin, rope, seq_offset, across_heads)


def _launch_cuda_emu(slots, norm, eps, cos, sin, rope, seq_offset, across_heads) -> None:
    _launch_native(backends.emulation_module(), 0, slots, norm, eps, cos, sin, rope, seq_offset, across_heads)


# ------------------------------------------------------------------------------------ launcher table

_LAUNCHERS = {"torch": _reference, "cuda": _launch_cuda, "cuda_emu": _launch_cuda_emu}
if triton is not None:
    _LAUNCHERS["triton"] = _launch_triton


def _execute(launch, q, k, v, q_weight, k_weight, q_bias, k_bias, cos, sin, out_q, out_k, out_v,
             norm, rope, rope_q, rope_k, seq_offset, eps, across_heads) -> list[Tensor]:  # fmt: skip
    """One launch; returns the written tensors: fresh ones, or ``out_q/out_k/out_v`` (the rows of the
    joint buffers that q, k, v fill) when given."""
    sources = [t for t in (q, k, v) if t is not None]
    if out_q is None:
        dests = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in sources]
    else:
        dests = [out_q, out_k, *([out_v] if v is not None else [])]
    rotate = cos is not None
    normalize = norm is not None
    slots = [
        Slot(q, dests[0], q_weight, q_bias, normalize, rotate and rope_q),
        Slot(k, dests[1], k_weight, k_bias, normalize, rotate and rope_k),
        *([Slot(v, dests[2], None, None, False, False)] if v is not None else []),
    ]
    launch(slots, norm, eps, cos, sin, rope, seq_offset, across_heads)
    return dests


def _joint_rows(buffer: Tensor, t: Tensor, seq_offset: int) -> Tensor:
    """The rows of the joint buffer that ``t`` fills."""
    return buffer[:, seq_offset : seq_offset + t.shape[1]]


# ---------------------------------------------------------------------------------------- custom ops


def _register_ops(backend: str, launch):
    """Two custom ops per backend: ``dit_kernels::qk_norm_rope_<backend>`` (fresh outputs; an absent v gives
    an empty tensor) and ``..._into_<backend>``, which writes the given rows of the joint buffers (a custom op
    may not return views of its inputs; it mutates them, so a dispatch mode sees exactly the bytes written)."""

    def functional(
        q: Tensor, k: Tensor, v: Optional[Tensor], q_weight: Optional[Tensor], k_weight: Optional[Tensor],
        q_bias: Optional[Tensor], k_bias: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
        norm: Optional[str], rope: str, rope_q: bool, rope_k: bool, seq_offset: int, eps: float, across_heads: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        outs = _execute(launch, q, k, v, q_weight, k_weight, q_bias, k_bias, cos, sin, None, None, None,
                        norm, rope, rope_q, rope_k, seq_offset, eps, across_heads)  # fmt: skip
        return outs[0], outs[1], outs[2] if v is not None else q.new_empty(0)

    def into(
        q: Tensor, k: Tensor, v: Optional[Tensor], q_weight: Optional[Tensor], k_weight: Optional[Tensor],
        q_bias: Optional[Tensor], k_bias: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
        out_q: Tensor, out_k: Tensor, out_v: Optional[Tensor], norm: Optional[str], rope: str, rope_q: bool,
        rope_k: bool, seq_offset: int, eps: float, across_heads: bool,
    ) -> None:  # fmt: skip
        _execute(launch, q, k, v, q_weight, k_weight, q_bias, k_bias, cos, sin, out_q, out_k, out_v,
                 norm, rope, rope_q, rope_k, seq_offset, eps, across_heads)  # fmt: skip

    def functional_fake(q, k, v, *_):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v) if v is not None else q.new_empty(0)

    return (
        register_custom_op("qk_norm_rope", backend, functional, fake=functional_fake),
        register_custom_op("qk_norm_rope_into", backend, into, mutates_args=("out_q", "out_k", "out_v"),
                           fake=lambda *_: None),
    )  # fmt: skip


_CUSTOM_OPS = {backend: _register_ops(backend, launch) for backend, launch in _LAUNCHERS.items()}


# ------------------------------------------------------------------------------------ validation


def _validate(q, k, v, weights: dict, cos, sin, out: dict, norm, rope, seq_offset, rope_q: bool, rope_k: bool,
              across_heads: bool) -> None:  # fmt: skip
    for name, t in {"q": q, "k": k}.items():
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a [B, S, H, Dh] tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"qk_norm_rope takes {[str(d) for d in SUPPORTED_DTYPES]}, got {q.dtype}")
    batch, _, heads, dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, heads, dim):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and Dh")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if rope not in ROPE_LAYOUTS:
        raise ValueError(f"rope must be one of {ROPE_LAYOUTS}, got {rope!r}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin go together")
    if norm is None and any(w is not None for w in weights.values()):
        raise ValueError("norm weights/biases given with norm=None")
    for name, t in {"k": k, "v": v, **weights, **out}.items():
        if t is not None and (t.dtype != q.dtype or t.device != q.device):
            raise TypeError(f"{name} is {t.dtype} on {t.device}, but q is {q.dtype} on {q.device}")
    width = heads * dim if across_heads else dim  # the values one norm covers
    for name, t in weights.items():
        if t is not None and tuple(t.shape) != (width,):
            scope = f" (across_heads: H * Dh = {heads} * {dim})" if across_heads else ""
            raise ValueError(f"{name} must have shape [{width}]{scope}, got {tuple(t.shape)}")
    if cos is not None:
        _validate_tables(cos, sin, q, k, seq_offset, rope_q, rope_k)
    _validate_outputs(out, {"out_q": q, "out_k": k, "out_v": v}, seq_offset)


def _validate_tables(cos, sin, q, k, seq_offset, rope_q: bool, rope_k: bool) -> None:
    dim = q.shape[-1]
    if dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {dim}")
    for name, t in {"cos": cos, "sin": sin}.items():
        if t.dim() != 2 or t.shape[1] != dim or not t.is_floating_point() or t.device != q.device:
            raise ValueError(f"{name} must be a float [S_table, {dim}] table on {q.device}, got {t.dtype} {tuple(t.shape)}")
    # only the rotated tensors' rows are read (HunyuanDiT's cross-attention: q only, k may be longer)
    needed = seq_offset + max(q.shape[1] if rope_q else 0, k.shape[1] if rope_k else 0)
    for t in (cos, sin):
        if t.shape[0] != 1 and t.shape[0] < needed:
            raise ValueError(
                f"cos/sin have {t.shape[0]} rows; rows up to seq_offset + S = {needed} are read "
                "(or one row, broadcast over the sequence)"
            )


def _validate_outputs(out: dict, sources: dict, seq_offset: int) -> None:
    given = {name for name, t in out.items() if t is not None}
    wanted = {name for name, t in sources.items() if t is not None}
    if given and given != wanted:
        raise ValueError(f"give all of {sorted(wanted)} (one joint buffer each) or none, got {sorted(given)}")
    for name in given:
        buffer, source = out[name], sources[name]
        batch, seq, heads, dim = source.shape
        if buffer.dim() != 4 or (buffer.shape[0], buffer.shape[2], buffer.shape[3]) != (batch, heads, dim):
            raise ValueError(f"{name} must be [{batch}, S_total, {heads}, {dim}], got {tuple(buffer.shape)}")
        if buffer.shape[1] < seq_offset + seq:
            raise ValueError(f"{name} has {buffer.shape[1]} rows; seq_offset {seq_offset} + S {seq} do not fit")
        if buffer.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride")


def rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """diffusers' real (cos, sin) pair as the fp32 contiguous [S_table, Dh] tables the kernels read.

    No copy when they already are (FLUX's and HunyuanDiT's are); model patchers call this once per
    transformer call and hand the result to every block, so no block converts the tables again."""
    return cos.float().contiguous(), sin.float().contiguous()


def _broadcast_rows(cos: Tensor, sin: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """One-row tables (diffusers broadcasts them over the sequence) as [rows, Dh] views with a row
    stride of 0, no copy: every launcher reads row ``r`` at ``r * table.stride(0)``."""
    return tuple(t.expand(rows, -1) if t.shape[0] == 1 else t for t in (cos, sin))


def _unit_last_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------- public


def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    *,
    norm: Optional[str] = "rms",
    q_weight: Optional[Tensor] = None,
    k_weight: Optional[Tensor] = None,
    q_bias: Optional[Tensor] = None,
    k_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
    rope: str = "interleaved",
    rope_q: bool = True,
    rope_k: bool = True,
    out_q: Optional[Tensor] = None,
    out_k: Optional[Tensor] = None,
    seq_offset: int = 0,
    v: Optional[Tensor] = None,
    out_v: Optional[Tensor] = None,
    across_heads: bool = False,
    backend: Optional[str] = None,
):
    """Per-head norm of q and k over Dh (``across_heads``: over each token's H * Dh values, weight/bias
    [H * Dh]), then RoPE (rows ``seq_offset + s`` of cos/sin), V copied along.

    Returns ``(q_out, k_out)``, or ``(q_out, k_out, v_out)`` when ``v`` is given: fresh [B, S, H, Dh]
    tensors, or, when the ``out_*`` joint buffers are given, the views of them that were written."""
    weights = {"q_weight": q_weight, "k_weight": k_weight, "q_bias": q_bias, "k_bias": k_bias}
    outputs = {"out_q": out_q, "out_k": out_k, "out_v": out_v}
    _validate(q, k, v, weights, cos, sin, outputs, norm, rope, seq_offset, rope_q, rope_k, across_heads)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    if cos is not None:
        cos, sin = _broadcast_rows(*rope_tables(cos, sin), seq_offset + max(q.shape[1], k.shape[1]))
    backend = concrete_backend(backend, q.device)
    args = (q, k, v, q_weight, k_weight, q_bias, k_bias, cos, sin)
    flags = (norm, rope, rope_q, rope_k, seq_offset, float(eps), bool(across_heads))
    dests = (None,) * 3 if out_q is None else tuple(
        None if t is None else _joint_rows(o, t, seq_offset) for o, t in ((out_q, q), (out_k, k), (out_v, v))
    )
    if launch_directly(backend):
        return tuple(_execute(_LAUNCHERS[backend], *args, *dests, *flags))
    functional, into = _CUSTOM_OPS[backend]
    if out_q is None:
        outs = functional(*args, *flags)
        return outs if v is not None else outs[:2]
    into(*args, *dests, *flags)
    return tuple(d for d in dests if d is not None)


# ------------------------------------------------------------------------------------ AOT fit specs


# Head dims compiled per BLOCK_D, 16-byte aligned rows (ALIGN 8): the power of two itself and the model
# head dims that pad to it (8: tiny test configs; 72: DiT/PixArt; 88: HunyuanDiT). Unaligned rows (ALIGN
# 1, no pointer known aligned) at one odd width per layout.
AOT_HEAD_DIMS = {16: (8, 16), 32: (32,), 64: (64,), 128: (72, 88, 128), 256: (256,), 512: (512,)}
AOT_UNALIGNED_HEAD_DIM = 100
# (dtype, head_dim, rope, aligned) compiled by the default test run: the RoPE models' head dims, fp32, the half
# layout and the scalar path
AOT_REPRESENTATIVE = {("bf16", 72, "interleaved", True), ("bf16", 88, "interleaved", True),
                      ("bf16", 128, "interleaved", True), ("fp32", 128, "interleaved", True),
                      ("bf16", 128, "half", True), ("bf16", 100, "interleaved", False)}  # fmt: skip


def aot_spec(dtype: str, head_dim: int, rope: str = "interleaved", aligned: bool = True):
    """The AotSpec of the kernel the launcher runs for ``dtype`` ("fp32"/"bf16"), ``head_dim``, RoPE layout
    and row alignment, with every feature on (LayerNorm + weight + bias + RoPE on q and k, V copied).
    Aligned: ALIGN 8 and 16-byte aligned pointers (torch allocations), so every global load and store must
    be a vector (``vector_io``; the half layout only where its halves are 16-byte aligned too); unaligned:
    ALIGN 1, nothing known aligned (scalar accesses allowed)."""
    config = triton_config(head_dim)
    signature = _slots_signature(f"*{dtype}")
    signature |= {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "batch": "i32", "heads": "i32", "rope_offset": "i32",
                  "eps": "fp32"}  # fmt: skip
    flags = {"NORM_Q": 2, "ROTATE_Q": True, "HAS_QW": True, "HAS_QB": True}
    flags |= {"NORM_K": 2, "ROTATE_K": True, "HAS_KW": True, "HAS_KB": True, "HAS_V": True}
    constexprs = flags | {"HALF": rope == "half", "HEAD_DIM": head_dim, "TABLE_STRIDE": head_dim}
    constexprs |= {"ALIGN": 8 if aligned else 1, "BLOCK_R": config.block_r, "BLOCK_D": config.block_d}
    halves_aligned = rope == "interleaved" or (head_dim // 2) % 8 == 0
    return AotSpec.build(
        f"qk_norm_rope[{dtype},{rope},Dh={head_dim},{'aligned' if aligned else 'unaligned'},"
        f"BLOCK_R={config.block_r},BLOCK_D={config.block_d},warps={config.num_warps}]",
        _qk_norm_rope_kernel, signature, constexprs, num_warps=config.num_warps,
        divisible_by_16=None if aligned else (), vector_io=aligned and halves_aligned,
        representative=(dtype, head_dim, rope, aligned) in AOT_REPRESENTATIVE,
    )  # fmt: skip


def aot_specs():
    """Every config ``triton_config`` can pick, at every head dim of ``AOT_HEAD_DIMS``, fp32 and bf16, both
    RoPE layouts, aligned rows; plus unaligned rows at ``AOT_UNALIGNED_HEAD_DIM``."""
    cases = [(dtype, dim, rope, True) for dtype, dims, rope in itertools.product(
        ("fp32", "bf16"), AOT_HEAD_DIMS.values(), ROPE_LAYOUTS) for dim in dims]  # fmt: skip
    cases += [(dtype, AOT_UNALIGNED_HEAD_DIM, rope, False) for dtype in ("fp32", "bf16") for rope in ROPE_LAYOUTS]
    return [aot_spec(*case) for case in cases] + _across_aot_specs()


def _slots_signature(pointer: str) -> dict:
    """The q, k, v slot parameters every qk_norm_rope kernel starts with (strides as i32, as the AOT
    check's sizes fit)."""
    signature = {}
    for name in ("q", "k", "v"):
        signature |= {f"{name}_ptr": pointer} | {f"{name}_{s}": "i32" for s in ("sb", "ss", "sh")}
        signature |= {f"{name}o_ptr": pointer} | {f"{name}o_{s}": "i32" for s in ("sb", "ss", "sh")}
        if name != "v":
            signature |= {f"{name}w_ptr": pointer, f"{name}b_ptr": pointer, f"{name}_len": "i32"}
    return signature


def _across_aot_specs():
    """``across_heads``: every config ``across_config`` can pick, every feature on, as bf16 with interleaved
    RoPE (Wan's) and as fp32 with the half layout: each config, dtype and layout compiled at least once for
    half the compile time of all four pairings (all four fit with 0 spills, at most 136 registers, measured
    with ``python -m dit_kernels.aot -k qk_norm_rope_across``). Representative: Wan's (bf16, head dim 128)."""
    specs = []
    for (dtype, half), config in itertools.product((("bf16", False), ("fp32", True)), across_configs()):
        signature = _slots_signature(f"*{dtype}") | {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "batch": "i32",
                                                     "heads": "i32", "dim": "i32", "table_stride": "i32",
                                                     "rope_offset": "i32", "eps": "fp32"}  # fmt: skip
        flags = {"NORM_Q": 2, "ROTATE_Q": True, "HAS_QW": True, "HAS_QB": True}
        flags |= {"NORM_K": 2, "ROTATE_K": True, "HAS_KW": True, "HAS_KB": True, "HAS_V": True, "HALF": half}
        blocks = {"BLOCK_T": config.block_t, "BLOCK_H": config.block_h, "BLOCK_D": config.block_d}
        name = ",".join(f"{k}={v}" for k, v in blocks.items())
        specs.append(AotSpec.build(
            f"qk_norm_rope_across[{dtype},{'half' if half else 'interleaved'},{name},warps={config.num_warps}]",
            _qk_norm_rope_across_kernel, signature, flags | blocks, num_warps=config.num_warps,
            representative=dtype == "bf16" and config.block_d == 128,
        ))  # fmt: skip
    return specs
