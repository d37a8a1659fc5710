"""qk_norm_rope: the Triton kernel (interpreter on CPU, or GPU) against the torch reference; diffusers'
own RMSNorm / LayerNorm + apply_rotary_emb as a second reference; joint-buffer writes; bad input."""

import itertools

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from tolerances import assert_same_math, assert_within_eager_bound

from dit_kernels import backends
from dit_kernels.ops.qk_norm_rope import _CUSTOM_OPS, across_config, across_configs, qk_norm_rope, rope_tables
from dit_kernels.ops.qk_norm_rope import triton_config, triton_configs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [8, 64, 72, 88, 128]  # tiny configs, SD3, DiT/PixArt, HunyuanDiT, FLUX
UNBIND_DIM = {"interleaved": -1, "half": -2}


def require_triton() -> None:
    if not backends.triton().available:
        pytest.fail(backends.triton().reason)


def ulps(dtype) -> float:
    """tolerances.py: the interpreter truncates bf16 stores (one more ulp)."""
    return 2.0 if dtype == torch.bfloat16 and backends.INTERPRETER_ON else 1.0


def tables(dim: int, rope: str, rows: int = 512, device="cpu"):
    cos, sin = get_1d_rotary_pos_embed(dim, rows, use_real=True, repeat_interleave_real=rope == "interleaved")
    return cos.float().to(device), sin.float().to(device)


def qkv(dtype, dim, *, batch=2, sq=5, sk=9, heads=2, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed + dim)
    make = lambda s: torch.randn(batch, s, heads, dim, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return make(sq), make(sk), make(sk)


def norm_params(dtype, dim, norm, device="cpu"):
    if norm is None:
        return {}
    gen = torch.Generator().manual_seed(dim)
    vec = lambda scale, base: (base + scale * torch.randn(dim, generator=gen)).to(device=device, dtype=dtype)  # noqa: E731
    params = {"q_weight": vec(0.1, 1.0), "k_weight": vec(0.1, 1.0)}
    if norm == "layer":
        params |= {"q_bias": vec(0.1, 0.0), "k_bias": vec(0.1, 0.0)}
    return params


def run_both(backend, q, k, **kwargs):
    expected = qk_norm_rope(q, k, **kwargs, backend="torch")
    actual = qk_norm_rope(q, k, **kwargs, backend=backend)
    return actual, expected


CASES = list(itertools.product(DTYPES, HEAD_DIMS, ["rms", "layer", None], ["interleaved", "half", None]))


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{str(c[0])[6:]}-Dh{c[1]}-{c[2]}-{c[3]}"
)
def test_triton_matches_reference(case):
    require_triton()
    dtype, dim, norm, rope = case
    q, k, v = qkv(dtype, dim)
    rope_args = {} if rope is None else dict(zip(("cos", "sin"), tables(dim, rope))) | {"rope": rope}
    actual, expected = run_both("triton", q, k, v=v, norm=norm, seq_offset=3, **rope_args, **norm_params(dtype, dim, norm))
    for name, a, e in zip("qkv", actual, expected):
        assert_same_math(a, e, ulps=ulps(dtype), what=f"{name} {case}")
    assert torch.equal(actual[2], v)  # V is copied exactly


@pytest.mark.parametrize("seq", [(1, 1), (77, 77), (333, 77), (1, 333)])
def test_odd_sequence_lengths_and_q_only_rope(seq):
    """HunyuanDiT's cross-attention: LayerNorm on q (image) and k (text), RoPE on q only, Sq != Sk; the
    table has the image's rows only (k, unrotated, may be longer)."""
    require_triton()
    dtype, dim = torch.bfloat16, 88
    q, k, _ = qkv(dtype, dim, sq=seq[0], sk=seq[1], batch=1, heads=3)
    cos, sin = tables(dim, "interleaved", rows=seq[0])
    kwargs = dict(norm="layer", cos=cos, sin=sin, rope_k=False, **norm_params(dtype, dim, "layer"))
    actual, expected = run_both("triton", q, k, **kwargs)
    for a, e in zip(actual, expected):
        assert_same_math(a, e, ulps=ulps(dtype))
    unrotated = qk_norm_rope(q, k, norm="layer", **norm_params(dtype, dim, "layer"), backend="torch")[1]
    assert torch.equal(expected[1], unrotated)


@pytest.mark.parametrize("order", ["sd3_image_first", "flux_text_first"])
def test_joint_buffer_writes_at_offsets(order):
    """Two streams land in one [B, S_total, H, Dh] buffer; rows outside each stream are untouched."""
    require_triton()
    dtype, dim, heads = torch.float16, 64, 2
    img_q, img_k, img_v = qkv(dtype, dim, sq=12, sk=12, heads=heads, seed=1)
    txt_q, txt_k, txt_v = qkv(dtype, dim, sq=5, sk=5, heads=heads, seed=2)
    streams = [(img_q, img_k, img_v), (txt_q, txt_k, txt_v)]
    if order == "flux_text_first":
        streams.reverse()
    cos, sin = tables(dim, "interleaved", rows=17)
    params = norm_params(dtype, dim, "rms")
    for backend in ("torch", "triton"):
        buffers = [torch.full((2, 17, heads, dim), 7.0, dtype=dtype) for _ in range(3)]
        offset = 0
        for q, k, v in streams:
            out = dict(zip(("out_q", "out_k", "out_v"), buffers))
            written = qk_norm_rope(q, k, v=v, cos=cos, sin=sin, seq_offset=offset, **out, **params, backend=backend)
            assert all(w.data_ptr() == b[:, offset].data_ptr() for w, b in zip(written, buffers))
            fresh = qk_norm_rope(q, k, v=v, cos=cos, sin=sin, seq_offset=offset, **params, backend="torch")
            for w, f in zip(written, fresh):
                assert_same_math(w, f, what=f"{backend} {order} offset {offset}")
            offset += q.shape[1]
        assert not any((b == 7.0).all(dim=-1).any() for b in buffers)  # every row written exactly once


def test_strided_views_of_a_fused_projection():
    require_triton()
    dtype, dim = torch.bfloat16, 72
    fused = torch.randn(2, 33, 3, 4, dim).to(dtype)  # [B, S, (q, k, v), H, Dh]
    q, k, v = fused.unbind(2)
    cos, sin = tables(dim, "half")
    actual, expected = run_both("triton", q, k, v=v, cos=cos, sin=sin, rope="half", **norm_params(dtype, dim, "rms"))
    for a, e in zip(actual, expected):
        assert_same_math(a, e, ulps=ulps(dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_flux_attention_prologue_matches_diffusers(backend, dtype):
    """FLUX: torch.nn.RMSNorm on q/k then apply_rotary_emb (interleaved), as diffusers runs it in low
    precision, vs the same in fp32: ours must stay within 2x eager's error."""
    if backend == "triton":
        require_triton()
    torch.manual_seed(0)
    dim = 128
    norm_q, norm_k = torch.nn.RMSNorm(dim, eps=1e-6), torch.nn.RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm_q.weight.normal_(1.0, 0.1)
        norm_k.weight.normal_(1.0, 0.1)
    q, k, _ = qkv(torch.float32, dim, sq=40, sk=40, heads=3)
    cos, sin = tables(dim, "interleaved", rows=40)

    def diffusers_path(q, k, nq, nk):
        rotated = [apply_rotary_emb(n(x).transpose(1, 2), (cos, sin), use_real=True) for n, x in ((nq, q), (nk, k))]
        return [r.transpose(1, 2) for r in rotated]

    truth = diffusers_path(q, k, norm_q, norm_k)
    low_q, low_k = norm_q.to(dtype), norm_k.to(dtype)
    eager = diffusers_path(q.to(dtype), k.to(dtype), low_q, low_k)
    ours = qk_norm_rope(q.to(dtype), k.to(dtype), q_weight=low_q.weight, k_weight=low_k.weight, cos=cos, sin=sin,
                        backend=backend)  # fmt: skip
    for o, e, t in zip(ours, eager, truth):
        assert_within_eager_bound(o.detach(), e.detach(), t.detach(), what=f"FLUX {backend} {dtype}")


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda_emu"])
@pytest.mark.parametrize("rope", ["interleaved", "half"])
def test_one_row_tables_broadcast_as_in_diffusers(backend, rope):
    """A [1, Dh] table (HunyuanDiT can pass one; diffusers' apply_rotary_emb broadcasts it) rotates every
    row with that row, at any seq_offset, read with a row stride of 0 (no copy): the same math as
    diffusers in fp32, and the same bits as the reference. Dh 88: the padded, vectorised path."""
    if backend == "triton":
        require_triton()
    q, k, v = qkv(torch.float32, 88, sq=5, sk=7)
    cos, sin = (t[3:4] for t in tables(88, rope, rows=8))
    params = norm_params(torch.float32, 88, "rms")
    outs = qk_norm_rope(q, k, v=v, cos=cos, sin=sin, rope=rope, seq_offset=2, **params, backend=backend)
    normed = qk_norm_rope(q, k, **params, backend="torch")
    for got, x in zip(outs, normed):
        theirs = apply_rotary_emb(x.transpose(1, 2), (cos, sin), use_real=True, use_real_unbind_dim=UNBIND_DIM[rope])
        torch.testing.assert_close(got, theirs.transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[2], v)


# ------------------------------------------------------------------------------- across_heads (Wan)


def across_params(dtype, heads, dim, norm):
    """norm_params over the whole projection: weight / bias of [H * Dh]."""
    return norm_params(dtype, heads * dim, norm) if norm else {}


# The norm and RoPE branches are independent: each (norm, rope) pair below covers one of each kind; Wan
# 1.3B's 12 x 128 once per pair in bf16 (the interpreter is slow on wide tiles).
ACROSS_PAIRS = [("rms", "interleaved"), ("layer", "half"), (None, "interleaved"), ("rms", None)]
ACROSS_CASES = [(dtype, shape, *pair) for dtype, shape, pair in itertools.product(DTYPES, [(3, 8), (5, 24)], ACROSS_PAIRS)]
ACROSS_CASES += [(torch.bfloat16, (12, 128), *pair) for pair in ACROSS_PAIRS]


@pytest.mark.parametrize("case", ACROSS_CASES, ids=lambda c: f"{str(c[0])[6:]}-H{c[1][0]}xDh{c[1][1]}-{c[2]}-{c[3]}")
def test_triton_across_heads_matches_reference(case):
    """The whole-projection norm: heads not a power of two (masked chunks), Wan 1.3B's 12 x 128; q and k
    of different lengths, V copied, a table offset."""
    require_triton()
    dtype, (heads, dim), norm, rope = case
    q, k, v = qkv(dtype, dim, heads=heads, sq=4, sk=7)
    rope_args = {} if rope is None else dict(zip(("cos", "sin"), tables(dim, rope, rows=16))) | {"rope": rope}
    actual, expected = run_both("triton", q, k, v=v, norm=norm, seq_offset=3, across_heads=True, **rope_args,
                                **across_params(dtype, heads, dim, norm))  # fmt: skip
    for name, a, e in zip("qkv", actual, expected):
        assert_same_math(a, e, ulps=ulps(dtype), what=f"{name} {case}")
    assert torch.equal(actual[2], v)


def test_triton_across_heads_many_chunks_joint_buffers_and_one_row_table():
    """Wan 14B's 40 heads (3 chunks of 16) at a small Dh, written at an offset into joint buffers; a one-row
    table broadcast over the sequence."""
    require_triton()
    dtype, heads, dim = torch.bfloat16, 40, 16
    q, k, v = qkv(dtype, dim, heads=heads, sq=6, sk=6, batch=1)
    cos, sin = tables(dim, "interleaved", rows=1)
    params = across_params(dtype, heads, dim, "rms")
    for backend in ("torch", "triton"):
        buffers = [torch.full((1, 9, heads, dim), 7.0, dtype=dtype) for _ in range(3)]
        out = dict(zip(("out_q", "out_k", "out_v"), buffers))
        written = qk_norm_rope(q, k, v=v, cos=cos, sin=sin, seq_offset=2, across_heads=True, **out, **params,
                               backend=backend)  # fmt: skip
        fresh = qk_norm_rope(q, k, v=v, cos=cos.expand(8, -1), sin=sin.expand(8, -1), seq_offset=2,
                             across_heads=True, **params, backend="torch")  # fmt: skip
        for w, f in zip(written, fresh):
            assert_same_math(w, f, ulps=ulps(dtype), what=backend)
        assert all((b[:, :2] == 7.0).all() and (b[:, 8:] == 7.0).all() for b in buffers)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_wan_attention_prologue_matches_diffusers(backend, dtype):
    """Wan: torch.nn.RMSNorm(H * Dh) on the whole projection, then the per-head RoPE of WanAttnProcessor
    (tables with each angle repeated for its pair), in low precision, vs the same in fp32: within 2x
    eager's error; in fp32 the same math."""
    if backend == "triton":
        require_triton()
    torch.manual_seed(0)
    heads, dim, seq = 4, 32, 12
    norm_q, norm_k = torch.nn.RMSNorm(heads * dim, eps=1e-6), torch.nn.RMSNorm(heads * dim, eps=1e-6)
    with torch.no_grad():
        norm_q.weight.normal_(1.0, 0.1)
        norm_k.weight.normal_(1.0, 0.1)
    q, k, _ = qkv(torch.float32, dim, sq=seq, sk=seq, heads=heads)
    cos, sin = tables(dim, "interleaved", rows=seq)

    def diffusers_path(q, k, nq, nk):
        rotated = []
        for n, x in ((nq, q), (nk, k)):
            x = n(x.flatten(2)).unflatten(2, (heads, dim))
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            c, s = cos[None, :, None, 0::2], sin[None, :, None, 1::2]
            out = torch.empty_like(x)
            out[..., 0::2], out[..., 1::2] = x1 * c - x2 * s, x1 * s + x2 * c
            rotated.append(out.type_as(x))
        return rotated

    with torch.no_grad():
        truth = diffusers_path(q, k, norm_q, norm_k)
        ours32 = qk_norm_rope(q, k, q_weight=norm_q.weight, k_weight=norm_k.weight, cos=cos, sin=sin,
                              across_heads=True, backend=backend)  # fmt: skip
        for o, t in zip(ours32, truth):
            torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5)
        low_q, low_k = norm_q.to(dtype), norm_k.to(dtype)
        eager = diffusers_path(q.to(dtype), k.to(dtype), low_q, low_k)
        ours = qk_norm_rope(q.to(dtype), k.to(dtype), q_weight=low_q.weight, k_weight=low_k.weight, cos=cos,
                            sin=sin, across_heads=True, backend=backend)  # fmt: skip
    for o, e, t in zip(ours, eager, truth):
        assert_within_eager_bound(o, e, t, what=f"Wan {backend} {dtype}")


def test_every_head_dim_maps_to_an_enumerated_across_config():
    for dim in (8, 64, 72, 128, 512):
        config = across_config(dim)
        assert config in across_configs() and config.block_t * config.block_h * config.block_d == 2048


@pytest.mark.parametrize("rope", ["interleaved", "half"])
def test_unaligned_rows_take_the_scalar_path(rope):
    """Dh 100 (rows 200 bytes apart) in views one element into their buffers: ALIGN 1, every offset
    computed per element; the same results as the reference."""
    require_triton()
    dtype, dim = torch.bfloat16, 100
    q, k, v = (torch.randn(2 * 5 * 2 * dim + 1).to(dtype)[1:].view(2, 5, 2, dim) for _ in "qkv")
    cos, sin = tables(dim, rope, rows=5)
    params = norm_params(dtype, dim, "layer")
    actual, expected = run_both("triton", q, k, v=v, cos=cos, sin=sin, rope=rope, norm="layer", **params)
    for a, e in zip(actual, expected):
        assert_same_math(a, e, ulps=ulps(dtype))


def test_diffusers_half_layout_matches_exactly_in_fp32():
    """use_real_unbind_dim=-2 ("half") and -1 ("interleaved") without a norm are the same math as
    diffusers' apply_rotary_emb in fp32."""
    q, k, _ = qkv(torch.float32, 64, sq=9, sk=9)
    for rope, unbind in UNBIND_DIM.items():
        cos, sin = tables(64, rope, rows=9)
        ours = qk_norm_rope(q, k, norm=None, cos=cos, sin=sin, rope=rope, backend="torch")[0]
        theirs = apply_rotary_emb(q.transpose(1, 2), (cos, sin), use_real=True, use_real_unbind_dim=unbind)
        torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_reference_under_torch_compile_fullgraph():
    q, k, v = qkv(torch.float32, 64)
    cos, sin = tables(64, "interleaved")
    params = norm_params(torch.float32, 64, "rms")
    fn = lambda q, k, v: qk_norm_rope(q, k, v=v, cos=cos, sin=sin, **params, backend="torch")  # noqa: E731
    torch._dynamo.reset()
    for got, want in zip(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rope_tables_convert_once_and_only_when_needed():
    cos, sin = tables(64, "interleaved")
    assert all(a is b for a, b in zip(rope_tables(cos, sin), (cos, sin)))  # fp32 contiguous: no copy
    half_cos, half_sin = rope_tables(cos.half().t().contiguous().t(), sin.half())
    assert half_cos.dtype == torch.float32 and half_cos.is_contiguous() and half_sin.dtype == torch.float32


def test_every_head_dim_maps_to_an_enumerated_config():
    for dim in (8, 64, 72, 88, 128, 256, 512):
        assert triton_config(dim) in triton_configs()
    with pytest.raises(ValueError, match="head_dim <= 512"):
        triton_config(513)


def test_rejects_bad_input_with_clear_errors():
    q, k, v = qkv(torch.float32, 16)
    cos, sin = tables(16, "interleaved", rows=8)
    with pytest.raises(ValueError, match=r"\[B, S, H, Dh\]"):
        qk_norm_rope(q[0], k)
    with pytest.raises(ValueError, match="agree on B, H and Dh"):
        qk_norm_rope(q, k[:, :, :1])
    with pytest.raises(ValueError, match="norm must be one of"):
        qk_norm_rope(q, k, norm="group")
    with pytest.raises(ValueError, match="rope must be one of"):
        qk_norm_rope(q, k, cos=cos, sin=sin, rope="complex")
    with pytest.raises(ValueError, match="rows up to"):
        qk_norm_rope(q, k, cos=cos, sin=sin, seq_offset=2)  # k has 9 rows, the table 8
    with pytest.raises(ValueError, match="cos and sin go together"):
        qk_norm_rope(q, k, cos=cos)
    with pytest.raises(TypeError, match="q_weight is torch.float16"):
        qk_norm_rope(q, k, q_weight=torch.ones(16, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"q_weight must have shape \[16\]"):
        qk_norm_rope(q, k, q_weight=torch.ones(8))
    with pytest.raises(ValueError, match=r"q_weight must have shape \[32\] \(across_heads: H \* Dh = 2 \* 16\)"):
        qk_norm_rope(q, k, q_weight=torch.ones(16), across_heads=True)
    with pytest.raises(ValueError, match="give all of"):
        qk_norm_rope(q, k, out_q=torch.empty(2, 20, 2, 16))
    with pytest.raises(ValueError, match="do not fit"):
        qk_norm_rope(q, k, out_q=torch.empty(2, 9, 2, 16), out_k=torch.empty(2, 9, 2, 16), seq_offset=4)
    with pytest.raises(ValueError, match="even head_dim"):
        qk_norm_rope(*qkv(torch.float32, 15)[:2], cos=torch.ones(9, 15), sin=torch.ones(9, 15))
    with pytest.raises(TypeError, match="int32"):
        qk_norm_rope(q.int(), k.int())


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES[::3], ids=lambda c: f"{str(c[0])[6:]}-Dh{c[1]}-{c[2]}-{c[3]}")
def test_gpu_triton_matches_reference(case):
    dtype, dim, norm, rope = case
    q, k, v = qkv(dtype, dim, batch=1, sq=512, sk=64 + 512, heads=24, device="cuda")
    rope_args = {} if rope is None else dict(zip(("cos", "sin"), tables(dim, rope, rows=1024, device="cuda")))
    rope_args |= {} if rope is None else {"rope": rope}
    actual, expected = run_both("triton", q, k, v=v, norm=norm, **rope_args, **norm_params(dtype, dim, norm, "cuda"))
    for a, e in zip(actual, expected):
        assert_same_math(a, e)


@pytest.mark.gpu
def test_gpu_triton_custom_ops_under_compile():
    functional, into = _CUSTOM_OPS["triton"]
    q, k, v = qkv(torch.bfloat16, 128, device="cuda")
    cos, sin = tables(128, "interleaved", device="cuda")
    args = (q, k, v, None, None, None, None, cos, sin)
    flags = (None, "interleaved", True, True, 0, 1e-6, False)  # ..., eps, across_heads
    torch.library.opcheck(functional, (*args, *flags), test_utils=("test_schema", "test_faketensor"))
    fn = lambda q, k, v: qk_norm_rope(q, k, v=v, norm=None, cos=cos, sin=sin, backend="triton")  # noqa: E731
    torch._dynamo.reset()
    for got, want in zip(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v)):
        assert torch.equal(got, want)
