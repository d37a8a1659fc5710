"""PixArt patcher (dit_kernels.models.pixart, on the shared BasicTransformerBlock forward of
models.basic_block): whole-model parity of PixArt-Σ (no additional conditions) and PixArt-α (resolution and
aspect-ratio conditions, sample_size 128) on non-square latents with padded prompts, batch 1 and 2 with
per-sample timesteps, every dtype, torch and triton backends; the text mask (and a self-attention mask)
reaching the fused attention; the report and unpatch; refusals that change nothing (fused QKV projections
included); peft LoRA; torch.compile. The block forward's signature and the processor's kwargs are checked
in test_model_dit.py (the same forward and processor)."""

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.normalization import FP32LayerNorm

import dit_kernels
from dit_kernels.models import family_named
from dit_kernels.models.shared import FusedAttnProcessor
from patch_parity import FP32_ATOL, FP32_RTOL, PRECISION_CASES, assert_compiled_matches, assert_patched_parity
from patch_parity import assert_refused_unchanged, forward
from patch_parity import assert_unpatch_restores, attention_processors
from patch_parity import assert_modified_patched_matches, inject_lora

TEXT_LEN = 7
LATENT = (8, 12)  # latent rows x cols: a non-square image, 4 x 6 patches
CAPTION_CHANNELS = 32
VARIANTS = {  # the registry's tiny PixArt is Σ; α: sample_size 128 turns use_additional_conditions on, and its
    # size embedding needs a width divisible by 3 (resolution: 2 x D/3, aspect ratio: D/3)
    "sigma": {},
    "alpha": dict(attention_head_dim=12, cross_attention_dim=24, sample_size=128, use_additional_conditions=None),
}  # fmt: skip


def tiny_pixart(variant: str = "sigma", **overrides) -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    model = family_named("pixart").build("tiny", **{**VARIANTS[variant], **overrides})
    assert model.config.caption_channels == CAPTION_CHANNELS
    assert model.use_additional_conditions == (variant == "alpha")
    return model


def text_mask(batch: int) -> torch.Tensor:
    """[B, T] keep (1) / pad (0), as the pipeline's tokenizer gives: the first sample's prompt is padded."""
    return torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * TEXT_LEN])[:batch]


def pixart_inputs(dtype: torch.dtype, batch: int = 2, variant: str = "sigma") -> dict:
    """Seeded inputs, per-sample timesteps; α gets per-sample resolution [B, 2] and aspect ratio [B, 1]."""
    generator = torch.Generator().manual_seed(1)
    conditions = {"resolution": None, "aspect_ratio": None}
    if variant == "alpha":
        conditions = {"resolution": torch.tensor([[64.0, 96.0], [96.0, 64.0]])[:batch].to(dtype),
                      "aspect_ratio": torch.tensor([[1.5], [0.5]])[:batch].to(dtype)}  # fmt: skip
    return {
        "hidden_states": torch.randn(batch, 4, *LATENT, generator=generator).to(dtype),
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, CAPTION_CHANNELS, generator=generator).to(dtype),
        "encoder_attention_mask": text_mask(batch),
        "timestep": torch.tensor([981, 250])[:batch],
        "added_cond_kwargs": conditions,
    }


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype, backend", PRECISION_CASES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patched_parity(variant, batch, dtype, backend):
    report = assert_patched_parity(
        lambda: tiny_pixart(variant),
        lambda d: pixart_inputs(d, batch, variant),
        dtype=dtype,
        backend=backend,
        what=f"pixart {variant} B={batch} {dtype} {backend}",
    )
    assert report.family == "pixart" and not report.fallbacks


def _padded(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive bias [B, 1, T] the transformer builds from a [B, T] mask (keep 0, pad -10000)."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masks_reach_the_fused_attention(backend):
    """The padded prompt changes eager's output, and the patched model follows it: the text mask given as
    [B, T] or as the [B, 1, T] bias; a key-padding mask over image tokens for the self-attention too."""
    model = tiny_pixart()
    inputs = pixart_inputs(torch.float32)
    image_mask = torch.ones(2, 24, dtype=torch.long)
    image_mask[1, 5:11] = 0
    cases = {
        "text": inputs,
        "text bias": {**inputs, "encoder_attention_mask": _padded(inputs["encoder_attention_mask"], torch.float32)},
        "image": {**inputs, "attention_mask": image_mask},
    }
    unmasked = forward(model, {**inputs, "encoder_attention_mask": None})
    truths = {name: forward(model, case) for name, case in cases.items()}
    assert not torch.allclose(truths["text"], unmasked), "the padded prompt should change the output"
    assert not torch.allclose(truths["image"], truths["text"]), "the image mask should change the output"
    dit_kernels.patch(model, backend=backend)
    for name, case in cases.items():
        torch.testing.assert_close(forward(model, case), truths[name], rtol=FP32_RTOL, atol=FP32_ATOL, msg=name)


def test_report_lists_every_replacement_and_unpatch_restores_processors():
    model = tiny_pixart()
    processors = attention_processors(model)
    report = dit_kernels.patch(model, backend="torch")
    fused = "layernorm_modulate, gated_residual_layernorm_modulate, gated_residual x2"
    expected = []
    for i in range(2):
        expected += [f"transformer_blocks.{i}.forward: {fused}",
                     f"transformer_blocks.{i}.attn1.processor: FusedAttnProcessor",
                     f"transformer_blocks.{i}.attn2.processor: FusedAttnProcessor"]  # fmt: skip
    assert report.replaced == expected and len(processors) == 4
    assert_unpatch_restores(model, processors, FusedAttnProcessor)


# ----------------------------------------------------------------------------------------- refusals


class CustomProcessor(AttnProcessor2_0):
    """A user's processor: a subclass, so only an exact type check catches it."""


def _custom_processor(model):
    model.transformer_blocks[0].attn2.set_processor(CustomProcessor())


def _fp32_layer_norm(model):
    """A LayerNorm subclass computing in fp32: an exact type check refuses what it has not verified."""
    model.transformer_blocks[1].norm2 = FP32LayerNorm(model.inner_dim, elementwise_affine=False, eps=1e-6)


def _hooked_block(model):
    HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0]).register_hook(ModelHook(), "spy")


def _fused_qkv(model):
    model.fuse_qkv_projections()


@pytest.mark.parametrize(
    "build, mutate, message",
    [
        (tiny_pixart, _custom_processor,
         r"transformer_blocks\.0\.attn2\.processor is .*CustomProcessor, expected .*AttnProcessor2_0"),
        (tiny_pixart, _fp32_layer_norm, r"transformer_blocks\.1\.norm2 is .*FP32LayerNorm, expected .*LayerNorm"),
        (tiny_pixart, _hooked_block, r"transformer_blocks\.0\.forward is already wrapped"),
        (tiny_pixart, _fused_qkv,
         r"transformer_blocks\.0\.attn1\.processor is .*FusedAttnProcessor2_0, expected .*AttnProcessor2_0"),
        (lambda: tiny_pixart(attention_type="gated"), lambda model: None,
         r"transformer_blocks\.0 uses a GLIGEN fuser"),
    ],
    ids=["custom-processor", "fp32-layer-norm", "hooked-forward", "fused-qkv", "gated-attention-config"],
)  # fmt: skip
def test_unrecognised_model_refused_and_unchanged(build, mutate, message):
    model = build()
    mutate(model)
    assert_refused_unchanged(model, message)


# ----------------------------------------------------------------------------------------- LoRA, compile


def test_lora_before_patch_matches_eager():
    """peft LoRA (random B) on the attention projections (self and cross), the feed-forward and the caption
    projection: patched fp32 equals eager fp32 of the adapted model."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "linear_1", "linear_2"]
    inputs = pixart_inputs(torch.float32)
    assert_modified_patched_matches(tiny_pixart, lambda model: inject_lora(model, targets), inputs)


@pytest.mark.slow  # torch.compile: the representative one is DiT's (tests/test_model_dit.py)
def test_patched_model_under_torch_compile_matches_eager():
    model = tiny_pixart()
    inputs = pixart_inputs(torch.float32)
    assert_compiled_matches(model, inputs)
