"""FLUX.1 patcher (dit_kernels.models.flux): whole-model parity of dev and schnell, double and single blocks,
non-square latents, batch 1 and 2, every dtype, torch and triton backends; fp16 clipping; refusals that
change nothing; the report; attention still going through diffusers' dispatch when the user asked for a
backend, a parallel config or a mask; LoRA and fused QKV projections."""

import inspect

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

import dit_kernels
from dit_kernels.models import flux, shared
from patch_parity import FP32_ATOL, FP32_RTOL, PRECISION_CASES, assert_patched_parity, assert_refused_unchanged, forward
from patch_parity import assert_unpatch_restores, attention_processors
from patch_parity import assert_modified_patched_matches

TEXT_LEN = 7
GRID = (3, 5)  # packed latent rows x cols: a non-square image (FLUX packs 2x2 latent patches into a token)
NUM_BLOCKS = 4  # 2 double + 2 single in the tiny config


def tiny_flux(guidance_embeds: bool = True, **overrides) -> FluxTransformer2DModel:
    """The registry's tiny FLUX (dev with guidance_embeds, schnell without), seeded."""
    torch.manual_seed(0)
    return flux.FAMILY.build("tiny", guidance_embeds=guidance_embeds, **overrides)


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, 3] = (0, row, col), as FluxPipeline._prepare_latent_image_ids builds them."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.flatten(0, 1)


def flux_inputs(dtype: torch.dtype, batch: int = 2, guidance: bool = True) -> dict:
    """Seeded inputs; per-sample timesteps (and guidance) differ so the per-batch modulation is exercised.
    ids in the model dtype, as the pipeline passes them."""
    generator = torch.Generator().manual_seed(1)
    tokens = GRID[0] * GRID[1]
    inputs = {
        "hidden_states": torch.randn(batch, tokens, 16, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 32, generator=generator),
        "pooled_projections": torch.randn(batch, 24, generator=generator),
        "timestep": torch.tensor([0.9, 0.35])[:batch],
        "img_ids": image_ids(*GRID),
        "txt_ids": torch.zeros(TEXT_LEN, 3),
        "guidance": torch.tensor([3.5, 5.0])[:batch] if guidance else None,
    }
    return {k: None if v is None else v.to(dtype) for k, v in inputs.items()}


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype, backend", PRECISION_CASES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_patched_parity(variant, batch, dtype, backend):
    guidance = variant == "dev"
    report = assert_patched_parity(
        lambda: tiny_flux(guidance_embeds=guidance),
        lambda d: flux_inputs(d, batch, guidance),
        dtype=dtype,
        backend=backend,
        what=f"flux {variant} B={batch} {dtype} {backend}",
    )
    assert report.family == "flux" and not report.fallbacks


def test_report_lists_every_replacement_and_unpatch_restores_processors():
    model = tiny_flux()
    processors = attention_processors(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = dit_kernels.patch(model, backend="torch")
    attn = "layernorm_modulate x2, gated_residual_layernorm_modulate x2, gated_residual x2"
    expected = ["pos_embed.forward: rope_tables once per call"]
    for i in range(2):
        expected += [f"transformer_blocks.{i}.forward: {attn}",
                     f"transformer_blocks.{i}.attn.processor: FluxFusedAttnProcessor"]  # fmt: skip
    for i in range(2):
        expected += [f"single_transformer_blocks.{i}.forward: layernorm_modulate, gated_residual",
                     f"single_transformer_blocks.{i}.attn.processor: FluxFusedAttnProcessor"]  # fmt: skip
    assert report.replaced == expected
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "patch changed the state dict"
    assert_unpatch_restores(model, processors, flux.FluxFusedAttnProcessor)


def test_single_blocks_reuse_the_joint_tensor(monkeypatch):
    """The second single block gets the first one's output halves back: it reuses their tensor (no cat)."""
    joined = []
    real = flux._joined

    def spy(txt, img):
        out = real(txt, img)
        joined.append(out is txt._base)
        torch.testing.assert_close(out, torch.cat([txt, img], dim=1), rtol=0, atol=0)
        return out

    monkeypatch.setattr(flux, "_joined", spy)
    model = tiny_flux(num_single_layers=3)
    dit_kernels.patch(model, backend="torch")
    forward(model, flux_inputs(torch.float32))
    assert joined == [False, True, True]  # the double block's two streams are separate tensors: one cat
    base = torch.randn(2, 9, 4)
    assert flux._joined(base[:, :3], base[:, 3:]) is base
    assert flux._joined(base[:, :3], base[:, 4:]) is not base  # not the two halves: a real cat


def test_single_block_projects_out_without_the_concatenation():
    """proj_out(cat([attn, mlp])) as two GEMMs over proj_out's weight's column blocks, the second accumulating
    in place: equal to the module on the concatenation (fp32 summation order), no cat; under autograd the
    module itself."""
    block = tiny_flux().single_transformer_blocks[0]
    attn, mlp = torch.randn(2, 5, 32), torch.randn(2, 5, 128)
    truth = block.proj_out(torch.cat([attn, mlp], dim=2))
    with torch.no_grad():
        split = flux._project_out(block, attn, mlp)
    torch.testing.assert_close(split, truth, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert flux._project_out(block, attn, mlp).grad_fn is not None  # autograd: the module on the cat


# ----------------------------------------------------------------------------------------- fp16 clipping


def _saturate(block: torch.nn.Module, kind: str) -> None:
    """Make the block's residual branches add ~1000 everywhere: modulation gates 1, shift/scale 0 (the
    modulation Linear's weight 0, bias 1 on the gate chunks only), bias 1000 on each branch's last Linear."""
    if kind == "double":
        modulations = [(block.norm1, [2, 5]), (block.norm1_context, [2, 5])]  # gate_msa, gate_mlp
        outputs = [block.ff.net[2], block.ff_context.net[2]]
    else:
        modulations, outputs = [(block.norm, [2])], [block.proj_out]  # shift, scale, gate
    with torch.no_grad():
        for ada_norm, gates in modulations:
            ada_norm.linear.weight.zero_()
            chunks = ada_norm.linear.bias.view(-1, block.attn.inner_dim)
            chunks.zero_()
            chunks[gates] = 1.0
        for linear in outputs:
            linear.bias.fill_(1000.0)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy cast
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["double", "single"])
def test_fp16_overflow_is_clipped_where_diffusers_clips(kind, backend):
    """Residual 65000 + ~1000 overflows fp16. diffusers clips the text stream of a double block and the whole
    joint sequence of a single block to 65504; the double block's image stream stays inf. So must we."""
    model = tiny_flux().to(torch.float16)
    block = model.transformer_blocks[0] if kind == "double" else model.single_transformer_blocks[0]
    _saturate(block, kind)
    batch, dim = 2, block.attn.inner_dim
    args = {
        "hidden_states": torch.full((batch, GRID[0] * GRID[1], dim), 65000.0, dtype=torch.float16),
        "encoder_hidden_states": torch.full((batch, TEXT_LEN, dim), 65000.0, dtype=torch.float16),
        "temb": torch.randn(batch, dim).to(torch.float16),
        "image_rotary_emb": model.pos_embed(torch.cat([torch.zeros(TEXT_LEN, 3), image_ids(*GRID)])),
    }
    with torch.no_grad():
        eager = block(**args)
        dit_kernels.patch(model, backend=backend)
        ours = block(**args)
    text, image = ours
    assert (text == 65504).all(), "text stream not clipped to 65504"
    assert (image == (torch.inf if kind == "double" else 65504)).all()
    assert all(torch.equal(o, e) for o, e in zip(ours, eager))


# ----------------------------------------------------------------------------------------- refusals


class CustomProcessor(FluxAttnProcessor):
    """A user's processor: a subclass, so only an exact type check catches it."""


def _custom_processor(model):
    model.transformer_blocks[1].attn.set_processor(CustomProcessor())


def _rms_single_norm(model):
    model.single_transformer_blocks[1].norm.norm = torch.nn.RMSNorm(model.inner_dim)


def _identity_qk_norm(model):
    model.transformer_blocks[0].attn.norm_added_k = torch.nn.Identity()


def _hooked_block(model):
    HookRegistry.check_if_exists_or_initialize(model.single_transformer_blocks[0]).register_hook(ModelHook(), "spy")


def _odd_axes(model):
    """Nothing to change: the model is built with axes_dims_rope (4, 6, 8) summing to 18 != head_dim 16."""


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_custom_processor, r"transformer_blocks\.1\.attn\.processor is .*CustomProcessor, expected .*\.FluxAttnProc"),
        (_rms_single_norm, r"single_transformer_blocks\.1\.norm\.norm is torch\.nn\..*RMSNorm, expected .*LayerNorm"),
        (_identity_qk_norm, r"transformer_blocks\.0\.attn\.norm_added_q/norm_added_k: unsupported .* Identity"),
        (_hooked_block, r"single_transformer_blocks\.0\.forward is already wrapped"),
        (_odd_axes, r"axes_dims_rope=\[4, 6, 8\] must be even and sum to attention_head_dim \[16\]"),
    ],
    ids=["custom-processor", "rms-norm", "qk-norm", "hooked-forward", "axes-config"],
)
def test_unrecognised_model_refused_and_unchanged(mutate, message):
    model = tiny_flux(axes_dims_rope=(4, 6, 8)) if mutate is _odd_axes else tiny_flux()
    mutate(model)
    assert_refused_unchanged(model, message)


# ----------------------------------------------------------------------------------------- dispatch


def test_processor_names_every_kwarg_of_diffusers_processor():
    theirs = inspect.signature(FluxAttnProcessor.__call__).parameters
    ours = inspect.signature(flux.FluxFusedAttnProcessor.__call__).parameters
    assert list(ours) == list(theirs)  # self, attn, hidden_states, encoder_hidden_states, attention_mask, rope


class DispatchSpy:
    """Stands in for ``dispatch_attention_fn`` in the flux module: records each call's backend, parallel
    config and mask, then runs diffusers' real dispatch (without the parallel config: one process here)."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, query, key, value, attn_mask=None, *, backend=None, parallel_config=None):
        self.calls.append((backend, parallel_config, attn_mask, tuple(query.shape)))
        return self.real(query, key, value, attn_mask=attn_mask, backend=backend)


def _set_backend_before_patch(model):
    model.set_attention_backend("_native_math")
    dit_kernels.patch(model, backend="torch")


def _set_backend_after_patch(model):
    dit_kernels.patch(model, backend="torch")
    model.set_attention_backend("_native_math")


# A parallel config (context parallelism) runs our attention as the local op of the parallel attention, not
# diffusers' dispatch: tests/test_parallel.py.
@pytest.mark.parametrize("setup", [_set_backend_before_patch, _set_backend_after_patch],
                         ids=["backend-before-patch", "backend-after-patch"])  # fmt: skip
def test_attention_goes_through_dispatch_when_asked(monkeypatch, setup):
    backend, parallel = AttentionBackendName._NATIVE_MATH, None
    # model.set_attention_backend also sets diffusers' global active backend: restored after the test
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    model = tiny_flux()
    inputs = flux_inputs(torch.float32)
    truth = forward(model, inputs)
    spy = DispatchSpy(flux.dispatch_attention_fn)
    monkeypatch.setattr(flux, "dispatch_attention_fn", spy)
    setup(model)
    ours = forward(model, inputs)
    joint = (2, TEXT_LEN + GRID[0] * GRID[1], 2, 16)
    assert [call[:2] for call in spy.calls] == [(backend, parallel)] * NUM_BLOCKS
    assert all(call[3] == joint for call in spy.calls), "dispatch did not get the joint [B, T + S, H, Dh] buffers"
    torch.testing.assert_close(ours, truth, rtol=FP32_RTOL, atol=FP32_ATOL)
    dit_kernels.unpatch(model)
    settings = {(m.processor._attention_backend, m.processor._parallel_config) for m in model.modules()
                if hasattr(m, "processor")}  # fmt: skip
    assert settings == {(backend, parallel)}, "a setting made on the patched model was lost by unpatch"


def test_own_attention_unless_diffusers_is_asked(monkeypatch):
    """Default settings: our joint_attention, no dispatch. The global ``attention_backend`` context manager
    or an attention mask in joint_attention_kwargs: dispatch, with that backend / mask."""
    model = tiny_flux()
    inputs = flux_inputs(torch.float32)
    truth = forward(model, inputs)
    spy = DispatchSpy(flux.dispatch_attention_fn)
    own = []
    real_joint = shared.joint_attention
    monkeypatch.setattr(flux, "dispatch_attention_fn", spy)
    monkeypatch.setattr(shared, "joint_attention", lambda *a, **kw: own.append(kw["backend"]) or real_joint(*a, **kw))
    dit_kernels.patch(model, backend="torch")
    torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert own == ["torch"] * NUM_BLOCKS and spy.calls == []
    with attention_backend("_native_math"):
        torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert len(own) == NUM_BLOCKS and [c[:2] for c in spy.calls] == [(None, None)] * NUM_BLOCKS
    mask = torch.ones(2, 1, 1, TEXT_LEN + GRID[0] * GRID[1], dtype=torch.bool)
    mask[1, ..., 2:TEXT_LEN] = False  # second sample: padded prompt tokens
    dit_kernels.unpatch(model)
    masked_truth = forward(model, {**inputs, "joint_attention_kwargs": {"attention_mask": mask}})
    dit_kernels.patch(model, backend="torch")
    ours = forward(model, {**inputs, "joint_attention_kwargs": {"attention_mask": mask}})
    assert len(own) == NUM_BLOCKS and all(c[2] is mask for c in spy.calls[NUM_BLOCKS:])
    assert len(spy.calls) == 2 * NUM_BLOCKS
    assert not torch.allclose(masked_truth, truth), "the mask should change the output"
    torch.testing.assert_close(ours, masked_truth, rtol=FP32_RTOL, atol=FP32_ATOL)


# ----------------------------------------------------------------------------------------- LoRA, fused QKV


def _lora(model):
    from peft import LoraConfig

    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "proj_mlp", "proj_out", "linear", "ff.net.2"]  # fmt: skip
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))


def _fused_qkv(model):
    """diffusers' fused projections, perturbed so that output differs unless ``to_qkv``/``to_added_qkv`` are used."""
    model.fuse_qkv_projections()
    with torch.no_grad():
        for m in model.modules():
            for name in ("to_qkv", "to_added_qkv"):
                if hasattr(m, name):
                    getattr(m, name).weight.mul_(1.5)


@pytest.mark.parametrize("prepare", [_lora, _fused_qkv], ids=["lora", "fused-qkv"])
def test_lora_and_fused_projections(prepare):
    """peft LoRA on every Linear (random B) and diffusers' fused QKV projections run through the patched
    path (it calls the model's own modules): patched fp32 equals eager fp32 of the modified model."""
    assert_modified_patched_matches(tiny_flux, prepare, flux_inputs(torch.float32))


@pytest.mark.gpu
def test_gpu_bf16_parity_with_gelu_in_the_gemm_epilogue(monkeypatch):
    """On CUDA each double block's FeedForward and each single block's proj_mlp + act_mlp run as one
    torch._addmm_activation (cuBLASLt GELU epilogue: shared.linear_gelu_tanh), the single blocks' proj_out as
    two accumulating GEMMs; default backends (Triton kernels): within the eager bf16 bound."""
    from tolerances import assert_within_eager_bound

    epilogues = []
    real = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **kw: epilogues.append(1) or real(*a, **kw))
    model = tiny_flux().cuda()
    truth = forward(model, {k: v.cuda() for k, v in flux_inputs(torch.float32).items()})
    model = model.to(torch.bfloat16)
    inputs = {k: v.cuda() for k, v in flux_inputs(torch.bfloat16).items()}
    eager = forward(model, inputs)
    dit_kernels.patch(model)
    ours = forward(model, inputs)
    blocks = 2 * len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert len(epilogues) == blocks, "image and text FeedForward of each double block, proj_mlp of each single block"
    assert_within_eager_bound(ours, eager, truth, what="flux cuda bf16")
