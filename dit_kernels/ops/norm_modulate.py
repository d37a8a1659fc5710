"""LayerNorm + adaLN modulate, gated residual, and the two fused: one op family, three backends.

Shapes: ``x``, ``residual``, ``y`` are [B, S, D] (a plain LayerNorm without modulation or gate takes any
[..., D]). ``shift``, ``scale``, ``gate`` broadcast over the sequence: [B, D], [B, 1, D] or [B, S, D]
(any form that expands to [B, S, D], strided views such as ``emb.chunk(6, dim=1)`` included).
``weight``, ``bias``: [D]. Every tensor has the dtype and device of ``x`` (or ``residual``), except that the
parameters (``gate``, ``shift``, ``scale``, ``weight``, ``bias``) may be fp32 with an fp16/bf16 ``x``: they
are read as fp32 either way (Wan computes its modulation in fp32; diffusers' ``_keep_in_fp32_modules``
keeps norm weights in fp32). The CUDA kernel takes one dtype and refuses that mix.

Math (all in fp32, one rounding to the input dtype at each output)::

    layernorm_modulate:  y = ((x - mean) * rstd * weight + bias) * (1 + scale) + shift,
                         mean, var over D (biased), rstd = 1 / sqrt(var + eps)
    gated_residual:      h = residual + gate * y
    gated_residual_layernorm_modulate:  (h, layernorm_modulate(h, ...)) in one pass; the norm reads the
                         *rounded* h, so the fusion equals the two ops run one after the other.

Backends: the reference below (pure torch: the spec and the CPU path), one Triton kernel that serves
all three ops, and the CUDA C++ kernel in ``csrc/include/dit_kernels/norm_modulate.cuh`` (``_C`` on GPU,
``_C_cpu`` through CPU emulation). Every launcher is also the custom op ``dit_kernels::norm_modulate_<backend>``
(see ``dit_kernels.ops.dispatch``): one opaque node under torch.compile, one op to a dispatch mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dit_kernels import backends
from dit_kernels.aot_spec import AotSpec
from dit_kernels.ops.dispatch import concrete_backend, launch_directly, register_custom_op

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a Linux dependency; without it only the torch and CUDA backends exist
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_DIM = 8192  # one row per tile: BLOCK_D = next_power_of_2(D), 8 fp32 values per thread, <= 32 warps
MAX_CUDA_DIM = 12288  # kNormModulateMaxDim (csrc params.h): a normalised row in registers, <= 24 values x 512 threads
PARAMETERS = ("gate", "shift", "scale", "weight", "bias")  # may be fp32 with a lower-precision input


# ----------------------------------------------------------------------------------------- reference


def _reference(x, y, gate, shift, scale, weight, bias, eps: float, normalize: bool):
    """Returns ``(out, h)``: ``h = x + gate * y`` when ``y`` is given (else None), ``out`` the
    modulated LayerNorm of h (or of x) when ``normalize`` (else None). Operands already validated.
    ``h`` is contiguous whatever x's strides (as every backend's), so a transposed x (DiT's patch
    embedding) does not pass its layout down the residual stream to every later op: summed as ``addend +
    x`` (diffusers' order) it takes the addend's layout, contiguous wherever y is, with no copy. ``out`` is
    LayerNorm's fresh fp32 output, modulated in place."""
    h = None
    base = x.float()
    if y is not None:
        addend = y.float() if gate is None else _fp32_rows(gate) * y.float()
        h = (addend + base).to(x.dtype).contiguous()
        base = h.float()
    if not normalize:
        return None, h
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    out = F.layer_norm(base, base.shape[-1:], weight, bias, eps)  # fp32 in, fp32 statistics
    if scale is not None:
        out = out.mul_(1 + _fp32_rows(scale))
    if shift is not None:
        out = out.add_(_fp32_rows(shift))
    return out.to(x.dtype), h


def _fp32_rows(t: Tensor) -> Tensor:
    """A modulation tensor as fp32 [B, 1, D] / [B, S, D] (``_broadcastable``)."""
    return _broadcastable(t).float()


# -------------------------------------------------------------------------------- operand layout


def _broadcastable(t: Tensor) -> Tensor:
    """[B, D] -> [B, 1, D]; [B, 1, D] and [B, S, D] as they are."""
    return t.unsqueeze(1) if t.dim() == 2 else t


@dataclass(frozen=True)
class _Operand:
    """A tensor expanded to [B, S, D] with a unit last stride; ``None`` when absent."""

    tensor: Optional[Tensor]

    @property
    def stride_b(self) -> int:
        return self.tensor.stride(0) if self.tensor is not None else 0

    @property
    def stride_s(self) -> int:
        return self.tensor.stride(1) if self.tensor is not None else 0


def _as_rows(t: Optional[Tensor], shape: torch.Size) -> _Operand:
    """View ``t`` as [B, S, D] (stride 0 on broadcast dims, no copy unless its last dim is strided)."""
    if t is None:
        return _Operand(None)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return _Operand(_broadcastable(t).expand(shape))


def _operands(x, y, gate, shift, scale, weight, bias):
    shape = x.shape
    rows = (_as_rows(t, shape) for t in (x, y, gate, shift, scale))
    vectors = (None if t is None else t.contiguous() for t in (weight, bias))
    return (*rows, *vectors)


def _allocate(x: Tensor, has_y: bool, normalize: bool):
    """Outputs: (out, h), contiguous, in x's dtype; None where not produced."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if normalize else None
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if has_y else None
    return out, h


# ------------------------------------------------------------------------------------------ Triton

if triton is not None:

    @triton.jit
    def _row_offsets(b, s, stride_b, stride_s, cols):
        return (b * stride_b + s * stride_s)[:, None] + cols[None, :]

    @triton.jit
    def _norm_modulate_kernel(
        out_ptr, h_ptr,
        x_ptr, x_sb, x_ss,
        y_ptr, y_sb, y_ss,
        gate_ptr, gate_sb, gate_ss,
        shift_ptr, shift_sb, shift_ss,
        scale_ptr, scale_sb, scale_ss,
        weight_ptr, bias_ptr,
        n_rows, seq_len, dim, eps,
        HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One [BLOCK_M, BLOCK_D] tile of rows per program; all arithmetic in fp32."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
        rows = rows.to(tl.int64)
        b = rows // seq_len
        s = rows % seq_len
        dense = rows[:, None] * dim + cols[None, :]
        h = tl.load(x_ptr + _row_offsets(b, s, x_sb, x_ss, cols), mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:
            addend = tl.load(y_ptr + _row_offsets(b, s, y_sb, y_ss, cols), mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                gate_at = _row_offsets(b, s, gate_sb, gate_ss, cols)
                addend = tl.load(gate_ptr + gate_at, mask=mask, other=0.0).to(tl.float32) * addend
            h_rounded = (h + addend).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + dense, h_rounded, mask=mask)
            h = h_rounded.to(tl.float32)
        if NORMALIZE:
            mean = tl.sum(h, axis=1) / dim
            centred = tl.where(mask, h - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + eps)
            out = centred * rstd[:, None]
            # weight and bias: [B, S, D] operands of stride 0, loaded in the tile's layout (vector loads, no
            # layout conversion through shared memory; the repeats hit L1)
            vector = _row_offsets(b, s, 0, 0, cols)
            if HAS_WEIGHT:
                out = out * tl.load(weight_ptr + vector, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                out = out + tl.load(bias_ptr + vector, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                scale_at = _row_offsets(b, s, scale_sb, scale_ss, cols)
                out = out * (1.0 + tl.load(scale_ptr + scale_at, mask=mask, other=0.0).to(tl.float32))
            if HAS_SHIFT:
                shift_at = _row_offsets(b, s, shift_sb, shift_ss, cols)
                out = out + tl.load(shift_ptr + shift_at, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + dense, out.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class TritonConfig:
    """Tile and warps for one row width. Chosen by rule, not autotuned: every config the rule can
    produce is enumerated by ``triton_configs()`` and compiled by the AOT fit test."""

    block_m: int
    block_d: int
    num_warps: int


def triton_config(dim: int) -> TritonConfig:
    """Tiles of >= 2048 elements at 8 fp32 values per thread per operand: many rows per program for
    small D (per-element 64-bit offsets of five operands cost registers), one row for D > 1024."""
    if dim > MAX_TRITON_DIM:
        raise ValueError(f"the Triton norm_modulate kernel takes D <= {MAX_TRITON_DIM}, got D={dim}")
    block_d = max(16, 1 << (dim - 1).bit_length())
    block_m = max(1, 2048 // block_d)
    num_warps = block_m * block_d // 256
    return TritonConfig(block_m, block_d, num_warps)


def triton_configs() -> list[TritonConfig]:
    """Every config ``triton_config`` can return."""
    return sorted({triton_config(1 << p) for p in range(MAX_TRITON_DIM.bit_length())}, key=lambda c: c.block_d)


def _launch_triton(x, y, gate, shift, scale, weight, bias, eps: float, normalize: bool):
    from torch.library import wrap_triton

    out, h = _allocate(x, y is not None, normalize)
    x, y, gate, shift, scale, weight, bias = _operands(x, y, gate, shift, scale, weight, bias)
    batch, seq_len, dim = x.tensor.shape
    n_rows = batch * seq_len
    config = triton_config(dim)
    any_output = out if out is not None else h
    wrap_triton(_norm_modulate_kernel)[(triton.cdiv(n_rows, config.block_m),)](
        out if out is not None else any_output, h if h is not None else any_output,
        x.tensor, x.stride_b, x.stride_s,
        *_triton_operand(y, x), *_triton_operand(gate, x), *_triton_operand(shift, x),
        *_triton_operand(scale, x),
        weight if weight is not None else x.tensor, bias if bias is not None else x.tensor,
        n_rows, seq_len, dim, eps,
        HAS_Y=y.tensor is not None, HAS_GATE=gate.tensor is not None, HAS_SHIFT=shift.tensor is not None,
        HAS_SCALE=scale.tensor is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        NORMALIZE=normalize, BLOCK_M=config.block_m, BLOCK_D=config.block_d, num_warps=config.num_warps,
    )  # fmt: skip
    return out, h


def _triton_operand(operand: _Operand, placeholder: _Operand):
    """(pointer, stride_b, stride_s); an absent operand passes a valid pointer its flag never reads."""
    tensor = operand.tensor if operand.tensor is not None else placeholder.tensor
    return tensor, operand.stride_b, operand.stride_s


# ------------------------------------------------------------------------------ CUDA C++ (_C, _C_cpu)


def _launch_native(module, stream: int, x, y, gate, shift, scale, weight, bias, eps: float, normalize: bool):
    out, h = _allocate(x, y is not None, normalize)
    if x.shape[-1] > MAX_CUDA_DIM and normalize:
        raise ValueError(f"the CUDA norm_modulate kernel takes D <= {MAX_CUDA_DIM}, got D={x.shape[-1]}")
    params = zip(PARAMETERS, (gate, shift, scale, weight, bias))
    mixed = [name for name, t in params if t is not None and t.dtype != x.dtype]
    if mixed:
        raise ValueError(f"the CUDA norm_modulate kernel reads its parameters in the input dtype {x.dtype}; "
                         f"{', '.join(mixed)} are float32 (use backend='triton' or 'torch' for that mix)")  # fmt: skip
    x, y, gate, shift, scale, weight, bias = _operands(x, y, gate, shift, scale, weight, bias)
    batch, seq_len, dim = x.tensor.shape
    module.norm_modulate(
        str(x.tensor.dtype).removeprefix("torch."), batch * seq_len, seq_len, dim,
        _pointer(out), _pointer(h),
        *(_native_operand(op) for op in (x, y, gate, shift, scale)),
        _pointer(weight), _pointer(bias), eps, normalize, stream,
    )  # fmt: skip
    return out, h


def _pointer(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _native_operand(operand: _Operand) -> tuple[int, int, int]:
    return _pointer(operand.tensor), operand.stride_b, operand.stride_s


def _launch_cuda(*args):
    stream = torch.cuda.current_stream(args[0].device).cuda_stream
    return _launch_native(backends.native_module(), stream, *args)


def _launch_cuda_emu(*args):
    return _launch_native(backends.emulation_module(), 0, *args)


# ------------------------------------------------------------------------------------ launcher table

_LAUNCHERS = {"torch": _reference, "cuda": _launch_cuda, "cuda_emu": _launch_cuda_emu}
if triton is not None:
    _LAUNCHERS["triton"] = _launch_triton


# ---------------------------------------------------------------------------------------- custom ops


def _register_ops(backend: str, launch):
    """The family's kernel on one backend as the custom op ``dit_kernels::norm_modulate_<backend>``: all
    operands in, ``(out, h)`` out, an absent output as an empty tensor (custom ops cannot return None)."""

    def norm_modulate_op(
        x: Tensor, y: Optional[Tensor], gate: Optional[Tensor], shift: Optional[Tensor], scale: Optional[Tensor],
        weight: Optional[Tensor], bias: Optional[Tensor], eps: float, normalize: bool,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        out, h = launch(x, y, gate, shift, scale, weight, bias, eps, normalize)
        return _empty_if_none(out, x), _empty_if_none(h, x)

    def fake(x, y, gate, shift, scale, weight, bias, eps, normalize):
        out, h = _allocate(x, y is not None, normalize)
        return _empty_if_none(out, x), _empty_if_none(h, x)

    return register_custom_op("norm_modulate", backend, norm_modulate_op, fake=fake)


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


_CUSTOM_OPS = {backend: _register_ops(backend, launch) for backend, launch in _LAUNCHERS.items()}


def _run(backend: Optional[str], x, y, gate, shift, scale, weight, bias, eps: float, normalize: bool):
    """``(out, h)`` on ``backend`` (resolved here unless it already is): the launcher, or its custom op."""
    backend = concrete_backend(backend, x.device)
    args = (x, y, gate, shift, scale, weight, bias, float(eps), normalize)
    if x.numel() == 0:
        return _reference(*args)
    if launch_directly(backend):
        return _LAUNCHERS[backend](*args)
    out, h = _CUSTOM_OPS[backend](*args)
    return (out if normalize else None), (h if y is not None else None)


# ------------------------------------------------------------------------------------ validation


def _validate(base: Tensor, others: dict, vectors: dict, needs_rows: bool) -> None:
    """Raise a clear error for a dtype, device or shape these ops cannot take."""
    if not isinstance(base, Tensor):
        raise TypeError(f"expected a tensor, got {type(base).__name__}")
    if base.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"norm_modulate ops take {[str(d) for d in SUPPORTED_DTYPES]}, got {base.dtype}")
    if base.dim() == 0 or base.shape[-1] == 0:
        raise ValueError(f"norm_modulate ops need a non-empty last dimension, got shape {tuple(base.shape)}")
    if needs_rows and base.dim() != 3:
        raise ValueError(f"with shift/scale/gate/y the input must be [B, S, D], got shape {tuple(base.shape)}")
    dim = base.shape[-1]
    for name, t in {**others, **vectors}.items():
        if t is None:
            continue
        if t.dtype != base.dtype and (name == "y" or t.dtype != torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype} but the input is {base.dtype}; pass one dtype"
                            f"{'' if name == 'y' else ' (or float32 parameters)'}")  # fmt: skip
        if t.device != base.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {base.device}")
    for name, t in vectors.items():
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must have shape [{dim}], got {tuple(t.shape)}")
    for name, t in others.items():
        if t is not None and not _broadcasts_over_rows(t, base.shape):
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} does not broadcast to the input {tuple(base.shape)}: "
                "expected [B, D], [B, 1, D] or [B, S, D]"
            )


def _broadcasts_over_rows(t: Tensor, shape: torch.Size) -> bool:
    batch, seq_len, dim = shape
    if t.dim() == 2:
        return t.shape[0] in (1, batch) and t.shape[1] == dim
    if t.dim() == 3:
        return t.shape[0] in (1, batch) and t.shape[1] in (1, seq_len) and t.shape[2] == dim
    return False



def _flatten_plain(x: Tensor) -> Tensor:
    """A plain LayerNorm takes any [..., D]: run it as [1, N, D]."""
    return x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])


# ----------------------------------------------------------------------------------------- public


def layernorm_modulate(
    x: Tensor,
    shift: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """``((x - mean) * rstd * weight + bias) * (1 + scale) + shift`` over the last dim, fp32 statistics.

    Any of shift/scale/weight/bias may be None: with none of them this is the FP32-accumulating
    LayerNorm (HunyuanDiT's FP32LayerNorm). x: [B, S, D] ([..., D] without shift/scale);
    shift/scale: [B, D] | [B, 1, D] | [B, S, D]; weight/bias: [D]. Returns x's shape and dtype.
    """
    modulated = shift is not None or scale is not None
    _validate(x, {"shift": shift, "scale": scale}, {"weight": weight, "bias": bias}, needs_rows=modulated)
    rows = x if modulated else _flatten_plain(x)
    out, _ = _run(backend, rows, None, None, shift, scale, weight, bias, eps, True)
    return out.view(x.shape)


def gated_residual(residual: Tensor, y: Tensor, gate: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``residual + gate * y`` (``residual + y`` when gate is None), fp32 math, one rounding.

    residual, y: [B, S, D]; gate: [B, D] | [B, 1, D] | [B, S, D]."""
    _check_pair(residual, y)
    _validate(residual, {"y": y, "gate": gate}, {}, needs_rows=True)
    return _run(backend, residual, y, gate, None, None, None, None, 0.0, False)[1]


def gated_residual_layernorm_modulate(
    residual: Tensor,
    y: Tensor,
    gate: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """``h = residual + gate * y`` and ``layernorm_modulate(h, shift, scale, weight, bias, eps)`` in one
    pass over the inputs; returns ``(h, normed)``. The norm reads h as rounded to the input dtype."""
    _check_pair(residual, y)
    _validate(
        residual,
        {"y": y, "gate": gate, "shift": shift, "scale": scale},
        {"weight": weight, "bias": bias},
        needs_rows=True,
    )
    out, h = _run(backend, residual, y, gate, shift, scale, weight, bias, eps, True)
    return h, out


def _check_pair(residual: Tensor, y: Tensor) -> None:
    if not isinstance(residual, Tensor) or not isinstance(y, Tensor):
        raise TypeError("residual and y must be tensors")
    if residual.shape != y.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and y {tuple(y.shape)} must have the same shape")


# ------------------------------------------------------------------------------------ AOT fit specs


_STRIDES = tuple(f"{name}_{s}" for name in ("x", "y", "gate", "shift", "scale") for s in ("sb", "ss"))
# (dtype, BLOCK_D, aligned, fp32 parameters) compiled by the default test run: the model widths (1152, 1408,
# 1536: BLOCK_D 2048; 3072: 4096), fp32's largest live tile, the scalar path, Wan 1.3B's fp32 modulation
AOT_REPRESENTATIVE = {("bf16", 2048, True, False), ("bf16", 4096, True, False), ("fp32", 4096, True, False),
                      ("bf16", 128, False, False), ("bf16", 2048, True, True)}  # fmt: skip


def aot_spec(dtype: str, config: TritonConfig, aligned: bool = True, fp32_parameters: bool = False) -> AotSpec:
    """The AotSpec of the kernel the launcher runs with ``config`` for ``dtype`` ("fp32"/"bf16"), every
    feature on (the most registers). Aligned (D a multiple of 16, as every model's width): pointers,
    strides and D are multiples of 16, as the launcher specializes them, and every global load and store
    must be a vector (``vector_io``). Unaligned (D = 100, say): nothing known aligned; scalar allowed.
    ``fp32_parameters``: gate/shift/scale/weight/bias fp32 with a ``dtype`` input (Wan's modulation)."""
    pointer = f"*{dtype}"
    parameter = "*fp32" if fp32_parameters else pointer
    signature = {"out_ptr": pointer, "h_ptr": pointer}
    for name in ("x", "y", "gate", "shift", "scale"):
        kind = pointer if name in ("x", "y") else parameter
        signature.update({f"{name}_ptr": kind, f"{name}_sb": "i32", f"{name}_ss": "i32"})
    signature.update({"weight_ptr": parameter, "bias_ptr": parameter})
    signature.update({"n_rows": "i32", "seq_len": "i32", "dim": "i32", "eps": "fp32"})
    flags = ("HAS_Y", "HAS_GATE", "HAS_SHIFT", "HAS_SCALE", "HAS_WEIGHT", "HAS_BIAS", "NORMALIZE")
    constexprs = {flag: True for flag in flags} | {"BLOCK_M": config.block_m, "BLOCK_D": config.block_d}
    pointers = tuple(name for name, ty in signature.items() if ty.startswith("*"))
    return AotSpec.build(
        f"norm_modulate[{dtype}{'+fp32 parameters' if fp32_parameters else ''},"
        f"{'aligned' if aligned else 'unaligned'},BLOCK_M={config.block_m},BLOCK_D={config.block_d},"
        f"warps={config.num_warps}]",
        _norm_modulate_kernel, signature, constexprs, num_warps=config.num_warps,
        divisible_by_16=(*pointers, *_STRIDES, "dim") if aligned else (), vector_io=aligned,
        representative=(dtype, config.block_d, aligned, fp32_parameters) in AOT_REPRESENTATIVE,
    )  # fmt: skip


def aot_specs() -> list[AotSpec]:
    """Every config ``triton_config`` can pick: aligned for fp32 and bf16, unaligned for bf16 (the
    scalar path: one 64-bit address per element, the most registers), aligned bf16 with fp32 parameters. Compiled for sm_80 / sm_90a by
    ``dit_kernels.aot`` to prove no spills and vector accesses where aligned."""
    configs = triton_configs()
    cases = [(dtype, config, True) for dtype in ("fp32", "bf16") for config in configs]
    mixed = [aot_spec("bf16", config, True, fp32_parameters=True) for config in configs]  # Wan
    return [aot_spec(*case) for case in cases + [("bf16", config, False) for config in configs]] + mixed
