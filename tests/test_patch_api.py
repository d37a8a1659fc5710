"""dit_kernels.patch / unpatch behaviour users rely on: refusals that change nothing, idempotence, exact
unpatch, the report, LoRA before and after patch, torch.compile of a patched model."""

import dataclasses

import pytest
import torch
from diffusers import SanaTransformer2DModel, UNet2DModel

import dit_kernels
from dit_kernels.bench import zoo
from patch_parity import FP32_ATOL, FP32_RTOL, assert_unchanged, forward, snapshot


def tiny_model() -> torch.nn.Module:
    """A supported transformer (tiny FLUX.1-dev, the registry's config), seeded."""
    torch.manual_seed(0)
    return zoo.build("flux", "tiny")


def model_inputs(model: torch.nn.Module, dtype=torch.float32) -> dict:
    return zoo.transformer_inputs("flux", model, zoo.Shape(2, 3, 5, 7), dtype, seed=1)


class NotAPipeline:
    transformer = None


@pytest.mark.parametrize(
    "obj",
    [None, torch.nn.Linear(4, 4), NotAPipeline(), UNet2DModel(block_out_channels=(8,), norm_num_groups=4,
                                                           down_block_types=("DownBlock2D",),
                                                           up_block_types=("UpBlock2D",), sample_size=8),
     SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                            caption_channels=16, sample_size=8)],
    ids=["None", "Linear", "no-transformer", "UNet2DModel", "Sana (no patcher)"],
)  # fmt: skip
def test_unsupported_object_refused_and_unchanged(obj):
    before = snapshot(obj) if isinstance(obj, torch.nn.Module) else None
    with pytest.raises(TypeError, match=r"Supported: (\w+, )*FluxTransformer2DModel"):
        dit_kernels.patch(obj)
    if before is not None:
        assert_unchanged(obj, before)


def test_meta_device_refused():
    with torch.device("meta"):
        model = tiny_model()
    with pytest.raises(ValueError, match="meta device"):
        dit_kernels.patch(model)
    assert not dit_kernels.is_patched(model)


def test_mixed_dtypes_refused_and_unchanged():
    model = tiny_model()
    model.transformer_blocks[1].to(torch.bfloat16)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"mixes parameter dtypes \['bfloat16', 'float32'\]"):
        dit_kernels.patch(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs, error", [({"backend": "fast"}, ValueError), ({"cuda_graphs": "yes"}, ValueError),
                                           ({"backend": "cuda"}, RuntimeError)])
def test_bad_arguments_refused_and_unchanged(kwargs, error):
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(error):
        dit_kernels.patch(model, **kwargs)
    assert_unchanged(model, before)
    assert not dit_kernels.is_patched(model)


def test_failure_half_way_is_undone(monkeypatch):
    """A family patcher that raises after some swaps leaves the model exactly as it was."""
    model = tiny_model()
    before = snapshot(model)
    family = dit_kernels.models.family_of(model)

    def apply_then_fail(transformer, patcher):
        family.apply(transformer, patcher)
        assert patcher.replaced
        raise RuntimeError("boom")

    failing = dataclasses.replace(family, apply=apply_then_fail)
    monkeypatch.setattr(dit_kernels.api, "family_of", lambda transformer: failing)
    with pytest.raises(RuntimeError, match="boom"):
        dit_kernels.patch(model)
    assert_unchanged(model, before)


def test_patch_twice_is_noop_and_unpatch_is_exact():
    model = tiny_model()
    inputs = model_inputs(tiny_model())
    eager = forward(model, inputs)
    before = snapshot(model)
    report = dit_kernels.patch(model)
    patched = snapshot(model)
    assert dit_kernels.patch(model) is report
    assert_unchanged(model, patched)
    dit_kernels.unpatch(model)
    assert_unchanged(model, before)
    assert torch.equal(forward(model, inputs), eager)
    dit_kernels.unpatch(model)  # unpatching an unpatched model is a no-op
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "first, second, named",
    [({}, {"cache": 0.2}, ["cache=CacheConfig(threshold=0.2", "(patched with: None)"]),
     ({"cache": 0.1}, {"cache": 0.2}, ["cache=CacheConfig(threshold=0.2"]),
     ({}, {"backend": "torch"}, ["backend='torch' (patched with: 'auto')"]),
     ({}, {"kernels": {"rope": False}}, ["kernels={'norm': True, 'rope': False, 'attention': True}"]),
     ({}, {"cuda_graphs": False, "backend": "torch"}, ["cuda_graphs=False (patched with: 'auto')", "backend='torch'"])],
    ids=["cache-added", "cache-threshold", "backend", "kernels", "graphs-and-backend"],
)  # fmt: skip
def test_patch_twice_with_other_arguments_is_refused_naming_them(first, second, named):
    model = tiny_model()
    report = dit_kernels.patch(model, **first)
    patched = snapshot(model)
    with pytest.raises(ValueError, match="already patched, with other arguments") as refused:
        dit_kernels.patch(model, **second)
    message = str(refused.value)
    assert all(text in message for text in named) and "unpatch first" in message, message
    assert message.count("patched with:") == len(second), f"only the differing arguments are named: {message}"
    assert_unchanged(model, patched)
    assert dit_kernels.patch_report(model) is report
    dit_kernels.unpatch(model)
    dit_kernels.patch(model, **second)  # after unpatch the new arguments apply
    if "cache" in second:
        assert dit_kernels.cache_stats(model)["calls"] == []


def test_patch_twice_with_equivalent_arguments_is_a_noop():
    """Arguments compare after normalizing: kernels=True is every switch on, a threshold is its CacheConfig."""
    model = tiny_model()
    report = dit_kernels.patch(model, kernels=True, cache=0.1)
    again = dit_kernels.patch(model, kernels={"norm": True}, cache=dit_kernels.CacheConfig(threshold=0.1))
    assert again is report


def test_pipeline_like_object_is_patched_through_its_transformer():
    class Pipe:
        transformer = tiny_model()

    pipe = Pipe()
    report = dit_kernels.patch(pipe)
    assert dit_kernels.is_patched(pipe.transformer) and dit_kernels.patch_report(pipe) is report
    dit_kernels.unpatch(pipe)
    assert not dit_kernels.is_patched(pipe.transformer)


def test_report_names_family_backends_and_replacements():
    model = tiny_model()
    report = dit_kernels.patch(model, backend="torch")
    text = repr(report)
    assert report.family == "flux" and "FluxTransformer2DModel" in text
    assert "transformer_blocks.0" in text and "transformer_blocks.1" in text
    assert all(why for why in report.backends.values())
    assert report.fallbacks == [] and text.splitlines()[-1].split() == ["eager", "fallback", "none"]


def test_cuda_graphs_request_is_reported_not_hidden():
    report = dit_kernels.patch(tiny_model(), cuda_graphs=True)
    assert any("CUDA graphs" in item for item in report.fallbacks)


def test_cache_argument_attaches_a_step_cache():
    """The step cache itself: tests/test_cache.py; here only that patch takes it and reports it."""
    model = tiny_model()
    report = dit_kernels.patch(model, cache=0.1)
    assert report.cache[0].startswith("CacheConfig(threshold=0.1,") and dit_kernels.cache_stats(model)["calls"] == []


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out"],
                             init_lora_weights=False)  # fmt: skip
    torch.manual_seed(5)  # init_lora_weights=False: random nonzero B, so the adapter changes the output
    return peft.inject_adapter_in_model(config, model)


@pytest.mark.parametrize("order", ["lora-then-patch", "patch-then-lora"])
def test_lora_matches_eager(order):
    inputs = model_inputs(tiny_model())
    with_lora = _lora(tiny_model())
    eager = forward(with_lora, inputs)
    assert not torch.allclose(eager, forward(tiny_model(), inputs)), "the adapter must change the output"
    model = tiny_model()
    if order == "lora-then-patch":
        model = _lora(model)
        dit_kernels.patch(model)
    else:
        dit_kernels.patch(model)
        model = _lora(model)
    torch.testing.assert_close(forward(model, inputs), eager, rtol=FP32_RTOL, atol=FP32_ATOL)


@pytest.mark.slow  # torch.compile: the representative one is DiT's (tests/test_model_dit.py)
def test_patched_model_under_torch_compile_matches():
    model = tiny_model()
    inputs = model_inputs(tiny_model())
    dit_kernels.patch(model, backend="torch")
    expected = forward(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    torch.testing.assert_close(forward(compiled, inputs), expected, rtol=FP32_RTOL, atol=FP32_ATOL)
