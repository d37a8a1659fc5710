"""Wan patcher (dit_kernels.models.wan): whole-model parity of Wan 2.1 T2V, I2V (image context, its own keys
and values), Wan 2.2 TI2V (per-token timesteps) and a model without the cross-attention norm, odd frame
counts, batch 1 and 2, every dtype, torch and triton backends; models loaded in bf16/fp16 with diffusers'
``_keep_in_fp32_modules`` (mixed dtypes by design); the report and unpatch; refusals that change nothing;
diffusers' attention dispatch when asked; peft LoRA and fused projections; torch.compile; diffusers' own
behaviour on latents that do not divide the patch size."""

import inspect
import itertools

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import dit_kernels
from dit_kernels.models import wan
from patch_parity import FP32_ATOL, FP32_RTOL, assert_compiled_matches, assert_patched_parity
from patch_parity import assert_fails_as_eager, assert_refused_unchanged, forward
from patch_parity import assert_unpatch_restores, attention_processors
from patch_parity import assert_modified_patched_matches
from tolerances import assert_within_eager_bound

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LATENT = (3, 4, 6)  # frames (odd), rows, cols: 3 x 2 x 3 = 18 tokens after the (1, 2, 2) patches
TEXT_LEN = 7
IMAGE_TOKENS = 5
TINY = wan.CONFIGS["tiny"]
INNER = TINY["num_attention_heads"] * TINY["attention_head_dim"]
VARIANTS = {  # config overrides of the tiny Wan 2.1 T2V model
    "t2v": {},
    "i2v": dict(image_dim=8, added_kv_proj_dim=INNER),  # image embeddings -> inner_dim keys / values
    "ti2v": {},  # Wan 2.2 TI2V 5B: the same blocks, one timestep per token
    "no-cross-norm": dict(cross_attn_norm=False),  # norm2 is nn.Identity
}


def tiny_wan(variant: str = "t2v", **overrides) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return wan.FAMILY.build("tiny", **VARIANTS[variant], **overrides)


def wan_inputs(dtype: torch.dtype, batch: int = 2, variant: str = "t2v", latent: tuple = LATENT) -> dict:
    """Seeded inputs as WanPipeline / WanImageToVideoPipeline pass them: latents and text in the model dtype,
    fp32 timesteps (per sample; TI2V: per token, the first frame's tokens at 0 as in image-to-video). The
    I2V processor takes the last 512 context tokens as text (hard-coded in diffusers), so I2V text is 512."""
    generator = torch.Generator().manual_seed(1)
    frames, rows, cols = latent
    text_len = wan.TEXT_CONTEXT if variant == "i2v" else TEXT_LEN
    inputs = {
        "hidden_states": torch.randn(batch, TINY["in_channels"], frames, rows, cols, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text_len, TINY["text_dim"], generator=generator),
    }
    if variant == "i2v":
        inputs["encoder_hidden_states_image"] = torch.randn(batch, IMAGE_TOKENS, 8, generator=generator)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    timestep = torch.tensor([900.0, 300.0])[:batch]
    if variant == "ti2v":
        per_frame = rows // 2 * (cols // 2)
        timestep = timestep[:, None].repeat(1, frames * per_frame)
        timestep[:, :per_frame] = 0.0
    return {**inputs, "timestep": timestep}


# ----------------------------------------------------------------------------------------- parity


# Wan 2.1 T2V: every dtype x batch on the reference backend and in the interpreter (batch 1 in bf16 only
# there: the interpreter is slow); the other variants (the same blocks with one model-level path more each):
# every dtype on the reference backend, batch 2, and TI2V's per-token modulation ([B, S, D]) in the
# interpreter too.
PARITY = [("t2v", batch, dtype, "torch") for batch, dtype in itertools.product([1, 2], DTYPES)]
PARITY += [("t2v", 2, dtype, "triton") for dtype in DTYPES] + [("t2v", 1, torch.bfloat16, "triton")]
PARITY += [(variant, 2, dtype, "torch") for variant in list(VARIANTS)[1:] for dtype in DTYPES]
PARITY += [("ti2v", 2, torch.bfloat16, "triton")]


@pytest.mark.parametrize("variant, batch, dtype, backend", PARITY,
                         ids=lambda v: str(v).removeprefix("torch."))  # fmt: skip
def test_patched_parity(variant, batch, dtype, backend):
    report = assert_patched_parity(
        lambda: tiny_wan(variant),
        lambda d: wan_inputs(d, batch, variant),
        dtype=dtype,
        backend=backend,
        what=f"wan {variant} B={batch} {dtype} {backend}",
    )
    assert report.family == "wan" and not report.fallbacks


@pytest.mark.parametrize("latent", [(1, 4, 6), (5, 6, 4)], ids=["one-frame", "five-frames"])
def test_parity_at_other_frame_counts(latent):
    model = tiny_wan()
    inputs = wan_inputs(torch.float32, 2, latent=latent)
    truth = forward(model, inputs)
    dit_kernels.patch(model, backend="torch")
    torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)


@pytest.mark.parametrize("variant, dtype, backend", [("i2v", torch.bfloat16, "torch"), ("i2v", torch.float16, "torch"),
                                                     ("t2v", torch.bfloat16, "triton")], ids=str)  # fmt: skip
def test_keep_in_fp32_modules_loading_patches_and_matches(tmp_path, variant, dtype, backend):
    """``from_pretrained(torch_dtype=bf16)`` keeps the norms (I2V: the image embedder's too),
    ``scale_shift_table``, the RoPE tables and the time embedder in fp32 (``_keep_in_fp32_modules``): patch
    accepts that mix and stays within 2x eager's error against the fp32 model."""
    reference = tiny_wan(variant)
    reference.save_pretrained(tmp_path)
    model = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    assert model.blocks[0].norm2.weight.dtype == torch.float32 and model.blocks[0].attn1.to_q.weight.dtype == dtype
    truth = forward(reference, wan_inputs(torch.float32, 2, variant))
    inputs = wan_inputs(dtype, 2, variant)
    eager = forward(model, inputs)
    dit_kernels.patch(model, backend=backend)
    assert_within_eager_bound(forward(model, inputs), eager, truth, what=f"wan keep_in_fp32 {dtype} {backend}")
    dit_kernels.unpatch(model)
    assert torch.equal(forward(model, inputs), eager)


def test_cuda_kernels_run_the_attention_and_leave_the_blocks_to_diffusers():
    """backend="cuda_emu" (the CUDA C++ source on CPU): qk_norm_rope's across-heads kernel in the processors;
    the norm kernel takes no fp32 modulation, so the block forwards stay diffusers' and the report says so."""
    model = tiny_wan()
    inputs = wan_inputs(torch.float32, 1)
    truth = forward(model, inputs)
    report = dit_kernels.patch(model, backend="cuda_emu")
    assert [r.split(":")[0] for r in report.replaced] == [f"blocks.{i}.{a}.processor" for i in range(2)
                                                          for a in ("attn1", "attn2")]  # fmt: skip
    assert len(report.fallbacks) == 2 and "takes no fp32 parameters" in report.fallbacks[0]
    torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_report_lists_every_replacement_and_unpatch_restores_processors():
    model = tiny_wan()
    processors = attention_processors(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = dit_kernels.patch(model, backend="torch")
    fused = "layernorm_modulate, gated_residual_layernorm_modulate x2, gated_residual"
    expected = []
    for i in range(2):
        expected += [f"blocks.{i}.forward: {fused}", f"blocks.{i}.attn1.processor: WanFusedAttnProcessor",
                     f"blocks.{i}.attn2.processor: WanFusedAttnProcessor"]  # fmt: skip
    assert report.replaced == expected and len(processors) == 4
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "patch changed the state dict"
    assert_unpatch_restores(model, processors, wan.WanFusedAttnProcessor)


def test_processor_names_every_kwarg_of_diffusers_processor():
    theirs = inspect.signature(WanAttnProcessor.__call__).parameters
    assert list(inspect.signature(wan.WanFusedAttnProcessor.__call__).parameters) == list(theirs)


def test_processor_rebuilt_without_arguments_runs():
    """diffusers rebuilds processors as ``type(processor)()`` (IP-adapter loading): ours then runs with
    the default backends and still matches."""
    model = tiny_wan()
    inputs = wan_inputs(torch.float32)
    truth = forward(model, inputs)
    dit_kernels.patch(model, backend="torch")
    for m in model.modules():
        if hasattr(m, "processor"):
            m.processor = type(m.processor)()
    torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)


# ----------------------------------------------------------------------------------------- refusals


class CustomProcessor(WanAttnProcessor):
    """A user's processor: a subclass, so only an exact type check catches it."""


def _custom_processor(model):
    model.blocks[1].attn2.set_processor(CustomProcessor())


def _per_head_qk_norm(model):
    """q/k RMSNorm over each head (Dh) instead of the whole projection: not Wan's norm."""
    model.blocks[0].attn1.norm_q = torch.nn.RMSNorm(TINY["attention_head_dim"], eps=1e-6)


def _plain_layer_norm(model):
    model.blocks[1].norm3 = torch.nn.LayerNorm(INNER, eps=1e-6, elementwise_affine=False)


def _hooked_block(model):
    HookRegistry.check_if_exists_or_initialize(model.blocks[0]).register_hook(ModelHook(), "spy")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_custom_processor, r"blocks\.1\.attn2\.processor is .*CustomProcessor, expected .*\.WanAttnProcessor"),
        (_per_head_qk_norm, r"blocks\.0\.attn1\.norm_q normalises over \(16,\), expected the whole projection"),
        (_plain_layer_norm, r"blocks\.1\.norm3 is torch\.nn\..*LayerNorm, expected .*FP32LayerNorm"),
        (_hooked_block, r"blocks\.0\.forward is already wrapped"),
    ],
    ids=["custom-processor", "per-head-qk-norm", "plain-layer-norm", "hooked-forward"],
)
def test_unrecognised_model_refused_and_unchanged(mutate, message):
    model = tiny_wan()
    mutate(model)
    assert_refused_unchanged(model, message)


@pytest.mark.parametrize("latent", [(3, 5, 6), (3, 4, 7)], ids=["odd-rows", "odd-cols"])
def test_latents_not_dividing_the_patch_behave_as_diffusers(latent):
    """diffusers floors a latent size that does not divide the (1, 2, 2) patch (Conv3d stride, RoPE grid
    and unpatchify agree on it): the patched model gives eager's output, of eager's shape."""
    model = tiny_wan()
    inputs = wan_inputs(torch.float32, 2, latent=latent)
    truth = forward(model, inputs)
    dit_kernels.patch(model, backend="torch")
    ours = forward(model, inputs)
    assert ours.shape == truth.shape
    torch.testing.assert_close(ours, truth, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_more_frames_than_the_rope_table_fail_as_in_diffusers():
    """rope_max_seq_len rows per axis: more latent frames fail in diffusers' own RoPE, patched or not."""
    assert_fails_as_eager(tiny_wan(rope_max_seq_len=2), wan_inputs(torch.float32, 1))


# ----------------------------------------------------------------------------------------- dispatch


class Spy:
    """Stands in for a function of the wan module: records (the keys' length, the call's backend keyword,
    its parallel config) and calls the real one (without the parallel config: one process here)."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, query, key, value, *args, backend=None, parallel_config=None, **kwargs):
        self.calls.append((key.shape[1], backend, parallel_config))
        return self.real(query, key, value, *args, **kwargs, **({"backend": backend} if backend else {}))


PARALLEL = object()  # a stand-in ParallelConfig: the spies only check where it arrives


def test_attention_goes_through_dispatch_when_asked(monkeypatch):
    """Default settings: our attention for the self-attention, the text and I2V's image attention. An
    attention backend set on the model: diffusers' dispatch with it, for all three. A parallel config on
    the processors: to the self-attention only, as WanAttnProcessor passes it."""
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    model = tiny_wan("i2v")
    inputs = wan_inputs(torch.float32, 2, "i2v")
    truth = forward(model, inputs)
    dispatch, ours = Spy(wan.dispatch_attention_fn), Spy(wan.attend)
    monkeypatch.setattr(wan, "dispatch_attention_fn", dispatch)
    monkeypatch.setattr(wan, "attend", ours)
    dit_kernels.patch(model, backend="torch")
    for m in model.modules():
        if hasattr(m, "processor"):
            m.processor._parallel_config = PARALLEL
    torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)
    per_block = [(18, None, PARALLEL), (wan.TEXT_CONTEXT, None, None), (IMAGE_TOKENS, None, None)]
    assert dispatch.calls == [] and ours.calls == per_block * 2
    for m in model.modules():
        if hasattr(m, "processor"):
            m.processor._parallel_config = None
    model.set_attention_backend("_native_math")
    torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)
    math = AttentionBackendName._NATIVE_MATH
    assert len(ours.calls) == 6 and dispatch.calls == [(n, math, None) for n, _, _ in per_block] * 2


# ----------------------------------------------------------------------------------------- LoRA, fused QKV


def _lora(model):
    from peft import LoraConfig

    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2",
               "time_proj", "linear_1"]  # fmt: skip
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))


def _fused_projections(model):
    """diffusers' fused projections, perturbed so that the output differs unless they are used."""
    model.fuse_qkv_projections()
    with torch.no_grad():
        for m in model.modules():
            for name in ("to_qkv", "to_kv", "to_added_kv"):
                if hasattr(m, name):
                    getattr(m, name).weight.mul_(1.5)


@pytest.mark.parametrize("prepare", [_lora, _fused_projections], ids=["lora", "fused-projections"])
def test_lora_and_fused_projections(prepare):
    """peft LoRA (random B) on every Linear kind and diffusers' fused projections run through the patched
    path (the model's own modules): patched fp32 equals eager fp32 of the modified model (I2V: all kinds)."""
    assert_modified_patched_matches(lambda: tiny_wan("i2v"), prepare, wan_inputs(torch.float32, 2, "i2v"))


@pytest.mark.slow  # torch.compile: the representative one is DiT's (tests/test_model_dit.py)
def test_patched_model_under_torch_compile_matches_eager():
    assert_compiled_matches(tiny_wan("ti2v"), wan_inputs(torch.float32, 2, "ti2v"))


@pytest.mark.gpu
def test_gpu_bf16_parity_loaded_with_fp32_modules(tmp_path):
    """On CUDA, default backends (Triton kernels, attention chosen per shape), weights loaded in bf16 with
    diffusers' fp32 modules: within the eager bf16 bound."""
    reference = tiny_wan("i2v").cuda()
    truth = forward(reference, {k: v.cuda() for k, v in wan_inputs(torch.float32, 2, "i2v").items()})
    reference.save_pretrained(tmp_path)
    model = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).cuda().eval()
    inputs = {k: v.cuda() for k, v in wan_inputs(torch.bfloat16, 2, "i2v").items()}
    eager = forward(model, inputs)
    dit_kernels.patch(model)
    assert_within_eager_bound(forward(model, inputs), eager, truth, what="wan cuda bf16")
