"""joint_attention: the Triton flash-attention kernel (interpreter on CPU, or GPU) and the torch (SDPA)
backend against an fp32 SDPA truth, bounded like flash-attention's own tests (error <= 2 x the error of
eager low-precision SDPA + a small floor); masks, strided views, fully masked rows, torch.compile, the
backend choice, bad input. The interpreter costs ~2.5 ms per program or key tile: shapes here keep
grids of a few dozen programs."""

import itertools
import logging
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from tolerances import EAGER_FLOOR, assert_within_eager_bound

from dit_kernels import backends
from dit_kernels.ops import attention, attention_backend, joint_attention
from dit_kernels.ops.attention import to_heads_first, to_seq_first, triton_config, triton_configs
from dit_kernels.ops.dispatch import row_alignment

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [8, 64, 72, 88, 128]  # tiny configs, SD3, DiT/PixArt, HunyuanDiT, FLUX
# (Sq, Skv, mask): self-attention without a mask; cross-attention to a padded text (bool); a single
# query over many keys with an additive bias
SHAPES = [(77, 77, None), (333, 77, "bool"), (1, 333, "bias")]
HEADS = 2


def require_triton() -> None:
    if not backends.INTERPRETER_ON:
        if torch.cuda.is_available():
            pytest.skip("CUDA present: the Triton kernel runs on the GPU here (tests marked gpu)")
        pytest.fail("TRITON_INTERPRET=1 must be set before dit_kernels is imported (tests/conftest.py)")


def randn(*shape, dtype=torch.float32, device="cpu", gen=None):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def make_qkv(dtype, head_dim, seq_q, seq_kv, *, batch=2, heads=HEADS, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed * 1000 + head_dim + seq_q + 7 * seq_kv)
    q = randn(batch, seq_q, heads, head_dim, gen=gen) * 1.5  # a peaky softmax: errors in the max matter
    k = randn(batch, seq_kv, heads, head_dim, gen=gen)
    v = randn(batch, seq_kv, heads, head_dim, gen=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def make_mask(kind, batch, seq_kv, *, device="cpu", dtype=torch.float32, keep=None):
    """Different padding per batch element: element b keeps its first keep[b] keys."""
    if kind is None:
        return None
    keep = keep or [max(1, seq_kv - 3 - 5 * b) if b % 2 == 0 else max(1, seq_kv // 3) for b in range(batch)]
    attend = torch.arange(seq_kv)[None, :] < torch.tensor(keep)[:, None]
    if kind == "bool":
        return attend.to(device)
    return torch.zeros(batch, seq_kv).masked_fill(~attend, float("-inf")).to(device=device, dtype=dtype)


def sdpa(q, k, v, mask=None, scale=None, *, dtype):
    """SDPA computed in ``dtype`` on [B, S, H, D] inputs (mask [B|1, Skv] bool or additive); batch
    elements whose keys are all masked give 0 (the op's contract). dtype fp32: the truth; the inputs'
    dtype: eager diffusers."""
    attn_mask = None
    if mask is not None:
        mask = mask.reshape(mask.shape[0], -1)
        attn_mask = (mask if mask.dtype == torch.bool else mask.to(dtype))[:, None, None, :]
    out = F.scaled_dot_product_attention(
        *(t.to(dtype).transpose(1, 2) for t in (q, k, v)), attn_mask=attn_mask, scale=scale
    )
    if mask is not None:
        live = (mask if mask.dtype == torch.bool else mask.float() > -1e38).any(-1)
        out = torch.where(live[:, None, None, None], out, 0.0)
    return out.transpose(1, 2)


def check_against_truth(actual, q, k, v, mask=None, scale=None, what="", backend="triton"):
    """fp32: a tight allclose to the truth. fp16/bf16: the eager bound (tolerances.py). Under the
    interpreter, Triton's fp32 -> bf16 stores truncate instead of rounding (GPU_LESS.md §1): each
    element may err one more bf16 ulp (its spacing at the stored value) on top of the bound."""
    truth = sdpa(q, k, v, mask, scale, dtype=torch.float32)
    assert actual.shape == q.shape and actual.dtype == q.dtype, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    if q.dtype == torch.float32:
        torch.testing.assert_close(actual, truth, rtol=2e-5, atol=2e-5, msg=what)
        return
    eager = sdpa(q, k, v, mask, scale, dtype=q.dtype)
    if not (backend == "triton" and backends.INTERPRETER_ON and q.dtype == torch.bfloat16):
        assert_within_eager_bound(actual, eager, truth, what=what)
        return
    error = (actual.double() - truth.double()).abs()
    spacing = torch.exp2(torch.floor(torch.log2(actual.double().abs().clamp_min(1e-30))) - 7)
    excess = error - spacing  # what is left once the truncated last bit is forgiven
    worst = int(excess.argmax())
    theirs = (eager.double() - truth.double()).abs().max().item()
    bound = 2.0 * theirs + EAGER_FLOOR[q.dtype]
    assert excess.max().item() <= bound, (
        f"{what}: error {error.flatten()[worst].item():.3g} less one bf16 ulp ({spacing.flatten()[worst].item():.3g}) "
        f"exceeds 2 x eager's {theirs:.3g} + floor"
    )


def case_id(case):
    dtype, head_dim, (seq_q, seq_kv, mask) = case
    return f"{str(dtype).removeprefix('torch.')}-D{head_dim}-{seq_q}x{seq_kv}-{mask or 'nomask'}"


CASES = list(itertools.product(DTYPES, HEAD_DIMS, SHAPES))


# ------------------------------------------------------------------------------ Triton vs fp32 truth


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_fp32_truth(case):
    require_triton()
    dtype, head_dim, (seq_q, seq_kv, kind) = case
    q, k, v = make_qkv(dtype, head_dim, seq_q, seq_kv)
    mask = make_mask(kind, 2, seq_kv, dtype=dtype)
    out = joint_attention(q, k, v, mask=mask, backend="triton")
    assert out.is_contiguous()
    check_against_truth(out, q, k, v, mask, what=case_id(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_is_eager_sdpa(dtype):
    """The torch backend is SDPA in the input dtype, as eager diffusers calls it: identical bits."""
    q, k, v = make_qkv(dtype, 72, 33, 20)
    for mask in (None, make_mask("bool", 2, 20), make_mask("bias", 2, 20, dtype=dtype)):
        eager = sdpa(q, k, v, mask, dtype=dtype)
        assert torch.equal(joint_attention(q, k, v, mask=mask, backend="torch"), eager)
        assert torch.equal(joint_attention(q, k, v, mask=mask), eager)  # auto on CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_odd_head_dims_and_unaligned_rows(dtype):
    """Head dims that are no multiple of 8 (rows not 16-byte aligned: the unaligned config, 64x64 tiles
    at BLOCK_D 128), a small one padded to 16, and an explicit scale."""
    require_triton()
    for head_dim, seq in ((100, 70), (5, 65), (24, 129)):
        q, k, v = make_qkv(dtype, head_dim, seq, seq, batch=1)
        mask = make_mask("bool", 1, seq, keep=[seq - 9])
        out = joint_attention(q, k, v, mask=mask, scale=0.3, backend="triton")
        check_against_truth(out, q, k, v, mask, scale=0.3, what=f"D{head_dim}")
    # rows of 100 elements are 8-byte aligned only: the launcher takes the unaligned config
    assert row_alignment([q], [100 * HEADS, 100]) == 1 and row_alignment([q], [144, 72]) == 8
    assert triton_config(100, aligned=False) != triton_config(100)


# -------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mask_forms_and_biases(backend):
    """[B, Skv], [B, 1, Skv], [B, 1, 1, Skv], a batch-broadcast [1, Skv]; bool, -inf bias, PixArt's
    `(1 - mask) * -10000.0` bias, a finfo.min bias, an fp32 bias for bf16 inputs."""
    if backend == "triton":
        require_triton()
    dtype, seq_kv = torch.bfloat16, 77
    q, k, v = make_qkv(dtype, 64, 40, seq_kv)
    attend = make_mask("bool", 2, seq_kv)
    pixart = (1 - attend.to(dtype)) * -10000.0
    finfo_min = torch.zeros(2, seq_kv).masked_fill(~attend, torch.finfo(torch.float32).min)
    variants = {
        "bool [B,Skv]": attend,
        "bool [B,1,Skv]": attend[:, None],
        "bool [B,1,1,Skv]": attend[:, None, None],
        "bias [B,1,1,Skv]": make_mask("bias", 2, seq_kv, dtype=dtype)[:, None, None],
        "pixart -10000": pixart[:, None],
        "finfo.min fp32": finfo_min,
        "fp32 -inf bias": make_mask("bias", 2, seq_kv),
        "broadcast [1,Skv]": attend[:1],
    }
    reference = joint_attention(q, k, v, mask=attend, backend=backend)
    for name, mask in variants.items():
        out = joint_attention(q, k, v, mask=mask, backend=backend)
        check_against_truth(out, q, k, v, mask, what=f"{backend} {name}")
        if name.startswith("bool") or name in ("finfo.min fp32", "fp32 -inf bias"):
            assert torch.equal(out, reference), f"{backend} {name}: same keys masked, different result"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["bool", "-inf", "finfo.min"])
def test_fully_masked_rows_are_zero(backend, kind):
    """A batch element whose keys are all masked gives 0, not NaN (SDPA: 0 on CPU for bool/-inf, the
    mean of V for finfo.min, NaN in CUDA's memory-efficient kernel); the other element is unaffected."""
    if backend == "triton":
        require_triton()
    q, k, v = make_qkv(torch.float16, 72, 9, 70)
    attend = torch.ones(2, 70, dtype=torch.bool)
    attend[1] = False
    attend[0, 50:] = False
    fill = {"-inf": float("-inf"), "finfo.min": torch.finfo(torch.float32).min}.get(kind)
    mask = attend if kind == "bool" else torch.zeros(2, 70).masked_fill(~attend, fill)
    out = joint_attention(q, k, v, mask=mask, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    check_against_truth(out, q, k, v, mask, what=f"{backend} {kind}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_sequences(backend):
    if backend == "triton":
        require_triton()
    q, k, v = make_qkv(torch.float32, 16, 5, 3)
    no_keys = joint_attention(q, k[:, :0], v[:, :0], backend=backend)
    assert torch.equal(no_keys, torch.zeros_like(q))
    assert joint_attention(q[:, :0], k, v, backend=backend).shape == (2, 0, HEADS, 16)


# ------------------------------------------------------------------------------------ strided views


def test_triton_reads_strided_views_in_place():
    """q/k/v as slices of a fused QKV projection [B, S, 3, H, Dh], and q as a slice of a joint
    [text, image] buffer (a row offset): the same bits as on contiguous copies, and within the bound."""
    require_triton()
    dtype, heads, head_dim, seq = torch.bfloat16, 3, 72, 77
    fused = randn(2, seq, 3, heads, head_dim, dtype=dtype, gen=torch.Generator().manual_seed(1))
    q, k, v = fused.unbind(2)
    assert not q.is_contiguous()
    mask = make_mask("bool", 2, seq)
    out = joint_attention(q, k, v, mask=mask, backend="triton")
    copies = (t.contiguous() for t in (q, k, v))
    assert torch.equal(out, joint_attention(*copies, mask=mask, backend="triton"))
    check_against_truth(out, q, k, v, mask, what="fused QKV views")

    joint = randn(2, 5 + seq, heads, head_dim, dtype=dtype, gen=torch.Generator().manual_seed(2))
    image_q = joint[:, 5:]  # storage offset 5 * H * Dh
    cross = joint_attention(image_q, k, v, backend="triton")
    assert torch.equal(cross, joint_attention(image_q.contiguous(), k, v, backend="triton"))
    check_against_truth(cross, image_q, k, v, what="joint-buffer view")


def test_layout_helpers_are_views():
    x = torch.randn(2, 7, 3, 8)
    heads_first = to_heads_first(x)
    assert heads_first.shape == (2, 3, 7, 8) and heads_first.data_ptr() == x.data_ptr()
    assert torch.equal(heads_first, x.permute(0, 2, 1, 3))
    back = to_seq_first(heads_first)
    assert back.shape == x.shape and back.data_ptr() == x.data_ptr() and torch.equal(back, x)
    with pytest.raises(ValueError, match="4-D"):
        to_heads_first(x[0])


# ------------------------------------------------------------------------------------- torch.compile


def test_torch_backend_under_torch_compile_fullgraph():
    q, k, v = make_qkv(torch.float32, 64, 33, 21)
    mask = make_mask("bool", 2, 21)
    bias = make_mask("bias", 2, 21)

    def block(q, k, v, mask, bias):
        a = joint_attention(q, k, v, mask=mask, backend="torch")
        return joint_attention(a, k, v, mask=bias[:, None, None])  # auto: "torch" on CPU

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask, bias), block(q, k, v, mask, bias), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- backend choice


def test_attention_backend_on_cpu(caplog):
    q, k, v = make_qkv(torch.bfloat16, 72, 4, 4)
    attention._choose_cached.cache_clear()
    attention._log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="dit_kernels"):
        for _ in range(3):
            assert attention_backend(q, k, v)[0] == "torch"
            joint_attention(q, k, v)
    assert "cpu tensors" in attention_backend(q, k, v)[1]
    assert sum("joint_attention backend: torch" in r.getMessage() for r in caplog.records) == 1
    assert attention_backend(q, k, v, backend="torch") == ("torch", "asked for")
    if backends.INTERPRETER_ON:
        assert attention_backend(q, k, v, mask=torch.ones(2, 4, dtype=torch.bool), backend="triton")[0] == "triton"
    with pytest.raises(RuntimeError, match="flash-attention needs CUDA tensors"):
        attention_backend(q, k, v, backend="flash_attn")
    with pytest.raises(RuntimeError, match="xformers needs CUDA tensors"):
        joint_attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        joint_attention(q, k, v, backend="cudnn")


def stand_in_flash_attn(name: str, calls: list, returns_lse: bool = False):
    """A module standing in for flash_attn (2) or flash_attn_interface (3): ``flash_attn_func`` on
    [B, S, H, D] computed by SDPA, each call recorded."""
    module = types.ModuleType(name)
    module.__version__ = f"{name} stand-in"

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append((name, q.shape[-1], softmax_scale, causal, all(t.stride(-1) == 1 for t in (q, k, v))))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=softmax_scale)
        out = out.transpose(1, 2)
        return (out, None) if returns_lse else out

    module.flash_attn_func = flash_attn_func
    return module


@pytest.fixture
def stand_ins(monkeypatch):
    """Installs stand-in flash-attention modules and fakes the rest of the machine; returns a dict of
    switches: which packages import, whether the device is a Hopper, whether Triton runs."""
    have = {"fa2": True, "fa3": True, "hopper": True, "xf": True, "triton": True, "calls": []}

    def optional(name):
        key = {"flash_attn": "fa2", "flash_attn_interface": "fa3", "xformers": "xf"}[name]
        if not have[key]:
            return backends.Availability(name, False, "not importable: ModuleNotFoundError (stand-in)")
        return backends.Availability(name, True, f"{name} stand-in")

    monkeypatch.setitem(sys.modules, "flash_attn", stand_in_flash_attn("flash_attn", have["calls"]))
    monkeypatch.setitem(sys.modules, "flash_attn_interface",
                        stand_in_flash_attn("flash_attn_interface", have["calls"], returns_lse=True))  # fmt: skip
    monkeypatch.setattr(backends, "flash_attn", lambda: optional("flash_attn"))
    monkeypatch.setattr(attention, "_flash_attn3", lambda: optional("flash_attn_interface"))
    monkeypatch.setattr(backends, "xformers", lambda: optional("xformers"))
    monkeypatch.setattr(backends, "triton", lambda: backends.Availability("triton", have["triton"], "fake triton"))
    monkeypatch.setattr(attention, "_is_hopper", lambda device: have["hopper"])
    return have


def test_auto_choice_on_cuda_decision_table(stand_ins):
    """The CUDA decision with stand-in modules (no GPU needed): flash-attention 3 on Hopper / 2 elsewhere
    at every head dim it takes (72 and 88 included), fp16/bf16, no mask; our Triton kernel for key-padding
    masks and where no flash-attention is installed; then xformers (no mask); then SDPA."""
    cuda, bf16, fp16, fp32 = torch.device("cuda"), torch.bfloat16, torch.float16, torch.float32
    choice = lambda dtype, dim, mask: attention._auto(cuda, dtype, dim, mask)  # noqa: E731
    for dim in (64, 72, 88, 128, 256):
        assert choice(bf16, dim, False) == ("flash_attn", "flash-attention 3 (flash_attn_interface stand-in)")
        assert choice(bf16, dim, True)[0] == "triton"  # a key-padding mask: flash_attn_func has none
    assert choice(fp16, 100, False)[1].startswith("flash-attention 2")  # FA3 takes multiples of 8 only
    stand_ins["hopper"] = False
    assert choice(bf16, 88, False)[1].startswith("flash-attention 2")
    assert choice(fp32, 128, False)[0] == "xformers"  # FA takes no fp32, nor does our kernel on CUDA
    assert choice(bf16, 512, False)[0] == "xformers"  # over 256: neither FA nor our kernel
    stand_ins["fa2"] = False
    assert choice(bf16, 72, False) == ("triton", "own Triton kernel (flash_attn not importable: "
                                       "ModuleNotFoundError (stand-in))")  # fmt: skip
    stand_ins["triton"] = False
    assert choice(fp16, 64, False)[0] == "xformers"
    stand_ins["xf"] = False
    name, why = choice(fp16, 64, True)
    assert name == "torch" and "SDPA" in why and "Triton: fake triton" in why


@pytest.mark.parametrize("hopper", [True, False], ids=["fa3", "fa2"])
def test_flash_attn_launch_through_stand_in(stand_ins, hopper):
    """The flash_attn backend calls the selected module's flash_attn_func with the scale, on views with a
    unit last stride, and takes the output out of FA3's (out, lse) pair."""
    stand_ins["hopper"] = hopper
    q, k, v = make_qkv(torch.float32, 72, 9, 11)
    out = attention._launch_flash_attn(q, k, v, None, 0.25)
    module = "flash_attn_interface" if hopper else "flash_attn"
    assert stand_ins["calls"] == [(module, 72, 0.25, False, True)]
    check_against_truth(out, q, k, v, scale=0.25, what=module)


def test_triton_config_rule_covers_head_dims():
    for head_dim in (1, 8, 16, 24, 40, 64, 72, 88, 100, 128, 200, 256):
        for aligned in (True, False):
            config = triton_config(head_dim, aligned)
            assert config in triton_configs(aligned)
            assert config.block_d == max(16, 1 << (head_dim - 1).bit_length()) >= head_dim
    assert triton_config(72).block_d == triton_config(88).block_d == 128
    assert triton_config(8).block_d == 16
    names = [spec.name for spec in attention.aot_specs()]
    for config in triton_configs():
        for dtype in ("bf16", "fp16"):
            tiles = f"BLOCK_M={config.block_m},BLOCK_N={config.block_n},BLOCK_D={config.block_d}"
            assert any(n.startswith(f"attention[{dtype},") and tiles in n for n in names), (dtype, config)
    with pytest.raises(ValueError, match="head_dim <= 256"):
        triton_config(257)


# -------------------------------------------------------------------------------------- bad input


def test_rejects_bad_input_with_clear_errors():
    q, k, v = make_qkv(torch.float32, 16, 5, 7)
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, S, H, Dh\]"):
        joint_attention(q[0], k, v)
    with pytest.raises(TypeError, match="k must be a tensor"):
        joint_attention(q, None, v)
    with pytest.raises(TypeError, match="int64"):
        joint_attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="v has dtype torch.float16"):
        joint_attention(q, k, v.half())
    with pytest.raises(ValueError, match="k is on meta"):
        joint_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="disagree on batch"):
        joint_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="disagree on heads"):
        joint_attention(q, k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="disagree on head_dim"):
        joint_attention(q, k, v[..., :8])
    with pytest.raises(ValueError, match="same sequence length"):
        joint_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="no key-padding mask"):
        joint_attention(q, k, v, mask=torch.ones(2, 5, dtype=torch.bool))  # Sq, not Skv
    with pytest.raises(ValueError, match="no key-padding mask"):
        joint_attention(q, k, v, mask=torch.ones(2, 5, 7, dtype=torch.bool))  # a full [B, Sq, Skv] mask
    with pytest.raises(ValueError, match="no key-padding mask"):
        joint_attention(q, k, v, mask=torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool .* or a float additive bias"):
        joint_attention(q, k, v, mask=torch.ones(2, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask is on meta"):
        joint_attention(q, k, v, mask=torch.ones(2, 7, dtype=torch.bool, device="meta"))
    big = torch.randn(1, 2, 1, 264)
    with pytest.raises(RuntimeError, match="head_dim <= 256" if backends.INTERPRETER_ON else None):
        joint_attention(big, big, big, backend="triton")
    if not backends.INTERPRETER_ON and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            joint_attention(q, k, v, backend="triton")


def test_torch_backend_takes_any_head_dim():
    q, k, v = make_qkv(torch.float32, 264, 3, 4, batch=1)
    check_against_truth(joint_attention(q, k, v), q, k, v, what="D264 torch")
    assert math.isclose(attention.LOG2E, 1 / math.log(2))


# ------------------------------------------------------------------------------------------------ GPU

GPU_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 72, 88, 128])
@pytest.mark.parametrize("kind", [None, "bool", "bias"])
def test_gpu_triton_matches_fp32_truth(dtype, head_dim, kind):
    for seq_q, seq_kv in ((1024, 1024), (333, 77), (4096 + 7, 300)):
        q, k, v = make_qkv(dtype, head_dim, seq_q, seq_kv, heads=4, device="cuda")
        mask = make_mask(kind, 2, seq_kv, device="cuda", dtype=dtype)
        out = joint_attention(q, k, v, mask=mask, backend="triton")
        check_against_truth(out, q, k, v, mask, what=f"gpu {dtype} D{head_dim} {seq_q}x{seq_kv} {kind}")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [8, 100, 256])
def test_gpu_triton_small_odd_and_large_head_dims(head_dim):
    q, k, v = make_qkv(torch.bfloat16, head_dim, 257, 129, device="cuda")
    mask = make_mask("bool", 2, 129, device="cuda")
    check_against_truth(joint_attention(q, k, v, mask=mask, backend="triton"), q, k, v, mask, what=f"D{head_dim}")


@pytest.mark.gpu
def test_gpu_triton_strided_views_and_fully_masked_rows():
    fused = torch.randn(2, 600, 3, 16, 72, device="cuda", dtype=torch.bfloat16)
    q, k, v = fused.unbind(2)
    mask = torch.ones(2, 600, dtype=torch.bool, device="cuda")
    mask[1] = False
    out = joint_attention(q, k, v, mask=mask, backend="triton")
    copies = (t.contiguous() for t in (q, k, v))
    assert torch.equal(out, joint_attention(*copies, mask=mask, backend="triton"))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    check_against_truth(out, q, k, v, mask, what="gpu fused QKV")
    torch_out = joint_attention(q, k, v, mask=mask, backend="torch")
    assert torch.isfinite(torch_out).all() and torch.equal(torch_out[1], torch.zeros_like(torch_out[1]))


@pytest.mark.gpu
def test_gpu_auto_choice():
    for head_dim in (72, 128):
        q, k, v = make_qkv(torch.bfloat16, head_dim, 16, 16, device="cuda")
        name, why = attention_backend(q, k, v)
        assert name == ("flash_attn" if attention._flash_attn_impl(q.device, head_dim)[0] else "triton"), why
    assert attention_backend(q, k, v, mask=torch.ones(2, 16, dtype=torch.bool, device="cuda"))[0] == "triton"
    check_against_truth(joint_attention(q, k, v), q, k, v, what=f"auto = {name}")
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        joint_attention(q.float(), k.float(), v.float(), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_gpu_optional_backends_match_truth(backend):
    q, k, v = make_qkv(torch.bfloat16, 128, 1000, 1000, device="cuda")
    try:
        attention_backend(q, k, v, backend=backend)
    except RuntimeError as err:
        pytest.skip(str(err))
    check_against_truth(joint_attention(q, k, v, backend=backend), q, k, v, what=backend)


@pytest.mark.gpu
def test_gpu_triton_custom_op_under_torch_compile():
    q, k, v = make_qkv(torch.bfloat16, 88, 300, 77, device="cuda")
    mask = make_mask("bias", 2, 77, device="cuda", dtype=torch.bfloat16)
    expected = joint_attention(q, k, v, mask=mask, backend="triton")
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, m: joint_attention(q, k, v, mask=m, backend="triton"), fullgraph=True)
    assert torch.equal(compiled(q, k, v, mask), expected)
    for m in (mask, None, mask > -1):
        torch.library.opcheck(
            attention._CUSTOM_OPS["triton"], (q, k, v, m, 0.1), test_utils=("test_schema", "test_faketensor")
        )
