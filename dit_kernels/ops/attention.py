"""Joint (self- or cross-) attention over [B, S, H, Dh]: one op, a backend choice, one Triton kernel.

Layout: q [B, Sq, H, Dh], k and v [B, Skv, H, Dh] (the layout of diffusers' ``dispatch_attention_fn``);
Sq may differ from Skv (cross-attention). Any strides with a unit last stride are read in place (q, k, v
may be views of a fused QKV projection [B, S, 3, H, Dh] or of a joint buffer); a strided last dim is
copied. Output [B, Sq, H, Dh] in q's dtype. Math::

    out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h] + bias[b, j]) v[b, j, h]

``scale`` defaults to 1/sqrt(Dh). ``mask`` is a key-padding mask, [B, Skv] or the [B, 1, Skv] /
[B, 1, 1, Skv] forms diffusers builds (a leading 1 broadcasts over the batch):

- bool: True = attend (SDPA's convention); False keys are left out;
- float (any float dtype): an additive bias (0 / -inf, or PixArt's ``(1 - mask) * -10000.0``). A bias
  at or below ``MASKED_BIAS`` (-1e38: ``torch.finfo(float32 or bfloat16).min``) counts as -inf, that
  key is left out; any other finite bias is added as it is (so a row padded with -10000 everywhere is
  the plain mean of V, exactly as in eager diffusers).

**Fully masked rows** (every key of a batch element left out, or Skv == 0) give **0**, on every
backend. For reference: PyTorch SDPA on CPU (torch >= 2.5, math and CPU-flash kernels) also returns 0
for a bool or -inf mask, but the mean of V for a finite finfo.min bias; CUDA's memory-efficient SDPA
kernel has returned NaN for such rows (pytorch#110213). The "torch" backend therefore zeroes those rows
after SDPA (``torch.where``, a no-op bit for bit everywhere else).

Backends:

- ``"torch"``: ``F.scaled_dot_product_attention`` on transposed views (``to_heads_first``), **in the
  input dtype**, the call eager diffusers makes (same function, same dtype, no upcast: a patched model
  on this backend computes what eager computes, up to the fully-masked-row rule above). It is the CPU
  path. Decided so because it is the baseline users compare against; parity tests measure every
  backend against an fp32 SDPA "truth", bounded by 2x what this low-precision eager path errs.
- ``"triton"``: the flash-attention forward below: one program per (query tile, batch*head), online
  softmax in fp32 (exp2 domain), fp32 accumulation, bf16/fp16 ``tl.dot`` operands on the GPU. fp32
  inputs run only under the interpreter (fp32 operands, IEEE dots: also how bf16/fp16 run there, as
  the interpreter's bf16 dots are wrong); on CUDA, fp32 goes to SDPA (fp32 tiles spill: see AOT).
  Head dims up to 256: ``BLOCK_D = max(16, next_pow2(Dh))`` with masked loads (72, 88 -> 128; 8 -> 16,
  since ``tl.dot`` needs K >= 16). Tiles come from ``triton_config`` (a rule, no autotuning).
  Registered as the torch custom op ``dit_kernels::joint_attention_triton`` (opaque under
  torch.compile); eager calls skip the dispatcher.
- ``"flash_attn"``: flash-attention 3 (``flash_attn_interface``, Hopper) or 2 (``flash_attn``); CUDA,
  fp16/bf16, no mask, head dims up to 256. Preferred wherever it runs: it pads 72 and 88 to 96 (75 % /
  92 % of its MMA work useful) where our kernel pads to 128 (56 % / 69 %), and ours reaches ~45-60 % of
  flash-attention 3 at 128 (kernel review estimate; no GPU has measured it yet).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention``; CUDA, no mask (a key-padding bias would
  need xformers' padded bias tensors: such calls go to SDPA or Triton instead).
- ``None`` / ``"auto"``: see ``attention_backend``. Optional packages are imported lazily, never required.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dit_kernels import backends
from dit_kernels.aot_spec import AotSpec
from dit_kernels.ops.dispatch import launch_directly, register_custom_op, row_alignment

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a Linux dependency; without it the Triton backend does not exist
    triton = None

log = logging.getLogger("dit_kernels")

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "torch", "triton", "flash_attn", "xformers")
MAX_TRITON_HEAD_DIM = 256
MASKED_BIAS = -1.0e38  # an additive bias at or below this is -inf (the key is masked out)
LOG2E = 1.4426950408889634
FLASH_MAX_HEAD_DIM = 256


# -------------------------------------------------------------------------------------- layout helpers


def to_heads_first(x: Tensor) -> Tensor:
    """[B, S, H, D] -> [B, H, S, D] as a view (no copy): the layout of the legacy SDPA stack."""
    _require_4d(x, "x")
    return x.transpose(1, 2)


def to_seq_first(x: Tensor) -> Tensor:
    """[B, H, S, D] -> [B, S, H, D] as a view (no copy): back to the dispatch_attention_fn layout."""
    _require_4d(x, "x")
    return x.transpose(1, 2)


# ----------------------------------------------------------------------------------------- reference


def _live_batches(mask: Tensor) -> Tensor:
    """[Bm] bool: does batch element b keep at least one key? (bool mask, or a bias above MASKED_BIAS)"""
    keep = mask if mask.dtype == torch.bool else mask.float() > MASKED_BIAS
    return keep.any(dim=-1)


def _reference(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """PyTorch SDPA in the input dtype on [B, H, S, D] views; ``mask`` is [Bm, Skv] (Bm in {1, B}).
    Returns a [B, Sq, H, Dh] view of SDPA's output (non-contiguous, as diffusers' own path)."""
    attn_mask = None
    if mask is not None:
        attn_mask = mask if mask.dtype in (torch.bool, q.dtype) else mask.to(q.dtype)
        attn_mask = attn_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        to_heads_first(q), to_heads_first(k), to_heads_first(v), attn_mask=attn_mask, scale=scale
    )
    if mask is not None:  # fully masked rows -> 0 (SDPA gives 0, the mean of V or NaN depending on kernel)
        out = torch.where(_live_batches(mask)[:, None, None, None], out, 0.0)
    return to_seq_first(out)


# -------------------------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _attention_fwd_kernel(
        o_ptr, q_ptr, k_ptr, v_ptr, mask_ptr,
        o_sb, o_ss, o_sh,
        q_sb, q_ss, q_sh,
        k_sb, k_ss, k_sh,
        v_sb, v_ss, v_sh,
        mask_sb, mask_ss,
        num_heads, seq_q, seq_kv, qk_scale,
        HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr, DOT: tl.constexpr, ALIGN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Flash-attention forward for one [BLOCK_M, HEAD_DIM] query tile of one (batch, head).

        HEAD_DIM is a constexpr, so the padding mask ``dims < HEAD_DIM`` is a compile-time constant
        (72 and 88 keep 8-element vectors). Strides come divided by ALIGN (8 or 1): with ALIGN 8 the
        compiler knows every row starts 16-byte aligned and vectorizes the loads even where a stride
        is no multiple of 16 (Triton's own integer specialization), e.g. the head stride 72 or 88.
        MASK_KIND: 0 none, 1 bool key mask (uint8, nonzero = attend), 2 additive key bias.
        DOT: "native" (16-bit operands, fp32 accumulation: the GPU) or "ieee" (operands upcast to
        fp32: fp32 inputs, and the interpreter, whose bf16 dots are wrong).
        Scores live in the exp2 domain: s = log2(e) * (scale * q.k + bias)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // num_heads).to(tl.int64)
        h = (pid_bh % num_heads).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        row_ok = rows < seq_q

        q_base = q_ptr + b * (q_sb * ALIGN) + h * (q_sh * ALIGN)
        k_base = k_ptr + b * (k_sb * ALIGN) + h * (k_sh * ALIGN)
        v_base = v_ptr + b * (v_sb * ALIGN) + h * (v_sh * ALIGN)
        m_base = mask_ptr + b * mask_sb
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_base + rows[:, None] * (q_ss * ALIGN) + dims[None, :], mask=q_mask, other=0.0)
        if DOT != "native":
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (exp2 domain)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, seq_kv, BLOCK_N):
            keys = start + cols
            key_ok = keys < seq_kv
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_base + keys[:, None] * (k_ss * ALIGN) + dims[None, :], mask=kv_mask, other=0.0)
            if DOT == "native":
                s = tl.dot(q, tl.trans(k))
            else:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT)
            if MASK_KIND == 1:
                keep = tl.load(m_base + keys * mask_ss, mask=key_ok, other=0) != 0
                s = tl.where(keep[None, :], s * qk_scale, float("-inf"))
            elif MASK_KIND == 2:
                bias = tl.load(m_base + keys * mask_ss, mask=key_ok, other=float("-inf")).to(tl.float32)
                # MASKED_BIAS (-1e38) and below -> -inf; clamp first so that bias * LOG2E cannot overflow
                bias = tl.maximum(bias, -1.0e38) * 1.4426950408889634
                bias = tl.where(bias > -1.0e38 * 1.4426950408889634, bias, float("-inf"))
                s = s * qk_scale + bias[None, :]
            else:
                s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp2(-inf - 0) = 0, no NaN
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + keys[:, None] * (v_ss * ALIGN) + dims[None, :], mask=kv_mask, other=0.0)
            if DOT == "native":
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            else:
                acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision=DOT)
            m_i = m_new

        inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)  # a row with no key left: acc == 0 -> output 0
        out = acc * inv_l[:, None]
        o_offsets = b * (o_sb * ALIGN) + h * (o_sh * ALIGN) + rows[:, None] * (o_ss * ALIGN) + dims[None, :]
        tl.store(o_ptr + o_offsets, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@dataclass(frozen=True)
class TritonConfig:
    """Tiles, warps and pipeline depth for one padded head dim and row alignment. Chosen by rule, not
    autotuned: every config the rule can produce is listed by ``triton_configs()`` and compiled for
    sm_80 and sm_90a by the AOT fit check (``aot_specs``)."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def padded_head_dim(head_dim: int) -> int:
    """``BLOCK_D``: the next power of two, at least 16 (``tl.dot`` needs K >= 16)."""
    if not 1 <= head_dim <= MAX_TRITON_HEAD_DIM:
        raise ValueError(f"the Triton attention kernel takes 1 <= head_dim <= {MAX_TRITON_HEAD_DIM}, got {head_dim}")
    return max(16, 1 << (head_dim - 1).bit_length())


# BLOCK_D -> (BLOCK_M, BLOCK_N, warps, stages), for 16-byte aligned rows and for the rest; see triton_config
_ALIGNED_RULE = {
    16: (128, 64, 4, 3),
    32: (128, 64, 4, 3),
    64: (128, 64, 8, 3),
    128: (128, 64, 8, 3),
    256: (64, 32, 8, 2),
}
_UNALIGNED_RULE = {**_ALIGNED_RULE, 128: (64, 64, 8, 2)}


def triton_config(head_dim: int, aligned: bool = True) -> TritonConfig:
    """The rule (16-bit inputs; checked by the AOT fit test for sm_80 and sm_90a, 0 spills).

    ``aligned``: every row of q, k, v, out starts 16-byte aligned (all strides and offsets multiples of
    8 elements: ``ALIGN`` 8), so tiles move as 16-byte vectors (cp.async). 128-query x 64-key tiles
    (the S and P tiles of 128x64 fp32 stay in registers; on sm_90a two warpgroups of wgmma m64), 4
    warps up to BLOCK_D 32, 8 warps from 64 (4 warps spill on sm_90a there), 3 stages; at BLOCK_D 256
    64x32 tiles and 2 stages (registers: the 64x256 fp32 accumulator). Unaligned rows (odd head dims,
    odd offsets: scalar loads, one 64-bit address per element) need fewer live values: at BLOCK_D 128
    64x64 tiles and 2 stages (128x64 spills 8 B on sm_80)."""
    block_d = padded_head_dim(head_dim)
    rule = _ALIGNED_RULE if aligned else _UNALIGNED_RULE
    return TritonConfig(*rule[block_d][:2], block_d, *rule[block_d][2:])


def triton_configs(aligned: Optional[bool] = None) -> list[TritonConfig]:
    """Every config ``triton_config`` can return (for aligned or unaligned rows, or both)."""
    cases = (True, False) if aligned is None else (aligned,)
    found = {triton_config(1 << p, a) for a in cases for p in range(MAX_TRITON_HEAD_DIM.bit_length())}
    return sorted(found, key=lambda c: (c.block_d, c.block_m, c.block_n))


def _launch_triton(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    from torch.library import wrap_triton

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, seq_q, heads, head_dim = q.shape
    seq_kv = k.shape[1]
    out = torch.empty((batch, seq_q, heads, head_dim), dtype=q.dtype, device=q.device)
    strides = [s for t in (out, q, k, v) for s in (t.stride(0), t.stride(1), t.stride(2))]
    align = row_alignment((q, k, v), strides)
    config = triton_config(head_dim, aligned=align == 8)
    if mask is None:
        mask_kind, mask_arg, mask_sb, mask_ss = 0, q, 0, 0
    else:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_sb = mask.stride(0) if mask.shape[0] > 1 else 0
        mask_ss = mask.stride(1)
    grid = (triton.cdiv(seq_q, config.block_m), batch * heads)
    _check_index_range(q, k, v, out, config, grid)
    wrap_triton(_attention_fwd_kernel)[grid](
        out, q, k, v, mask_arg,
        *(s // align for s in strides),
        mask_sb, mask_ss,
        heads, seq_q, seq_kv, scale * LOG2E,
        HEAD_DIM=head_dim, MASK_KIND=mask_kind, DOT="ieee" if backends.INTERPRETER_ON else "native",
        ALIGN=align, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def _check_index_range(q, k, v, out, config: TritonConfig, grid) -> None:
    """Row offsets inside one (batch, head) are 32-bit in the kernel (batch and head offsets are
    64-bit); the grid's second dimension is at most 65535."""
    limit = 2**31 - 1
    padded_q = grid[0] * config.block_m
    padded_kv = triton.cdiv(k.shape[1], config.block_n) * config.block_n
    spans = [padded_q * t.stride(1) for t in (q, out)] + [padded_kv * t.stride(1) for t in (k, v)]
    if max(spans) > limit:
        raise ValueError(f"joint_attention (Triton): sequence x row stride exceeds 32-bit offsets ({max(spans)})")
    if grid[1] > 65535:
        raise ValueError(f"joint_attention (Triton): batch * heads = {grid[1]} exceeds the grid limit 65535")


# --------------------------------------------------------------------- flash-attn and xformers (CUDA)


@functools.cache
def _flash_attn3() -> backends.Availability:
    return backends._optional_package("flash_attn_interface")


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _flash_attn_impl(device: torch.device, head_dim: int) -> tuple[Optional[str], str]:
    """("flash_attn_interface" | "flash_attn" | None, why) for ``head_dim``: flash-attention 3 on Hopper
    when built (head dims that are multiples of 8 up to 256; it pads 72 and 88 to 96), else flash-attention 2
    (any head dim up to 256; its wrapper pads to a multiple of 8)."""
    fa3, fa2 = _flash_attn3(), backends.flash_attn()
    hopper = _is_hopper(device)
    if head_dim > FLASH_MAX_HEAD_DIM:
        return None, f"flash-attention takes head_dim <= {FLASH_MAX_HEAD_DIM}, got {head_dim}"
    if fa3.available and hopper and head_dim % 8 == 0:
        return "flash_attn_interface", f"flash-attention 3 ({fa3.reason})"
    if fa2.available:
        return "flash_attn", f"flash-attention 2 ({fa2.reason})"
    why = f"flash_attn {fa2.reason}"
    if hopper:
        why += f"; flash_attn_interface {fa3.reason}"
    return None, why


def _launch_flash_attn(q: Tensor, k: Tensor, v: Tensor, mask: None, scale: float) -> Tensor:
    module, why = _flash_attn_impl(q.device, q.shape[-1])
    if module is None:
        raise RuntimeError(f"backend='flash_attn' is not available: {why}")
    import importlib

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = importlib.import_module(module).flash_attn_func(q, k, v, softmax_scale=scale, causal=False)
    return out[0] if isinstance(out, tuple) else out  # some FA3 releases return (out, lse)


def _launch_xformers(q: Tensor, k: Tensor, v: Tensor, mask: None, scale: float) -> Tensor:
    import xformers.ops

    return xformers.ops.memory_efficient_attention(q, k, v, scale=scale)


# --------------------------------------------------------------------------------- backend choice


def _flash_attn_refusal(device_type: str, dtype: torch.dtype, has_mask: bool) -> Optional[str]:
    if device_type != "cuda":
        return f"flash-attention needs CUDA tensors, got {device_type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attention takes fp16/bf16, got {dtype}"
    if has_mask:
        return "flash-attention takes no key-padding mask here (it would need its varlen interface)"
    return None


def _triton_refusal(device_type: str, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    if head_dim > MAX_TRITON_HEAD_DIM:
        return f"the Triton attention kernel takes head_dim <= {MAX_TRITON_HEAD_DIM}, got {head_dim}"
    if device_type == "cuda" and dtype == torch.float32:
        return "the Triton attention kernel takes fp16/bf16 on CUDA (fp32 tiles spill); use backend='torch'"
    return None


def _xformers_refusal(device_type: str, has_mask: bool) -> Optional[str]:
    if device_type != "cuda":
        return f"xformers needs CUDA tensors, got {device_type}"
    if has_mask:
        return "the xformers path takes no key-padding mask"
    return None


@torch.compiler.assume_constant_result  # torch.compile runs it at trace time and bakes the answer in
def _choose(device: torch.device, dtype: torch.dtype, head_dim: int, has_mask: bool, backend: Optional[str]):
    """(name, why) for one call signature; RuntimeError if an explicitly asked backend cannot run."""
    name, why = _choose_cached(device, dtype, head_dim, has_mask, backend)
    _log_choice(name, why)
    return name, why


@functools.cache
def _choose_cached(device: torch.device, dtype, head_dim: int, has_mask: bool, backend: Optional[str]):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS} or None")
    if backend in ("torch", "triton"):
        backends.resolve(backend, device)  # RuntimeError saying why Triton cannot run here
        refusal = _triton_refusal(device.type, dtype, head_dim) if backend == "triton" else None
        if refusal:
            raise RuntimeError(f"backend='triton' cannot run: {refusal}")
        return backend, "asked for"
    if backend == "flash_attn":
        refusal = _flash_attn_refusal(device.type, dtype, has_mask)
        module, why = (None, refusal) if refusal else _flash_attn_impl(device, head_dim)
        if module is None:
            raise RuntimeError(f"backend='flash_attn' cannot run: {why}")
        return "flash_attn", f"asked for: {why}"
    if backend == "xformers":
        refusal = _xformers_refusal(device.type, has_mask) or (
            None if backends.xformers().available else f"xformers {backends.xformers().reason}"
        )
        if refusal:
            raise RuntimeError(f"backend='xformers' cannot run: {refusal}")
        return "xformers", f"asked for: xformers {backends.xformers().reason}"
    return _auto(device, dtype, head_dim, has_mask)


def _auto(device: torch.device, dtype: torch.dtype, head_dim: int, has_mask: bool) -> tuple[str, str]:
    """CPU: SDPA. CUDA: flash-attention (3 on Hopper, else 2) wherever it runs (fp16/bf16, no mask, head
    dims up to 256, 72 and 88 included); else our Triton kernel (key-padding masks, no flash-attention
    installed); else xformers (no mask); else SDPA (fp32, head dims over 256, nothing else importable)."""
    if device.type != "cuda":
        return "torch", f"{device.type} tensors: PyTorch SDPA"
    refusal = _flash_attn_refusal(device.type, dtype, has_mask)
    module, why = (None, refusal) if refusal else _flash_attn_impl(device, head_dim)
    if module is not None:
        return "flash_attn", why
    passed = [why]
    refusal = _triton_refusal(device.type, dtype, head_dim)
    if refusal is None and backends.triton().available:
        return "triton", f"own Triton kernel ({'key-padding mask' if has_mask else why})"
    passed.append(f"Triton: {refusal or backends.triton().reason}")
    refusal = _xformers_refusal(device.type, has_mask)
    if refusal is None and backends.xformers().available:
        return "xformers", f"xformers {backends.xformers().reason}"
    passed.append(refusal or f"xformers {backends.xformers().reason}")
    return "torch", "PyTorch SDPA (its flash / memory-efficient kernels); not: " + "; ".join(passed)


@functools.cache
def _log_choice(name: str, why: str) -> None:
    log.info("joint_attention backend: %s (%s)", name, why)


def attention_backend(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, backend: Optional[str] = None
) -> tuple[str, str]:
    """Which backend ``joint_attention(q, k, v, mask=mask, backend=backend)`` runs, and why.

    ``name`` is one of "torch", "triton", "flash_attn", "xformers". With ``backend=None``/"auto": CPU
    tensors -> "torch" (SDPA). CUDA tensors -> flash-attention 3 (Hopper) / 2 when importable, for
    fp16/bf16 without a mask at any head dim up to 256; else (a key-padding mask, or no flash-attention)
    our Triton kernel; else xformers when importable and no mask; else PyTorch SDPA. An explicit backend
    that cannot run raises RuntimeError with the reason. Each distinct (name, why) is logged once (logger
    ``dit_kernels``, INFO)."""
    _validate(q, k, v)
    _normalize_mask(mask, q, k)
    return _choose(q.device, q.dtype, q.shape[-1], mask is not None, backend)


# ------------------------------------------------------------------------------------ launcher table

_LAUNCHERS = {"torch": _reference, "flash_attn": _launch_flash_attn, "xformers": _launch_xformers}
if triton is not None:
    _LAUNCHERS["triton"] = _launch_triton


# ---------------------------------------------------------------------------------------- custom ops


def _register_ops(backend: str, launch):
    """The launcher of ``backend`` as the custom op ``dit_kernels::joint_attention_<backend>``."""

    def joint_attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
        return launch(q, k, v, mask, scale)

    def fake(q, k, v, mask, scale):
        if backend == "torch":  # a [B, Sq, H, Dh] view of SDPA's [B, H, Sq, Dh] output
            return to_seq_first(q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]))
        return q.new_empty(q.shape)

    return register_custom_op("joint_attention", backend, joint_attention_op, fake=fake)


_CUSTOM_OPS = {backend: _register_ops(backend, launch) for backend, launch in _LAUNCHERS.items()}


def _run(backend: str, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """The launcher of the chosen ``backend``, or its custom op (``dit_kernels.ops.dispatch``)."""
    if launch_directly(backend):
        return _LAUNCHERS[backend](q, k, v, mask, scale)
    return _CUSTOM_OPS[backend](q, k, v, mask, scale)


# ------------------------------------------------------------------------------------------ validation


def _require_4d(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, S, H, Dh], got shape {tuple(t.shape)}")


def _validate(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_4d(t, name)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"joint_attention takes {[str(d) for d in SUPPORTED_DTYPES]}, got q of {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q is {q.dtype}; pass one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    shapes = {"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape)}
    for axis, what in ((0, "batch"), (2, "heads"), (3, "head_dim")):
        if not q.shape[axis] == k.shape[axis] == v.shape[axis]:
            raise ValueError(f"q, k, v disagree on {what} (dim {axis}) in [B, S, H, Dh]: {shapes}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same sequence length: {shapes}")
    if q.shape[3] == 0:
        raise ValueError(f"head_dim must be non-zero: {shapes}")


def _normalize_mask(mask: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """[B|1, Skv], [B|1, 1, Skv] or [B|1, 1, 1, Skv] -> a [B|1, Skv] view (no copy)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be bool (True = attend) or a float additive bias, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    batch, seq_kv = q.shape[0], k.shape[1]
    shape = tuple(mask.shape)
    ok = (
        2 <= mask.dim() <= 4
        and shape[0] in (1, batch)
        and shape[-1] == seq_kv
        and all(d == 1 for d in shape[1:-1])
    )
    if not ok:
        raise ValueError(
            f"mask of shape {shape} is no key-padding mask for batch {batch} and {seq_kv} keys: expected "
            f"[B, Skv], [B, 1, Skv] or [B, 1, 1, Skv] (B = {batch} or 1)"
        )
    return mask.reshape(shape[0], seq_kv)


# ---------------------------------------------------------------------------------------------- public


def joint_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Softmax attention over [B, S, H, Dh]: q [B, Sq, H, Dh], k/v [B, Skv, H, Dh] -> [B, Sq, H, Dh].

    ``mask``: key-padding mask [B, Skv] / [B, 1, Skv] / [B, 1, 1, Skv], bool (True = attend) or an
    additive float bias; rows with every key masked give 0. ``scale`` defaults to 1/sqrt(Dh).
    ``backend``: None/"auto" | "torch" | "triton" | "flash_attn" | "xformers" (see
    ``attention_backend``). Output in q's dtype; the "torch" backend returns a transposed view of SDPA's
    [B, H, Sq, Dh] result (as diffusers does), the others a contiguous tensor."""
    _validate(q, k, v)
    mask = _normalize_mask(mask, q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name, _ = _choose(q.device, q.dtype, q.shape[-1], mask is not None, backend)
    if q.numel() == 0 or k.shape[1] == 0:  # no queries, or no key at all (every row fully masked): zeros
        return q.new_zeros(q.shape)
    return _run(name, q, k, v, mask, scale)


# ------------------------------------------------------------------------------------- AOT fit specs

# Head dims compiled per BLOCK_D: the power of two itself and the non-powers the models use (8: the
# tiny test configs, 72: DiT/PixArt, 88: HunyuanDiT) or that stand for them (40, 200): masked loads.
AOT_HEAD_DIMS = {16: (8, 16), 32: (32,), 64: (40, 64), 128: (72, 88, 128), 256: (200, 256)}
_AOT_PARAMS = (
    "o_ptr", "q_ptr", "k_ptr", "v_ptr", "mask_ptr",
    "o_sb", "o_ss", "o_sh", "q_sb", "q_ss", "q_sh", "k_sb", "k_ss", "k_sh", "v_sb", "v_ss", "v_sh",
    "mask_sb", "mask_ss", "num_heads", "seq_q", "seq_kv", "qk_scale",
)  # fmt: skip


# (dtype, head_dim, aligned, mask kind) compiled by the default test run: the model head dims, and the scalar path
AOT_REPRESENTATIVE = {("bf16", 64, True, 2), ("bf16", 72, True, 2), ("bf16", 88, True, 2), ("bf16", 128, True, 2),
                      ("bf16", 72, False, 2)}  # fmt: skip


def aot_spec(dtype: str, head_dim: int, aligned: bool, mask_kind: int = 2):
    """The AotSpec of the kernel the launcher runs for 16-bit ``dtype`` ("bf16"/"fp16"), ``head_dim``,
    row alignment and mask kind (0 none, 1 bool, 2 additive bias in ``dtype``). Aligned: ALIGN 8 and
    16-byte aligned pointers (what a torch allocation gets); unaligned: the worst case, ALIGN 1 and no
    pointer or integer known to be a multiple of 16."""
    config = triton_config(head_dim, aligned)
    signature = {name: (f"*{dtype}" if name.endswith("_ptr") else "i32") for name in _AOT_PARAMS}
    signature["qk_scale"] = "fp32"
    if mask_kind == 1:
        signature["mask_ptr"] = "*u8"
    constexprs = {
        "HEAD_DIM": head_dim, "MASK_KIND": mask_kind, "DOT": "native", "ALIGN": 8 if aligned else 1,
        "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_D": config.block_d,
    }  # fmt: skip
    return AotSpec.build(
        f"attention[{dtype},Dh={head_dim},mask={('none', 'bool', 'bias')[mask_kind]},"
        f"{'aligned' if aligned else 'unaligned'},BLOCK_M={config.block_m},BLOCK_N={config.block_n},"
        f"BLOCK_D={config.block_d},warps={config.num_warps},stages={config.num_stages}]",
        _attention_fwd_kernel,
        signature,
        constexprs,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        divisible_by_16=None if aligned else (),
        representative=(dtype, head_dim, aligned, mask_kind) in AOT_REPRESENTATIVE,
    )


def aot_specs():
    """Every config ``triton_config`` can pick (aligned and unaligned rows), at every head dim of
    ``AOT_HEAD_DIMS``, for bf16 and fp16, with the additive-bias mask (the most work per key tile);
    the unaligned ones with worst-case divisibility. Plus no mask and a bool mask at the model head
    dims 64/72/88/128, aligned (the common calls)."""
    specs = []
    for dtype in ("bf16", "fp16"):
        for aligned in (True, False):
            for config in triton_configs(aligned):
                specs += [aot_spec(dtype, head_dim, aligned) for head_dim in AOT_HEAD_DIMS[config.block_d]]
        specs += [aot_spec(dtype, d, True, kind) for d in (64, 72, 88, 128) for kind in (0, 1)]
    return specs
