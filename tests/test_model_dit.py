"""DiT patcher (dit_kernels.models.dit, on the shared BasicTransformerBlock forward of models.basic_block):
whole-model parity (square latents: DiT takes no other), batch 1 and 2 with per-sample timesteps and class
labels (the null class of CFG included), every dtype, torch and triton backends, with and without norm3's
affine parameters; the report and unpatch; the block forward's signature and the processor's kwargs; refusals
that change nothing; peft LoRA; chunked feed-forward; torch.compile."""

import inspect

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import SinusoidalPositionalEmbedding

import dit_kernels
from dit_kernels.models import family_named
from dit_kernels.models.shared import FusedAttnProcessor
from patch_parity import FP32_ATOL, FP32_RTOL, PRECISION_CASES, assert_compiled_matches, assert_patched_parity
from patch_parity import assert_refused_unchanged, forward
from patch_parity import assert_unpatch_restores, attention_processors
from patch_parity import assert_modified_patched_matches, inject_lora

VARIANTS = {
    "xl": {},  # DiT-XL/2's layout: norm3 without affine, eps 1e-5; learned-sigma output
    "affine": {"norm_elementwise_affine": True, "norm_eps": 1e-6},
}


def tiny_dit(**overrides) -> DiTTransformer2DModel:
    """The registry's tiny DiT, seeded."""
    torch.manual_seed(0)
    return family_named("dit").build("tiny", **overrides)


def dit_inputs(dtype: torch.dtype, batch: int = 2) -> dict:
    """Seeded latents [B, 4, 8, 8]; per-sample timesteps and class labels (1000: CFG's null class)."""
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator).to(dtype),
        "timestep": torch.tensor([981, 250])[:batch],
        "class_labels": torch.tensor([207, 1000])[:batch],
    }


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype, backend", PRECISION_CASES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patched_parity(variant, batch, dtype, backend):
    report = assert_patched_parity(
        lambda: tiny_dit(**VARIANTS[variant]),
        lambda d: dit_inputs(d, batch),
        dtype=dtype,
        backend=backend,
        what=f"dit {variant} B={batch} {dtype} {backend}",
    )
    assert report.family == "dit" and not report.fallbacks


def test_report_lists_every_replacement_and_unpatch_restores_processors():
    model = tiny_dit()
    processors = attention_processors(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = dit_kernels.patch(model, backend="torch")
    fused = "layernorm_modulate, gated_residual_layernorm_modulate, gated_residual"
    assert report.replaced == [item for i in range(2) for item in (f"transformer_blocks.{i}.forward: {fused}",
                               f"transformer_blocks.{i}.attn1.processor: FusedAttnProcessor")]  # fmt: skip
    assert list(processors) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "patch changed the state dict"
    assert_unpatch_restores(model, processors, FusedAttnProcessor)


def test_block_forward_and_processor_signatures_match_diffusers():
    """The patched block forward takes exactly BasicTransformerBlock.forward's parameters (names, order,
    defaults: DiT's gradient-checkpointing path calls it positionally); the processor names every named
    parameter of AttnProcessor2_0 (diffusers' Attention.forward drops kwargs the processor does not name)."""
    model = tiny_dit()
    dit_kernels.patch(model, backend="torch")
    ours = inspect.signature(model.transformer_blocks[0].forward).parameters
    theirs = inspect.signature(BasicTransformerBlock.forward).parameters
    assert [(p.name, p.default, p.kind) for p in ours.values()] == [
        (p.name, p.default, p.kind) for p in list(theirs.values())[1:]
    ]
    named = [p for p, v in inspect.signature(AttnProcessor2_0.__call__).parameters.items()
             if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]  # fmt: skip
    assert list(inspect.signature(FusedAttnProcessor.__call__).parameters)[: len(named)] == named


def test_gradient_checkpointing_path_calls_blocks_positionally():
    """DiT's training path passes the block's arguments positionally: the patched forward takes them so."""
    model = tiny_dit()
    inputs = dit_inputs(torch.float32)
    truth = forward(model, inputs)
    model.enable_gradient_checkpointing()
    dit_kernels.patch(model, backend="torch")
    out = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(out.detach(), truth, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_chunked_feed_forward_matches():
    """``set_chunk_feed_forward``: the patched block applies the FeedForward in chunks as diffusers does."""
    model = tiny_dit()
    for block in model.transformer_blocks:
        block.set_chunk_feed_forward(4, dim=1)
    inputs = dit_inputs(torch.float32)
    truth = forward(model, inputs)
    dit_kernels.patch(model, backend="torch")
    torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)
    for block in model.transformer_blocks:
        block.set_chunk_feed_forward(3, dim=1)  # 16 tokens: not divisible, diffusers' own error
    with pytest.raises(ValueError, match="has to be divisible by chunk size"):
        forward(model, inputs)


# ----------------------------------------------------------------------------------------- refusals


class CustomProcessor(AttnProcessor2_0):
    """A user's processor: a subclass, so only an exact type check catches it."""


def _custom_processor(model):
    model.transformer_blocks[1].attn1.set_processor(CustomProcessor())


def _rms_norm3(model):
    model.transformer_blocks[0].norm3 = torch.nn.RMSNorm(model.inner_dim)


def _other_norm_type(model):
    model.transformer_blocks[1].norm_type = "ada_norm"  # diffusers' forward would take its AdaLayerNorm path


def _hooked_block(model):
    HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[1]).register_hook(ModelHook(), "spy")


def _positional_embeddings(model):
    """A block option DiT's config never sets; diffusers' forward would add it to the normed input."""
    model.transformer_blocks[0].pos_embed = SinusoidalPositionalEmbedding(model.inner_dim, 16)


def _rescaled_attention(model):
    model.transformer_blocks[0].attn1.rescale_output_factor = 2.0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_custom_processor, r"transformer_blocks\.1\.attn1\.processor is .*CustomProcessor, expected .*AttnProc"),
        (_rms_norm3, r"transformer_blocks\.0\.norm3 is torch\.nn\..*RMSNorm, expected .*LayerNorm"),
        (_other_norm_type, r"transformer_blocks\.1 has norm_type='ada_norm', expected 'ada_norm_zero'"),
        (_hooked_block, r"transformer_blocks\.1\.forward is already wrapped"),
        (_positional_embeddings, r"transformer_blocks\.0 uses positional_embeddings"),
        (_rescaled_attention, r"transformer_blocks\.0\.attn1 uses rescale_output_factor != 1"),
    ],
    ids=["custom-processor", "rms-norm", "norm-type", "hooked-forward", "positional-embeddings", "attention-option"],
)
def test_unrecognised_model_refused_and_unchanged(mutate, message):
    model = tiny_dit()
    mutate(model)
    assert_refused_unchanged(model, message)


# ----------------------------------------------------------------------------------------- LoRA, compile


def test_lora_before_patch_matches_eager():
    """peft LoRA (random B) on every Linear the patched path calls, the per-block timestep/class embedding's
    and the modulation's included: patched fp32 equals eager fp32 of the adapted model."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "norm1.linear", "linear_1", "linear_2", "ff.net.0.proj", "ff.net.2"]
    # DiTTransformer2DModel has no add_adapter (no PeftAdapterMixin)
    assert_modified_patched_matches(tiny_dit, lambda model: inject_lora(model, targets), dit_inputs(torch.float32))


def test_patched_model_under_torch_compile_matches_eager():
    model = tiny_dit()
    inputs = dit_inputs(torch.float32)
    assert_compiled_matches(model, inputs)


def test_timestep_projection_is_shared_within_a_call_and_recomputed_for_a_new_timestep():
    """The sinusoidal projection is computed once per call by the first block, not once per block,
    and again for a new timestep, also one written in place into the same tensor (a loop that reuses it)."""
    model = tiny_dit()
    inputs = dit_inputs(torch.float32)
    dit_kernels.patch(model, backend="torch")
    calls = []
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.register_forward_hook(lambda module, args, out: calls.append(module))
    for t in (999.0, 500.0, 3.0):
        inputs["timestep"].fill_(t)
        ours = forward(model, inputs)
        dit_kernels.unpatch(model)
        truth = forward(model, inputs)
        dit_kernels.patch(model, backend="torch")
        torch.testing.assert_close(ours, truth, rtol=FP32_RTOL, atol=FP32_ATOL)
    # per step: patched, the first block's projection once (the memo) + once for the output layer, which
    # DiTTransformer2DModel.forward conditions with transformer_blocks[0].norm1.emb; eager, every block + that
    first, second = (block.norm1.emb.time_proj for block in model.transformer_blocks)
    assert calls == [first, first, first, second, first] * 3
