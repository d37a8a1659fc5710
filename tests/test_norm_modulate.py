"""Parity of the norm/modulate op family: Triton (interpreter on CPU, or GPU) and the CUDA C++ kernel
(CPU emulation, or GPU) against the torch reference; diffusers' own modules as a second reference;
torch.compile; bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.normalization import AdaLayerNormZero, FP32LayerNorm
from tolerances import assert_same_math, assert_within_eager_bound

from dit_kernels import backends
from dit_kernels.ops import gated_residual, gated_residual_layernorm_modulate, layernorm_modulate
from dit_kernels.ops import norm_modulate

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DIMS = [8, 64, 72, 100, 1152, 3072]  # tiny configs, SD3, DiT/PixArt, odd, DiT-XL hidden, FLUX hidden
FORMS = ["chunk", "b1d", "bsd"]  # [B, D] views from emb.chunk(6, dim=1), [B, 1, D], [B, S, D]
CPU_KERNELS = ["triton", "cuda_emu"]


def kernel_ulps(backend: str, dtype: torch.dtype) -> float:
    """See tolerances.py: the interpreter truncates bf16 stores (one more ulp, amplified by a norm)."""
    return 3.0 if backend == "triton" and dtype == torch.bfloat16 and backends.INTERPRETER_ON else 1.0


def require_cpu_kernel(backend: str) -> None:
    if backend == "triton" and not backends.INTERPRETER_ON:
        if torch.cuda.is_available():
            pytest.skip("CUDA present: Triton kernels run on the GPU here (tests marked gpu)")
        pytest.fail("TRITON_INTERPRET=1 must be set before dit_kernels is imported (tests/conftest.py)")


def make_inputs(dtype, dim, form, *, batch=2, seq=7, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed + dim)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    if form == "chunk":
        shift, scale, gate, *_ = randn(batch, 6 * dim, scale=0.5).chunk(6, dim=1)
    else:
        rows = 1 if form == "b1d" else seq
        shift, scale, gate = (randn(batch, rows, dim, scale=0.5) for _ in range(3))
    return {
        "x": randn(batch, seq, dim) + 0.3,  # a non-zero mean, so centring matters
        "y": randn(batch, seq, dim),
        "shift": shift,
        "scale": scale,
        "gate": gate,
        "weight": randn(dim, scale=0.1) + 1.0,
        "bias": randn(dim, scale=0.1),
    }


CASES = list(itertools.product(DTYPES, DIMS, FORMS))


def case_id(case):
    dtype, dim, form = case
    return f"{str(dtype).removeprefix('torch.')}-D{dim}-{form}"


# ------------------------------------------------------------------------------ kernels vs reference


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layernorm_modulate_matches_reference(backend, case):
    require_cpu_kernel(backend)
    dtype, dim, form = case
    t = make_inputs(dtype, dim, form)
    affine = {"weight": t["weight"], "bias": t["bias"]} if form == "bsd" else {}
    expected = layernorm_modulate(t["x"], t["shift"], t["scale"], **affine, backend="torch")
    actual = layernorm_modulate(t["x"], t["shift"], t["scale"], **affine, backend=backend)
    assert_same_math(actual, expected, ulps=kernel_ulps(backend, dtype), what=f"{backend} {case_id(case)}")


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gated_residual_matches_reference(backend, case):
    require_cpu_kernel(backend)
    dtype, dim, form = case
    t = make_inputs(dtype, dim, form)
    gate = None if form == "b1d" else t["gate"]  # the ungated residual (PixArt cross-attn, HunyuanDiT)
    expected = gated_residual(t["x"], t["y"], gate, backend="torch")
    actual = gated_residual(t["x"], t["y"], gate, backend=backend)
    assert_same_math(actual, expected, ulps=kernel_ulps(backend, dtype), what=f"{backend} {case_id(case)}")


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_residual_norm_matches_reference(backend, case):
    require_cpu_kernel(backend)
    dtype, dim, form = case
    t = make_inputs(dtype, dim, form)
    extra = {"weight": t["weight"], "bias": t["bias"]} if form == "bsd" else {}
    args = (t["x"], t["y"], t["gate"], t["shift"], t["scale"])
    h_ref, out_ref = gated_residual_layernorm_modulate(*args, **extra, backend="torch")
    h, out = gated_residual_layernorm_modulate(*args, **extra, backend=backend)
    ulps = kernel_ulps(backend, dtype)
    assert_same_math(h, h_ref, ulps=ulps, what=f"h {backend} {case_id(case)}")
    assert_same_math(out, out_ref, ulps=ulps, what=f"out {backend} {case_id(case)}")


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_and_shift_only_layernorm(backend, dtype):
    """FP32LayerNorm (affine, no modulation) over [..., D] inputs, and HunyuanDiT's shift-only form."""
    require_cpu_kernel(backend)
    t = make_inputs(dtype, 88, "b1d", seq=33)
    ulps = kernel_ulps(backend, dtype)
    for x in (t["x"], t["x"][0], t["x"].reshape(2, 3, 11, 88)):
        expected = layernorm_modulate(x, weight=t["weight"], bias=t["bias"], eps=1e-5, backend="torch")
        actual = layernorm_modulate(x, weight=t["weight"], bias=t["bias"], eps=1e-5, backend=backend)
        assert_same_math(actual, expected, ulps=ulps, what=f"plain {tuple(x.shape)}")
    expected = layernorm_modulate(t["x"], shift=t["shift"], backend="torch")
    assert_same_math(layernorm_modulate(t["x"], shift=t["shift"], backend=backend), expected, ulps=ulps)


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_strided_and_odd_row_counts(backend):
    """Inputs that are views (a slice of a fused projection, a transposed batch) and odd row counts."""
    require_cpu_kernel(backend)
    dtype, dim = torch.bfloat16, 72
    for seq in (1, 77, 333):
        t = make_inputs(dtype, dim, "chunk", seq=seq)
        fused = torch.randn(seq, 2, 3 * dim).to(dtype)
        x = fused[..., dim : 2 * dim].transpose(0, 1)  # [2, seq, dim], strides (3D, 6D, 1)
        y = t["y"].transpose(0, 1).contiguous().transpose(0, 1)
        gate = t["gate"].unsqueeze(1).expand(2, seq, dim)  # a stride-0 expand is accepted as is
        h_ref, out_ref = gated_residual_layernorm_modulate(x, y, gate, t["shift"], t["scale"], backend="torch")
        h, out = gated_residual_layernorm_modulate(x, y, gate, t["shift"], t["scale"], backend=backend)
        ulps = kernel_ulps(backend, dtype)
        assert_same_math(h, h_ref, ulps=ulps, what=f"h seq={seq}")
        assert_same_math(out, out_ref, ulps=ulps, what=f"out seq={seq}")
        assert h.is_contiguous() and out.is_contiguous()


def test_modulation_broadcast_over_batch():
    """A [1, D] modulation broadcasts over a batch of 2 (stride 0 on the batch)."""
    t = make_inputs(torch.float32, 16, "b1d")
    shift = t["shift"][:1, 0]
    expected = F.layer_norm(t["x"], (16,), eps=1e-6) + shift
    torch.testing.assert_close(layernorm_modulate(t["x"], shift=shift, backend="torch"), expected)


# ---------------------------------------------------------------------- diffusers as a second reference


@pytest.mark.parametrize("backend", ["torch", *CPU_KERNELS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_diffusers_ada_layer_norm_zero(backend, dtype):
    """AdaLayerNormZero (DiT/SD3 norm1): our op on its chunks vs the module, bounded by the module's own
    low-precision error against its fp32 run."""
    if backend != "torch":
        require_cpu_kernel(backend)
    torch.manual_seed(0)
    dim = 72
    module = AdaLayerNormZero(dim)
    x, emb = torch.randn(2, 33, dim), torch.randn(2, dim)
    truth = module(x, emb=emb)[0]
    low = module.to(dtype)
    eager = low(x.to(dtype), emb=emb.to(dtype))[0]
    shift, scale, *_ = low.linear(low.silu(emb.to(dtype))).chunk(6, dim=1)
    ours = layernorm_modulate(x.to(dtype), shift, scale, eps=low.norm.eps, backend=backend)
    assert_within_eager_bound(ours, eager, truth, what=f"AdaLayerNormZero {backend} {dtype}")


@pytest.mark.parametrize("backend", ["torch", *CPU_KERNELS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_diffusers_fp32_layer_norm(backend, dtype):
    """FP32LayerNorm (HunyuanDiT): the same fp32 math and one rounding, so the same-math bound holds."""
    if backend != "torch":
        require_cpu_kernel(backend)
    torch.manual_seed(0)
    module = FP32LayerNorm(88, elementwise_affine=True, eps=1e-6).to(dtype)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.1)
        module.bias.normal_(0.0, 0.1)
    x = torch.randn(2, 19, 88).to(dtype)
    expected = module(x)
    actual = layernorm_modulate(x, weight=module.weight, bias=module.bias, eps=module.eps, backend=backend)
    assert_same_math(actual.detach(), expected.detach(), ulps=kernel_ulps(backend, dtype), what="FP32LayerNorm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_within_eager_bound(dtype):
    """DiT's `h = h + gate * attn; norm2(h) * (1 + scale) + shift` done eagerly in low precision vs ours."""
    t = make_inputs(torch.float32, 1152, "chunk", seq=64)
    truth_h = t["x"] + t["gate"][:, None] * t["y"]
    truth = F.layer_norm(truth_h, (1152,), eps=1e-6) * (1 + t["scale"][:, None]) + t["shift"][:, None]
    low = {k: v.to(dtype) for k, v in t.items()}
    eager_h = low["x"] + low["gate"][:, None] * low["y"]
    eager = F.layer_norm(eager_h, (1152,), eps=1e-6) * (1 + low["scale"][:, None]) + low["shift"][:, None]
    h, out = gated_residual_layernorm_modulate(low["x"], low["y"], low["gate"], low["shift"], low["scale"])
    assert_within_eager_bound(h, eager_h, truth_h, what="h")
    assert_within_eager_bound(out, eager, truth, what="out")


# ---------------------------------------------------------------------------------- torch.compile


def test_reference_under_torch_compile_fullgraph():
    t = make_inputs(torch.float32, 72, "chunk")

    def block(x, y, gate, shift, scale):
        h, normed = gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="torch")
        return gated_residual(h, normed, gate, backend="torch")

    args = (t["x"], t["y"], t["gate"], t["shift"], t["scale"])
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(*args), block(*args), rtol=1e-5, atol=1e-5)


def test_native_custom_op_traces_under_torch_compile():
    """The CUDA-kernel custom op (here its CPU emulation) with its fake implementation, in a full graph."""
    t = make_inputs(torch.bfloat16, 64, "chunk")

    def block(x, y, gate, shift, scale):
        return gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="cuda_emu")

    args = (t["x"], t["y"], t["gate"], t["shift"], t["scale"])
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*args), block(*args)):
        assert torch.equal(got, want)


def opcheck_all_forms(op, device):
    """torch.library.opcheck (schema, fake tensor) over the op's three uses."""
    t = make_inputs(torch.float32, 40, "b1d", seq=3, device=device)
    full = (t["x"], t["y"], t["gate"], t["shift"], t["scale"], t["weight"], t["bias"], 1e-6, True)
    plain = (t["x"], None, None, None, None, None, None, 1e-5, True)
    residual_only = (t["x"], t["y"], None, None, None, None, None, 0.0, False)
    for args in (full, plain, residual_only):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_native_custom_op_registration():
    """The Triton op's fake comes from tracing its launcher, which the interpreter cannot do on fake
    tensors: it is checked on GPU (test_gpu_triton_custom_op_registration)."""
    opcheck_all_forms(norm_modulate._CUSTOM_OPS["cuda_emu"], "cpu")


# -------------------------------------------------------------------------------------- bad input


def test_rejects_bad_input_with_clear_errors():
    x = torch.randn(2, 5, 16)
    with pytest.raises(TypeError, match="int64"):
        layernorm_modulate(torch.ones(2, 5, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="shift has dtype torch.float16"):
        layernorm_modulate(x, shift=torch.randn(2, 16).half())
    with pytest.raises(ValueError, match="is on meta"):
        layernorm_modulate(x, scale=torch.randn(2, 16, device="meta"))
    with pytest.raises(ValueError, match="does not broadcast"):
        layernorm_modulate(x, shift=torch.randn(2, 17))
    with pytest.raises(ValueError, match="does not broadcast"):
        layernorm_modulate(x, shift=torch.randn(3, 1, 16))
    with pytest.raises(ValueError, match=r"weight must have shape \[16\]"):
        layernorm_modulate(x, weight=torch.randn(8))
    with pytest.raises(ValueError, match=r"must be \[B, S, D\]"):
        layernorm_modulate(x[0], shift=torch.randn(2, 16))
    with pytest.raises(ValueError, match="non-empty last dimension"):
        layernorm_modulate(torch.randn(2, 5, 0))
    with pytest.raises(ValueError, match="same shape"):
        gated_residual(x, torch.randn(2, 4, 16))
    with pytest.raises(TypeError, match="must be tensors"):
        gated_residual(x, None)
    with pytest.raises(ValueError, match="unknown backend"):
        layernorm_modulate(x, backend="cutlass")
    with pytest.raises(RuntimeError, match="cuda_emu"):
        layernorm_modulate(x, backend="cuda")
    with pytest.raises(ValueError, match="D <= 8192"):
        norm_modulate.triton_config(8193)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_fp32_parameters_with_a_low_precision_input(dtype):
    """Wan's modulation (computed in fp32) and diffusers' kept-fp32 norm weights: the reference equals the
    same math on the input upcast (parameters read as fp32, one rounding); Triton matches it; the CUDA
    kernel, which reads parameters in the input dtype, refuses the mix with a message."""
    t32 = make_inputs(torch.float32, 72, "bsd")
    x, y = t32["x"].to(dtype), t32["y"].to(dtype)
    params = {k: t32[k] for k in ("gate", "shift", "scale", "weight", "bias")}
    h, out = gated_residual_layernorm_modulate(x, y, **params, backend="torch")
    h32 = (x.float() + params["gate"] * y.float()).to(dtype)
    normed = F.layer_norm(h32.float(), (72,), params["weight"], params["bias"], eps=1e-6)
    assert torch.equal(h, h32)
    assert torch.equal(out, (normed * (1 + params["scale"]) + params["shift"]).to(dtype))
    require_cpu_kernel("triton")
    for a, e in zip(gated_residual_layernorm_modulate(x, y, **params, backend="triton"), (h, out)):
        assert_same_math(a, e, ulps=kernel_ulps("triton", dtype), what=f"triton {dtype} fp32 parameters")
    with pytest.raises(ValueError, match="gate, shift, scale, weight, bias are float32"):
        gated_residual_layernorm_modulate(x, y, **params, backend="cuda_emu")
    with pytest.raises(TypeError, match="y has dtype torch.float32"):
        gated_residual(x, t32["y"])


@pytest.mark.parametrize("backend", ["torch", *CPU_KERNELS])
def test_zero_rows_give_empty_outputs(backend):
    if backend == "triton":
        require_cpu_kernel(backend)
    x = torch.randn(2, 0, 16)
    h, out = gated_residual_layernorm_modulate(x, x, torch.randn(2, 16), backend=backend)
    assert h.shape == out.shape == (2, 0, 16)


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gpu_kernels_match_reference(backend, case):
    dtype, dim, form = case
    t = make_inputs(dtype, dim, form, seq=129, device="cuda")
    args = (t["x"], t["y"], t["gate"], t["shift"], t["scale"], t["weight"], t["bias"])
    h_ref, out_ref = gated_residual_layernorm_modulate(*args, backend="torch")
    h, out = gated_residual_layernorm_modulate(*args, backend=backend)
    assert_same_math(h, h_ref, what=f"h {backend} {case_id(case)}")
    assert_same_math(out, out_ref, what=f"out {backend} {case_id(case)}")
    ln = layernorm_modulate(t["x"], t["shift"], t["scale"], backend=backend)
    assert_same_math(ln, layernorm_modulate(t["x"], t["shift"], t["scale"], backend="torch"), what="ln")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_ungated_residual_is_bit_exact(backend, dtype):
    """`residual + y` is one fp32 add and one rounding in every implementation: identical bits."""
    t = make_inputs(dtype, 3072, "bsd", batch=1, seq=1024, device="cuda")
    assert torch.equal(gated_residual(t["x"], t["y"], backend=backend), gated_residual(t["x"], t["y"], backend="torch"))


@pytest.mark.gpu
def test_gpu_default_backend_and_compile():
    t = make_inputs(torch.bfloat16, 3072, "chunk", batch=1, seq=256, device="cuda")
    args = (t["x"], t["shift"], t["scale"])
    expected = layernorm_modulate(*args, backend="torch")
    assert_same_math(layernorm_modulate(*args), expected, what="auto backend")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: layernorm_modulate(*a, backend="triton"), fullgraph=True)
    assert_same_math(compiled(*args), expected, what="triton under torch.compile")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_custom_op_registration(backend):
    opcheck_all_forms(norm_modulate._CUSTOM_OPS[backend], "cuda")
