"""SD3 / SD3.5 patcher (dit_kernels.models.sd3): whole-model parity of SD3 (a normal block + the
context_pre_only last block) and SD3.5 (qk RMSNorm, dual-attention blocks), non-square latents, batch 1 and
2, every dtype, torch and triton backends; silu(temb) once per call; the projections written straight into
the joint buffers; the FeedForward's GELU in the GEMM epilogue (CUDA only); chunked feed-forward; refusals that change nothing (fused QKV included); the report;
LoRA; torch.compile."""

import inspect

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode

import dit_kernels
from dit_kernels.bench import zoo
from dit_kernels.models import sd3, shared
from dit_kernels.patching import OpBackends
from patch_parity import FP32_ATOL, FP32_RTOL, PRECISION_CASES, assert_compiled_matches, assert_patched_parity
from patch_parity import assert_refused_unchanged, forward
from patch_parity import assert_unpatch_restores, attention_processors
from patch_parity import assert_modified_patched_matches
from tolerances import assert_within_eager_bound

TEXT_LEN = 7
LATENT = (8, 12)  # latent pixels (height, width): 4 x 6 patches of 2 x 2, a non-square image
VARIANTS = {"sd3": {}, "sd35": dict(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0, 1))}


def tiny_sd3(variant: str = "sd3", **overrides) -> SD3Transformer2DModel:
    """The registry's tiny SD3 (2 blocks: a normal one, then the context_pre_only one) or SD3.5 (3 blocks,
    qk RMSNorm, dual attention in blocks 0 and 1), seeded."""
    torch.manual_seed(0)
    return zoo.build("sd3", "tiny", **{**VARIANTS[variant], **overrides})


def sd3_inputs(dtype: torch.dtype, batch: int = 2) -> dict:
    """Seeded inputs; per-sample timesteps differ (CFG-style batches modulate per sample). The timestep
    stays fp32, as the pipeline passes the scheduler's."""
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(batch, 4, *LATENT, generator=generator).to(dtype),
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 32, generator=generator).to(dtype),
        "pooled_projections": torch.randn(batch, 24, generator=generator).to(dtype),
        "timestep": torch.tensor([900.0, 350.0])[:batch],
    }
    return inputs


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype, backend", PRECISION_CASES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patched_parity(variant, batch, dtype, backend):
    report = assert_patched_parity(
        lambda: tiny_sd3(variant),
        lambda d: sd3_inputs(d, batch),
        dtype=dtype,
        backend=backend,
        what=f"{variant} B={batch} {dtype} {backend}",
    )
    assert report.family == "sd3" and not report.fallbacks


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_report_lists_every_replacement_and_unpatch_restores_processors(variant):
    model = tiny_sd3(variant)
    processors = attention_processors(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = dit_kernels.patch(model, backend="torch")
    normal = "layernorm_modulate x2, gated_residual_layernorm_modulate x2, gated_residual x2"
    dual = "layernorm_modulate x3, gated_residual_layernorm_modulate x2, gated_residual x3"
    last = "layernorm_modulate x2, gated_residual_layernorm_modulate, gated_residual"
    blocks = {"sd3": [(normal, ["attn"]), (last, ["attn"])],
              "sd35": [(dual, ["attn", "attn2"])] * 2 + [(last, ["attn"])]}[variant]  # fmt: skip
    expected = ["time_text_embed.forward: silu(temb) once per call"]
    for i, (fused, attentions) in enumerate(blocks):
        expected.append(f"transformer_blocks.{i}.forward: {fused}")
        expected += [f"transformer_blocks.{i}.{attn}.processor: SD3FusedAttnProcessor" for attn in attentions]
    assert report.replaced == expected
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "patch changed the state dict"
    assert_unpatch_restores(model, processors, sd3.SD3FusedAttnProcessor)


class _SiluCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket.__name__ == "silu"
        return func(*args, **(kwargs or {}))


def _silu_launches(model, inputs) -> int:
    with _SiluCounter() as counter:
        forward(model, inputs)
    return counter.calls


def test_silu_of_temb_once_per_call_and_blocks_called_alone():
    """Eager applies SiLU to temb in both AdaLNs of every block; patched, once per transformer call. A block
    called on its own with another temb computes its SiLU itself (and still matches eager)."""
    model = tiny_sd3("sd35")
    inputs = sd3_inputs(torch.float32)
    eager_silus = _silu_launches(model, inputs)
    dit_kernels.patch(model, backend="torch")
    assert _silu_launches(model, inputs) == eager_silus - 2 * len(model.transformer_blocks) + 1
    block, dim = model.transformer_blocks[0], model.inner_dim
    generator = torch.Generator().manual_seed(2)
    args = {"hidden_states": torch.randn(2, 24, dim, generator=generator),
            "encoder_hidden_states": torch.randn(2, TEXT_LEN, dim, generator=generator),
            "temb": torch.randn(2, dim, generator=generator)}  # fmt: skip
    with torch.no_grad():
        ours = block(**args)
        dit_kernels.unpatch(model)
        eager = block(**args)
    for o, e in zip(ours, eager):
        torch.testing.assert_close(o, e, rtol=FP32_RTOL, atol=FP32_ATOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_projections_write_into_the_joint_buffers_unless_they_cannot(monkeypatch, variant):
    """SD3 (no q/k norm, plain Linears): the joint attention's GEMMs write straight into the joint buffers.
    SD3.5 (q/k RMSNorm) and a peft LoRA layer on a projection: qk_norm_rope fills them from the outputs."""
    direct = []
    real = sd3._projected_joint_buffers
    monkeypatch.setattr(sd3, "_projected_joint_buffers", lambda *a: direct.append(1) or real(*a))
    model = tiny_sd3(variant)
    dit_kernels.patch(model, backend="torch")
    forward(model, sd3_inputs(torch.float32))
    assert len(direct) == (len(model.transformer_blocks) if variant == "sd3" else 0)
    dit_kernels.unpatch(model)
    _lora(model, ["add_k_proj"])
    dit_kernels.patch(model, backend="torch")
    forward(model, sd3_inputs(torch.float32))
    assert len(direct) == (len(model.transformer_blocks) if variant == "sd3" else 0), "LoRA layer written around"


def test_batch_2_projections_write_each_sample_rows_without_a_bias_copy():
    """At batch 2 a stream's rows of a joint buffer are one contiguous block per sample: one addmm per sample
    writes there (bias in the epilogue on CUDA), no baddbmm (which copies the bias into the output first) and
    no copy; ``project`` reads such row blocks in place the same way."""
    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:  # views launch nothing
                self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    linear, linear_out, x = torch.nn.Linear(8, 6), torch.nn.Linear(6, 3), torch.randn(2, 5, 8)
    buffer = torch.full((2, 9, 6), float("nan"))
    with torch.no_grad(), Ops() as ops:
        shared.linear_into(linear, x, buffer[:, 4:])
        projected = shared.project(linear_out, buffer[:, 4:])
    assert [name for name in ops.names if name not in ("empty", "new_empty")] == ["addmm"] * 4, ops.names
    torch.testing.assert_close(buffer[:, 4:], linear(x), rtol=FP32_RTOL, atol=FP32_ATOL)
    assert buffer[:, :4].isnan().all()
    torch.testing.assert_close(projected, linear_out(linear(x)), rtol=FP32_RTOL, atol=FP32_ATOL)


def test_chunked_feed_forward_is_reproduced():
    """After enable_forward_chunking (batch-wise chunks of 1) the patched blocks call each FeedForward once
    per sample, as diffusers does, and match eager."""
    model = tiny_sd3("sd3")
    model.enable_forward_chunking(chunk_size=1, dim=0)
    inputs = sd3_inputs(torch.float32)
    truth = forward(model, inputs)
    calls = []
    for block in model.transformer_blocks:
        for ff in (block.ff, block.ff_context):
            if ff is not None:
                ff.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    dit_kernels.patch(model, backend="torch")
    torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert calls == [1] * 2 * 3, "3 FeedForwards (2 in the normal block, 1 in the last) x 2 samples"


def test_gelu_goes_into_the_gemm_epilogue_only_where_that_is_tanh_gelu():
    """torch._addmm_activation's GELU is the tanh approximation on CUDA and the exact erf GELU on CPU: by
    default only CUDA tensors take the epilogue (the meta device is no exception); ``gelu_epilogue=True``
    asks for it anywhere (the traffic model's walk of the GPU path); a LoRA layer on the projection or
    autograd keep the module call."""
    model = tiny_sd3("sd3")
    ff = model.transformer_blocks[0].ff
    x = torch.empty(1, 3, model.inner_dim)
    forced = OpBackends(gelu_epilogue=True)
    with torch.no_grad():
        assert shared.gelu_fits_epilogue(ff, x.to("meta"), forced) and shared.gelu_fits_epilogue(ff, x, forced)
        assert not shared.gelu_fits_epilogue(ff, x, OpBackends())
        assert not shared.gelu_fits_epilogue(ff, x.to("meta"), OpBackends())
    assert not shared.gelu_fits_epilogue(ff, x.to("meta"), forced)
    _lora(model, ["ff.net.0.proj"])
    with torch.no_grad():
        assert not shared.gelu_fits_epilogue(ff, x.to("meta"), forced)


# ----------------------------------------------------------------------------------------- refusals


class CustomProcessor(JointAttnProcessor2_0):
    """A user's processor: a subclass, so only an exact type check catches it."""


def _custom_processor(model):
    model.transformer_blocks[1].attn.set_processor(CustomProcessor())


def _fused_qkv(model):
    model.fuse_qkv_projections()


def _rms_norm2(model):
    model.transformer_blocks[0].norm2_context = torch.nn.RMSNorm(model.inner_dim)


def _layer_norm_qk(model):
    """SD3.5's attn2 with a LayerNorm for k but RMSNorm for q: qk_norm_rope takes one kind for both."""
    model.transformer_blocks[1].attn2.norm_k = torch.nn.LayerNorm(8)


def _hooked_block(model):
    HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0]).register_hook(ModelHook(), "spy")


def _hooked_embedding(model):
    HookRegistry.check_if_exists_or_initialize(model.time_text_embed).register_hook(ModelHook(), "spy")


@pytest.mark.parametrize(
    "variant, mutate, message",
    [
        ("sd3", _custom_processor, r"transformer_blocks\.1\.attn\.processor is .*CustomProcessor, expected .*\.JointAt"),
        ("sd3", _fused_qkv, r"transformer_blocks\.0\.attn uses fused QKV projections .*unfuse_qkv_projections\(\)"),
        ("sd3", _rms_norm2, r"transformer_blocks\.0\.norm2_context is torch\.nn\..*RMSNorm, expected .*LayerNorm"),
        ("sd35", _layer_norm_qk, r"transformer_blocks\.1\.attn2\.norm_q/norm_k: q and k norms differ"),
        ("sd3", _hooked_block, r"transformer_blocks\.0\.forward is already wrapped"),
        ("sd3", _hooked_embedding, r"time_text_embed\.forward is already wrapped"),
    ],
    ids=["custom-processor", "fused-qkv", "rms-norm", "qk-norm", "hooked-block", "hooked-embedding"],
)
def test_unrecognised_model_refused_and_unchanged(variant, mutate, message):
    model = tiny_sd3(variant)
    mutate(model)
    assert_refused_unchanged(model, message)


def test_processor_names_every_kwarg_of_diffusers_processor():
    theirs = inspect.signature(JointAttnProcessor2_0.__call__).parameters
    ours = inspect.signature(sd3.SD3FusedAttnProcessor.__call__).parameters
    assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in theirs.values()]


# ----------------------------------------------------------------------------------------- LoRA, compile


def _lora(model, targets):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_before_patch_matches_eager(variant):
    """peft LoRA (random B) on every Linear the patched path calls: patched fp32 equals eager fp32 of the
    adapted model."""
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2"]  # fmt: skip
    assert_modified_patched_matches(lambda: tiny_sd3(variant), lambda model: _lora(model, targets),
                                    sd3_inputs(torch.float32))  # fmt: skip


@pytest.mark.slow  # torch.compile: the representative one is DiT's (tests/test_model_dit.py)
def test_patched_model_under_torch_compile_matches_eager():
    model = tiny_sd3("sd35")
    inputs = sd3_inputs(torch.float32)
    assert_compiled_matches(model, inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_bf16_parity_with_gelu_in_the_gemm_epilogue(monkeypatch, variant):
    """On CUDA each FeedForward's proj + tanh-GELU is one torch._addmm_activation (cuBLASLt GELU epilogue);
    default backends (Triton kernels): within the eager bf16 bound of the fp32 truth."""
    epilogues = []
    real = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **kw: epilogues.append(1) or real(*a, **kw))
    model = tiny_sd3(variant).cuda()
    truth = forward(model, {k: v.cuda() for k, v in sd3_inputs(torch.float32).items()})
    model = model.to(torch.bfloat16)
    inputs = {k: v.cuda() for k, v in sd3_inputs(torch.bfloat16).items()}
    eager = forward(model, inputs)
    dit_kernels.patch(model)
    ours = forward(model, inputs)
    assert len(epilogues) == 2 * len(model.transformer_blocks) - 1  # the last block has no text FeedForward
    assert_within_eager_bound(ours, eager, truth, what=f"{variant} cuda bf16")
