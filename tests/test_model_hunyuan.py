"""HunyuanDiT patcher (dit_kernels.models.hunyuan): whole-model parity of v1.1 (style / image-size
conditioning) and v1.2 (without; the real configs' FFN ratio 4.3637), 4 and 6 blocks (long skips into one
and two blocks), non-square latents with the pipeline's 2-D RoPE, batch 1 and 2, every dtype, torch and
triton backends; the report; RoPE on q and k in self-attention, q only in cross-attention, tables used
as passed; refusals that change nothing; LoRA; torch.compile."""

import inspect

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import HunyuanAttnProcessor2_0
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from diffusers.models.normalization import RMSNorm

import dit_kernels
from dit_kernels.bench import zoo
from dit_kernels.models import shared
from dit_kernels.ops import rope_tables
from patch_parity import FP32_ATOL, FP32_RTOL, PRECISION_CASES, assert_compiled_matches, assert_patched_parity
from patch_parity import assert_refused_unchanged, forward
from patch_parity import assert_unpatch_restores, attention_processors
from patch_parity import assert_modified_patched_matches, inject_lora

LATENT = (8, 12)  # latent height x width: a 4 x 6 token grid (patch 2), non-square 2-D RoPE
VARIANTS = {
    "v1.1": {},  # the registry's tiny config: 4 blocks, use_style_cond_and_image_meta_size=True
    "v1.1-6": {"num_layers": 6},
    "v1.2": {"use_style_cond_and_image_meta_size": False, "mlp_ratio": 4.3637},  # FFN width int(16 * 4.3637) = 69
}


def tiny_hunyuan(variant: str = "v1.1", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build("hunyuan", "tiny", **VARIANTS[variant], **overrides)


def hunyuan_inputs(model: torch.nn.Module, dtype: torch.dtype, batch: int = 2) -> dict:
    """The pipeline's inputs (zoo): per-sample timesteps differ, the second sample's text is padded."""
    return zoo.transformer_inputs("hunyuan", model, zoo.Shape(batch, *LATENT), dtype, seed=1)


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype, backend", PRECISION_CASES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_patched_parity(variant, batch, dtype, backend):
    model = tiny_hunyuan(variant)  # for its config: the inputs' sizes
    report = assert_patched_parity(
        lambda: tiny_hunyuan(variant),
        lambda d: hunyuan_inputs(model, d, batch),
        dtype=dtype,
        backend=backend,
        what=f"hunyuan {variant} B={batch} {dtype} {backend}",
    )
    assert report.family == "hunyuan" and not report.fallbacks


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_text_longer_than_image(backend):
    """The pipeline's 77 + 256 text tokens outnumber the image tokens at small sizes (a 256x256 image has
    16 x 16 = 256): cross-attention rotates q only, so its RoPE table needs the image rows only."""
    model = tiny_hunyuan(text_len=20, text_len_t5=30)  # 50 text tokens, 24 image tokens
    assert_patched_parity(
        lambda: tiny_hunyuan(text_len=20, text_len_t5=30),
        lambda d: hunyuan_inputs(model, d),
        dtype=torch.float32,
        backend=backend,
        what=f"hunyuan long text {backend}",
    )


def test_controlnet_residuals_reach_the_long_skips():
    """HunyuanDiT's ControlNet pipeline passes one residual per long skip; the transformer's loop adds it to
    the skip a block receives (blocks 4 and 5 of 6 here), so the patched blocks see the sum."""
    model = tiny_hunyuan("v1.1-6")
    inputs = hunyuan_inputs(model, torch.float32)
    generator = torch.Generator().manual_seed(2)
    controls = [torch.randn(2, LATENT[0] * LATENT[1] // 4, 16, generator=generator) for _ in range(2)]

    def with_controls():  # the transformer pops from the list: a fresh one per call
        return forward(model, {**inputs, "controlnet_block_samples": list(controls)})

    truth = with_controls()
    assert not torch.allclose(truth, forward(model, inputs)), "the controls should change the output"
    dit_kernels.patch(model, backend="torch")
    torch.testing.assert_close(with_controls(), truth, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_report_lists_every_replacement_and_unpatch_restores_processors():
    model = tiny_hunyuan("v1.1-6")
    processors = attention_processors(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = dit_kernels.patch(model, backend="torch")
    fused = "layernorm_modulate, gated_residual_layernorm_modulate x2, gated_residual"
    expected = []
    for i in range(6):
        skip = "layernorm_modulate (skip_norm), " if i > 3 else ""  # blocks after L/2 = 3 take a long skip
        expected += [f"blocks.{i}.forward: {skip}{fused}", f"blocks.{i}.attn1.processor: FusedAttnProcessor",
                     f"blocks.{i}.attn2.processor: FusedAttnProcessor"]  # fmt: skip
    assert report.replaced == expected
    assert len(processors) == 12
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "patch changed the state dict"
    assert_unpatch_restores(model, processors, shared.FusedAttnProcessor)


def test_rope_on_q_and_k_in_self_attention_q_only_in_cross_attention(monkeypatch):
    """Every attention rotates with the pipeline's own (cos, sin) tensors, unconverted (they are fp32
    contiguous already: rope_tables returns them as they are); self-attention rotates q and k,
    cross-attention q only (the text keys have no positions)."""
    model = tiny_hunyuan()
    inputs = hunyuan_inputs(model, torch.float32)
    cos, sin = inputs["image_rotary_emb"]
    assert all(t is s for t, s in zip(rope_tables(cos, sin), (cos, sin))), "the pipeline's tables would be copied"
    calls = []
    real = shared.qk_norm_rope
    monkeypatch.setattr(shared, "qk_norm_rope", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    truth = forward(model, inputs)
    dit_kernels.patch(model, backend="torch")
    torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert [kw["rope_k"] for kw in calls] == [True, False] * 4
    assert all(kw["cos"] is cos and kw["sin"] is sin and kw["norm"] == "layer" for kw in calls)


def test_pipeline_rope_tables_are_fp32_contiguous():
    """What the no-conversion above rests on, for the shapes the pipeline builds (non-square grids too)."""
    for grid in [(4, 6), (3, 5), (8, 8)]:
        cos, sin = get_2d_rotary_pos_embed(8, ((0, 0), grid), grid, output_type="pt")
        assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()


def test_processor_names_every_kwarg_of_diffusers_processor():
    theirs = inspect.signature(HunyuanAttnProcessor2_0.__call__).parameters
    ours = inspect.signature(shared.FusedAttnProcessor.__call__).parameters
    assert list(ours) == list(theirs)  # self, attn, hidden_states, encoder_hidden_states, mask, temb, rope


def test_block_forward_has_diffusers_signature():
    model = tiny_hunyuan()
    dit_kernels.patch(model, backend="torch")
    block = model.blocks[0]

    def names_and_defaults(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert names_and_defaults(block.forward) == names_and_defaults(type(block).forward.__get__(block))


# ----------------------------------------------------------------------------------------- refusals


class CustomProcessor(HunyuanAttnProcessor2_0):
    """A user's processor: a subclass, so only an exact type check catches it."""


def _custom_processor(model):
    model.blocks[2].attn2.set_processor(CustomProcessor())


def _plain_layernorm(model):
    """nn.LayerNorm computes in the model dtype; diffusers' FP32LayerNorm in fp32: not the same module."""
    model.blocks[3].skip_norm = torch.nn.LayerNorm(32, eps=1e-6)


def _rms_qk_norm(model):
    model.blocks[1].attn1.norm_k = RMSNorm(8, eps=1e-6)


def _hooked_block(model):
    HookRegistry.check_if_exists_or_initialize(model.blocks[0]).register_hook(ModelHook(), "spy")


def _rescaled_output(model):
    model.blocks[1].attn2.rescale_output_factor = 2.0


def _fused_qkv(model):
    """diffusers' fused projections come with FusedHunyuanAttnProcessor2_0, which the patcher does not replace."""
    model.fuse_qkv_projections()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_custom_processor, r"blocks\.2\.attn2\.processor is .*CustomProcessor, expected .*HunyuanAttnProcessor2_0"),
        (_plain_layernorm, r"blocks\.3\.skip_norm is torch\.nn\..*LayerNorm, expected .*FP32LayerNorm"),
        (_rms_qk_norm, r"blocks\.1\.attn1\.norm_q/norm_k: q and k norms differ \(LayerNorm vs RMSNorm\)"),
        (_hooked_block, r"blocks\.0\.forward is already wrapped"),
        (_rescaled_output, r"blocks\.1\.attn2 uses rescale_output_factor != 1"),
        (_fused_qkv, r"blocks\.0\.attn1\.processor is .*FusedHunyuanAttnProcessor2_0, expected .*HunyuanAttnProc"),
    ],
    ids=["custom-processor", "plain-layernorm", "qk-norm", "hooked-forward", "rescaled-output", "fused-qkv"],
)
def test_unrecognised_model_refused_and_unchanged(mutate, message):
    model = tiny_hunyuan()
    mutate(model)
    assert_refused_unchanged(model, message)


# ----------------------------------------------------------------------------------------- LoRA, compile


def test_lora_before_patch():
    """peft LoRA (random B) on every Linear the patched path calls: attention projections, FFN, the
    AdaLayerNormShift Linear and the long-skip Linear; patched fp32 equals eager fp32 of the LoRA model.
    HunyuanDiT2DModel has no diffusers ``add_adapter`` (no PeftAdapterMixin): peft injects the layers."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "skip_linear"]
    inputs = hunyuan_inputs(tiny_hunyuan(), torch.float32)
    assert_modified_patched_matches(tiny_hunyuan, lambda model: inject_lora(model, targets), inputs)


@pytest.mark.slow  # torch.compile: the representative one is DiT's (tests/test_model_dit.py)
def test_patched_model_under_torch_compile_matches_eager():
    model = tiny_hunyuan()
    inputs = hunyuan_inputs(model, torch.float32)
    assert_compiled_matches(model, inputs)
