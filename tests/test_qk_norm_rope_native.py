"""qk_norm_rope: the CUDA C++ kernel (csrc/include/dit_kernels/qk_norm_rope.cuh) against the torch
reference, through the CPU emulation (``cuda_emu``, dit_kernels._C_cpu) here and on the GPU (``cuda``,
dit_kernels._C) in the gpu-marked tests. The emulator runs 256 std::threads per launch and every warp
shuffle is a barrier, so the CPU shapes are small; the GPU tests use FLUX-like shapes."""

import itertools

import pytest
import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from tolerances import assert_same_math

from dit_kernels import backends
from dit_kernels.ops.qk_norm_rope import _CUSTOM_OPS, MAX_CUDA_HEAD_DIM, qk_norm_rope

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [8, 64, 72, 88, 128]  # tiny configs, SD3, DiT/PixArt, HunyuanDiT, FLUX
NORMS = ["rms", "layer", None]
ROPES = ["interleaved", "half", None]
CASES = list(itertools.product(DTYPES, HEAD_DIMS, NORMS, ROPES))


def case_id(case):
    dtype, dim, norm, rope = case
    return f"{str(dtype).removeprefix('torch.')}-Dh{dim}-{norm}-{rope}"


def tables(dim: int, rope: str, rows: int = 96, device="cpu"):
    cos, sin = get_1d_rotary_pos_embed(dim, rows, use_real=True, repeat_interleave_real=rope == "interleaved")
    return cos.float().to(device), sin.float().to(device)


def qkv(dtype, dim, *, batch=2, sq=3, sk=5, heads=2, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed + dim)
    def make(seq):  # a non-zero mean, so LayerNorm's centring matters
        return (torch.randn(batch, seq, heads, dim, generator=gen) + 0.3).to(device=device, dtype=dtype)

    return make(sq), make(sk), make(sk)


def vectors(dtype, dim, *, weight=True, bias=True, device="cpu"):
    """q/k weights (around 1) and biases (around 0) for the norm, each only when asked for."""
    gen = torch.Generator().manual_seed(dim)
    vec = lambda base: (base + 0.1 * torch.randn(dim, generator=gen)).to(device=device, dtype=dtype)  # noqa: E731
    out = {}
    if weight:
        out |= {"q_weight": vec(1.0), "k_weight": vec(1.0)}
    if bias:
        out |= {"q_bias": vec(0.0), "k_bias": vec(0.0)}
    return out


def rope_kwargs(dim, rope, device="cpu", rows=96):
    if rope is None:
        return {}
    cos, sin = tables(dim, rope, rows=rows, device=device)
    return {"cos": cos, "sin": sin, "rope": rope}


def check_against_reference(backend, q, k, what, **kwargs):
    expected = qk_norm_rope(q, k, **kwargs, backend="torch")
    actual = qk_norm_rope(q, k, **kwargs, backend=backend)
    assert len(actual) == len(expected) == (3 if kwargs.get("v") is not None else 2)
    for name, a, e in zip("qkv", actual, expected):
        assert_same_math(a, e, what=f"{name} {what}")
    if kwargs.get("v") is not None:
        assert torch.equal(actual[2], kwargs["v"])  # V is copied bit-exactly
    return actual, expected


# ------------------------------------------------------------------------------ kernel vs reference


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_emulated_kernel_matches_reference(case):
    """Every dtype x head dim x norm x RoPE layout; weights for rms (FLUX, SD3), weights and biases for
    layer (HunyuanDiT); Sq != Sk, seq_offset > 0; V present in half the cases, absent in the others."""
    dtype, dim, norm, rope = case
    q, k, v = qkv(dtype, dim)
    with_v = CASES.index(case) % 2 == 0
    params = {} if norm is None else vectors(dtype, dim, bias=norm == "layer")
    check_against_reference(
        "cuda_emu", q, k, case_id(case), v=v if with_v else None, norm=norm, seq_offset=3, eps=1e-5,
        **rope_kwargs(dim, rope), **params,
    )  # fmt: skip


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
def test_norm_with_and_without_weight_and_bias(norm, affine):
    """Weight and bias each present or absent, on q and k independently (q gets them, k only a weight)."""
    dtype, dim = torch.float16, 64
    q, k, v = qkv(dtype, dim, seed=4)
    params = vectors(dtype, dim, weight=affine in ("weight", "both"), bias=affine in ("bias", "both"))
    params.pop("k_bias", None)
    for rope in ("half", None):
        check_against_reference("cuda_emu", q, k, f"{norm} {affine} {rope}", v=v, norm=norm,
                                **rope_kwargs(dim, rope), **params)  # fmt: skip


@pytest.mark.parametrize("seq", [(1, 1), (77, 77), (1, 77), (77, 1)], ids=lambda s: f"Sq{s[0]}-Sk{s[1]}")
def test_sequence_lengths_and_q_only_rope(seq):
    """Odd and unequal sequence lengths (more rows than the emulated grid's 24 warps: the grid-stride
    loop); RoPE on q only (HunyuanDiT's cross-attention: a table of the image's rows only), with and
    without V."""
    dtype, dim = torch.bfloat16, 88
    q, k, v = qkv(dtype, dim, sq=seq[0], sk=seq[1], heads=1, seed=1)
    params = vectors(dtype, dim)
    what = f"Sq={seq[0]} Sk={seq[1]}"
    actual, _ = check_against_reference("cuda_emu", q, k, what, v=v, norm="layer", rope_k=False,
                                        **rope_kwargs(dim, "interleaved", rows=seq[0]), **params)  # fmt: skip
    unrotated = qk_norm_rope(q, k, norm="layer", **params, backend="torch")[1]
    assert_same_math(actual[1], unrotated, what=f"k without RoPE {what}")
    check_against_reference("cuda_emu", q, k, f"{what} no v", norm="rms", seq_offset=5,
                            **rope_kwargs(dim, "half"), **params)  # fmt: skip


@pytest.mark.parametrize("order", ["sd3_image_first", "flux_text_first"])
@pytest.mark.parametrize("with_v", [True, False], ids=["v", "no_v"])
def test_joint_buffer_writes_at_offsets(order, with_v):
    """Two streams land in one [B, S_total, H, Dh] buffer each for q, k (and v), at seq_offset 0 and > 0:
    each launch writes exactly its rows (the others keep their previous contents), and the result equals
    the reference's fresh tensors."""
    dtype, dim, heads = torch.float16, 64, 2
    streams = [qkv(dtype, dim, sq=6, sk=6, heads=heads, seed=1), qkv(dtype, dim, sq=3, sk=3, heads=heads, seed=2)]
    if order == "flux_text_first":
        streams.reverse()
    total = 9
    cos, sin = tables(dim, "interleaved", rows=total)
    params = vectors(dtype, dim, bias=False)
    n_out = 3 if with_v else 2
    buffers = [torch.full((2, total, heads, dim), 7.0, dtype=dtype) for _ in range(n_out)]
    offset = 0
    for q, k, v in streams:
        v = v if with_v else None
        before = [b.clone() for b in buffers]
        out = dict(zip(("out_q", "out_k", "out_v"), buffers))
        written = qk_norm_rope(q, k, v=v, cos=cos, sin=sin, seq_offset=offset, **out, **params, backend="cuda_emu")
        assert len(written) == n_out
        assert all(w.data_ptr() == b[:, offset].data_ptr() for w, b in zip(written, buffers))
        fresh = qk_norm_rope(q, k, v=v, cos=cos, sin=sin, seq_offset=offset, **params, backend="torch")
        for name, w, f in zip("qkv", written, fresh):
            assert_same_math(w, f, what=f"{name} {order} offset {offset}")
        rows = slice(offset, offset + q.shape[1])
        for b, old in zip(buffers, before):
            untouched = torch.ones(total, dtype=torch.bool)
            untouched[rows] = False
            assert torch.equal(b[:, untouched], old[:, untouched]), f"rows outside {rows} changed"
        offset += q.shape[1]
    assert not any((b == 7.0).all(dim=-1).any() for b in buffers)  # every row written exactly once


def test_strided_views_of_a_fused_projection():
    """q, k, v as views of a fused [B, S, 3, H, Dh] projection (strides S*3*H*Dh, 3*H*Dh, Dh), read in place."""
    dtype, dim = torch.bfloat16, 72
    fused = torch.randn(2, 7, 3, 2, dim).to(dtype)
    q, k, v = fused.unbind(2)
    assert not q.is_contiguous()
    for rope in ("half", "interleaved"):
        check_against_reference("cuda_emu", q, k, f"fused {rope}", v=v, **rope_kwargs(dim, rope),
                                **vectors(dtype, dim, bias=False))  # fmt: skip


def test_empty_sequences():
    dtype, dim = torch.float32, 16
    q, k, v = qkv(dtype, dim, sq=0, sk=4)
    check_against_reference("cuda_emu", q, k, "Sq=0", v=v, **rope_kwargs(dim, "half"))
    q, k, v = qkv(dtype, dim, sq=0, sk=0)
    outs = qk_norm_rope(q, k, v=v, backend="cuda_emu")
    assert [tuple(o.shape) for o in outs] == [(2, 0, 2, dim)] * 3


# -------------------------------------------------------------------------------------- custom ops


def test_emulated_custom_ops_registration():
    """torch.library.opcheck (schema, fake tensor) of the functional and the joint-buffer op."""
    functional, into = _CUSTOM_OPS["cuda_emu"]
    dtype, dim = torch.float32, 16
    q, k, v = qkv(dtype, dim, sq=2, sk=3, heads=1)
    cos, sin = tables(dim, "interleaved", rows=8)
    w = vectors(dtype, dim)
    args = (q, k, v, w["q_weight"], w["k_weight"], w["q_bias"], w["k_bias"], cos, sin)
    flags = ("layer", "interleaved", True, False, 2, 1e-6, False)  # ..., eps, across_heads
    torch.library.opcheck(functional, (*args, *flags), test_utils=("test_schema", "test_faketensor"))
    no_v = (q, k, None, None, None, None, None, None, None)
    torch.library.opcheck(functional, (*no_v, None, "half", True, True, 0, 1e-6, False),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    buffers = [torch.zeros(2, 7, 1, dim) for _ in range(3)]  # the joint buffers; the op writes the given rows
    outs = [buffers[0][:, 2:4], *(b[:, 4:7] for b in buffers[1:])]
    torch.library.opcheck(into, (*args, *outs, *flags), test_utils=("test_schema", "test_faketensor"))
    assert set(_CUSTOM_OPS) >= {"cuda", "cuda_emu"}


# -------------------------------------------------------------------------------------- bad input


# across_heads (Wan's whole-projection norm, qk_norm_rope_across.cuh): heads x head dim, (norm, rope) pairs
ACROSS = [(dtype, shape, *pair) for dtype, (shape, pair) in itertools.product(DTYPES, zip(
    [(3, 8), (5, 24), (2, 72)], [("rms", "interleaved"), ("layer", "half"), (None, "interleaved")]))]  # fmt: skip


@pytest.mark.parametrize("case", ACROSS, ids=lambda c: f"{str(c[0])[6:]}-H{c[1][0]}xDh{c[1][1]}-{c[2]}-{c[3]}")
def test_emulated_across_heads_kernel_matches_reference(case):
    """Each token normalised over all its heads (weight / bias [H * Dh]), then RoPE per head; V copied; a
    one-row table broadcast in the last case of each dtype."""
    dtype, (heads, dim), norm, rope = case
    q, k, v = qkv(dtype, dim, heads=heads)
    params = {} if norm is None else vectors(dtype, heads * dim, bias=norm == "layer")
    rotary = rope_kwargs(dim, rope, rows=1 if norm is None else 96)
    check_against_reference("cuda_emu", q, k, str(case), v=v, norm=norm, seq_offset=0 if norm is None else 2,
                            across_heads=True, **params, **rotary)  # fmt: skip


def test_head_dim_limit_and_binding_validation():
    q, k, _ = qkv(torch.float32, 514, sq=1, sk=1, batch=1, heads=1)
    with pytest.raises(ValueError, match=f"head_dim <= {MAX_CUDA_HEAD_DIM}"):
        qk_norm_rope(q, k, backend="cuda_emu")
    native = backends.emulation_module()
    x = torch.zeros(1, 1, 1, 16)
    slot = (x.data_ptr(), 16, 16, 16, 1, x.data_ptr(), 16, 16, 16, 0, 0, True, False)
    absent = (0,) * 11 + (False, False)
    base = dict(dtype="float32", batch=1, heads=1, head_dim=16, q=slot, k=slot, v=absent, norm=1, eps=1e-6,
                cos=0, sin=0, rope_offset=0, rope_stride=16, rope_half=False, across_heads=False, stream=0)  # fmt: skip
    native.qk_norm_rope(**base)  # a valid call
    bad = [
        ({"dtype": "int8"}, "unsupported dtype"),
        ({"head_dim": 513}, "head_dim <= 512"),
        ({"heads": 0}, "heads > 0"),
        ({"k": absent[:4] + (1,) + absent[5:]}, "k is required"),
        ({"norm": 3}, "norm must be"),
        ({"cos": x.data_ptr()}, "cos and sin go together"),
        ({"q": slot[:-1] + (True,)}, "cos/sin are missing"),
        ({"q": slot[:-1] + (True,), "head_dim": 15, "cos": 1, "sin": 1}, "head_dim must be even"),
        ({"k": slot[:5] + (0,) + slot[6:]}, "k needs a destination"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            native.qk_norm_rope(**(base | change))


# ------------------------------------------------------------------------------------------- GPU

FLUX = {"batch": 1, "sq": 512 + 64, "sk": 512 + 64, "heads": 24}


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gpu_kernel_matches_reference(case):
    dtype, dim, norm, rope = case
    q, k, v = qkv(dtype, dim, **FLUX, device="cuda")
    params = {} if norm is None else vectors(dtype, dim, bias=norm == "layer", device="cuda")
    check_against_reference("cuda", q, k, case_id(case), v=v, norm=norm, seq_offset=64,
                            **rope_kwargs(dim, rope, "cuda", rows=1024), **params)  # fmt: skip
    check_against_reference("cuda", q, k[:, :77], f"{case_id(case)} Sk=77 q-only RoPE", norm=norm, rope_k=False,
                            **rope_kwargs(dim, rope, "cuda", rows=1024), **params)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_joint_buffer_and_fused_projection(dtype):
    """FLUX: text (512) then image stream into one buffer, q/k/v read as views of a fused projection."""
    dim, heads = 128, 24
    cos, sin = tables(dim, "interleaved", rows=1024 + 512, device="cuda")
    params = vectors(dtype, dim, bias=False, device="cuda")
    buffers = [torch.full((1, 512 + 1024, heads, dim), 7.0, dtype=dtype, device="cuda") for _ in range(3)]
    offset = 0
    for seq in (512, 1024):
        fused = torch.randn(1, seq, 3, heads, dim, device="cuda").to(dtype)
        q, k, v = fused.unbind(2)
        out = dict(zip(("out_q", "out_k", "out_v"), buffers))
        written = qk_norm_rope(q, k, v=v, cos=cos, sin=sin, seq_offset=offset, **out, **params, backend="cuda")
        fresh = qk_norm_rope(q, k, v=v, cos=cos, sin=sin, seq_offset=offset, **params, backend="torch")
        for name, w, f in zip("qkv", written, fresh):
            assert_same_math(w, f, what=f"{name} offset {offset}")
        assert all(w.data_ptr() == b[:, offset].data_ptr() for w, b in zip(written, buffers))
        offset += seq
    assert not any((b == 7.0).all(dim=-1).any() for b in buffers)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_across_heads_matches_reference(backend, dtype):
    """Wan 2.1 1.3B's self-attention prologue: 12 heads x 128, q/k normalised over the whole projection
    (views of a fused QKV projection), its 3D RoPE; and 14B's 40 heads without RoPE (cross-attention)."""
    for heads, rope in ((12, "interleaved"), (40, None)):
        fused = (torch.randn(1, 1560, 3, heads, 128, device="cuda") + 0.3).to(dtype)
        q, k, v = fused.unbind(2)
        params = vectors(dtype, heads * 128, bias=False, device="cuda")
        check_against_reference(backend, q, k, f"{backend} H{heads}", v=v, across_heads=True, **params,
                                **rope_kwargs(128, rope, device="cuda", rows=1560))  # fmt: skip


@pytest.mark.gpu
def test_gpu_custom_ops_registration_and_compile():
    functional, into = _CUSTOM_OPS["cuda"]
    q, k, v = qkv(torch.bfloat16, 128, device="cuda")
    cos, sin = tables(128, "interleaved", device="cuda")
    args = (q, k, v, None, None, None, None, cos, sin)
    flags = (None, "interleaved", True, True, 0, 1e-6, False)  # ..., eps, across_heads
    torch.library.opcheck(functional, (*args, *flags), test_utils=("test_schema", "test_faketensor"))
    outs = [torch.zeros(2, 16, 2, 128, dtype=torch.bfloat16, device="cuda")[:, 1 : 1 + t.shape[1]] for t in (q, k, v)]
    torch.library.opcheck(into, (*args, *outs, *flags), test_utils=("test_schema", "test_faketensor"))
    fn = lambda q, k, v: qk_norm_rope(q, k, v=v, norm=None, cos=cos, sin=sin, backend="cuda")  # noqa: E731
    torch._dynamo.reset()
    for got, want in zip(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v)):
        assert torch.equal(got, want)
