"""The family registry (dit_kernels.models) and what every family honours through it: one ``Family`` per
module, exact class matching, every example config building and running; ``patch(kernels={...})`` per-op
switches (an op switched off runs diffusers' computation: never launched, output still at parity);
compatibility with diffusers' own model machinery: IP-adapter loading into a patched FLUX (processors
rebuilt as ``type(processor)()``), ``_keep_in_fp32_modules`` dtype mixes, HunyuanDiT's 1-row RoPE tables."""

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel, HunyuanDiT2DModel

import dit_kernels
from dit_kernels.bench import zoo
from dit_kernels.bench.launches import LaunchTracer
from dit_kernels.models import FAMILY_MODULES, families, family_named, family_of, flux, hunyuan, sd3, shared
from dit_kernels.patching import OPS
from patch_parity import FP32_ATOL, FP32_RTOL, assert_unchanged, forward, snapshot
from tolerances import assert_within_eager_bound

# The fused op family each switch governs, as its custom ops are named (dit_kernels.ops.dispatch).
OP_PREFIX = {"norm": "norm_modulate", "rope": "qk_norm_rope", "attention": "joint_attention"}


def tiny(family: str) -> tuple[torch.nn.Module, dict]:
    """The family's seeded tiny model and inputs of 2 samples (8 x 8 latent, 5 text tokens)."""
    torch.manual_seed(0)
    model = family_named(family).build("tiny")
    return model, zoo.transformer_inputs(family, model, zoo.Shape(2, 8, 8, 5), torch.float32, seed=1)


def launched(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, set[str]]:
    """The model's output and which fused op families it launched."""
    with LaunchTracer() as tracer:
        out = forward(model, inputs)
    return out, {op for op, prefix in OP_PREFIX.items() if any(x.name.startswith(prefix) for x in tracer.launches)}


# ----------------------------------------------------------------------------------------- registry


def test_each_module_exports_one_family_named_after_it():
    assert [family.name for family in families()] == list(FAMILY_MODULES)
    classes = [cls for family in families() for cls in family.classes]
    assert len(classes) == len(set(classes)), "a class belongs to one family"
    with pytest.raises(ValueError, match="unknown model family 'sana'.*'flux'"):
        family_named("sana")


def test_classes_match_exactly_not_by_subclass():
    class Subclassed(FluxTransformer2DModel):
        pass

    model = family_named("flux").build("tiny")
    assert family_of(model) is flux.FAMILY
    model.__class__ = Subclassed
    assert family_of(model) is None


@pytest.mark.parametrize("family", FAMILY_MODULES)
def test_tiny_config_builds_and_its_inputs_run(family):
    """The registry's tiny config with its input builder runs eagerly and patched; small and real are the
    same class at other widths (checked shape-only, on the meta device)."""
    model, inputs = tiny(family)
    spec = family_named(family)
    assert type(model) in spec.classes and spec.traffic_depth.keys() <= spec.configs["real"].keys()
    dit_kernels.patch(model, backend="torch")
    assert torch.isfinite(forward(model, inputs)).all()
    with torch.device("meta"):
        assert type(spec.build("small")) is type(spec.build("real", **spec.traffic_depth)) is type(model)


# ----------------------------------------------------------------------------------------- per-op switches


@pytest.mark.parametrize("off", OPS)
@pytest.mark.parametrize("family", FAMILY_MODULES)
def test_each_op_switch_runs_diffusers_computation_for_that_op(family, off):
    """With one op off: the report says so, that op is never launched, the others launch as with every op
    on, and the output stays at fp32 parity with eager."""
    model, inputs = tiny(family)
    eager = forward(model, inputs)
    report = dit_kernels.patch(model, backend="torch")
    _, all_on = launched(model, inputs)
    dit_kernels.unpatch(model)
    report = dit_kernels.patch(model, backend="torch", kernels={off: False})
    assert report.backends[off].startswith("off") and all(not report.backends[op].startswith("off")
                                                          for op in OPS if op != off)  # fmt: skip
    ours, ran = launched(model, inputs)
    assert ran == all_on - {off}, (all_on, ran)
    torch.testing.assert_close(ours, eager, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_all_switches_off_is_kernels_false():
    model, inputs = tiny("flux")
    eager = forward(model, inputs)
    report = dit_kernels.patch(model, backend="torch", kernels=dict.fromkeys(OPS, False))
    assert report.replaced == [] and all(why.startswith("off") for why in report.backends.values())
    ours, ran = launched(model, inputs)
    assert ran == set() and torch.equal(ours, eager)


@pytest.mark.parametrize("kernels, message", [({"norms": False}, r"unknown op\(s\) 'norms'"),
                                              ({"rope": "no"}, r"must be True or False.*'rope': 'no'"),
                                              ("all", "kernels must be True, False or a dict")])  # fmt: skip
def test_bad_switches_refused_and_unchanged(kernels, message):
    model, _ = tiny("flux")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        dit_kernels.patch(model, kernels=kernels)
    assert not dit_kernels.is_patched(model)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------- diffusers compat


def ip_adapter_state_dict(model: FluxTransformer2DModel, image_embed_dim: int = 12) -> dict:
    """An IP-adapter checkpoint's layout for ``model`` (random values): the image projection (4 tokens) and
    per double block the image key/value projections, as ``FluxTransformer2DLoadersMixin`` reads them."""
    generator = torch.Generator().manual_seed(3)
    width, hidden = model.config.joint_attention_dim, model.inner_dim

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    image_proj = {"proj.weight": rand(4 * width, image_embed_dim), "proj.bias": rand(4 * width),
                  "norm.weight": 1 + rand(width), "norm.bias": rand(width)}  # fmt: skip
    ip_adapter = {f"{i}.to_{kv}_ip.{p}": rand(hidden, width) if p == "weight" else rand(hidden)
                  for i in range(len(model.transformer_blocks)) for kv in "kv" for p in ("weight", "bias")}  # fmt: skip
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def test_ip_adapter_loads_into_a_patched_flux():
    """diffusers' IP-adapter loading rebuilds every single block's processor as ``type(processor)()`` and
    gives double blocks its FluxIPAdapterAttnProcessor (three outputs): the patched model then matches the
    eager model with the same adapter."""
    model, inputs = tiny("flux")
    eager = copy.deepcopy(model)
    dit_kernels.patch(model, backend="torch")
    for m in (eager, model):
        m._load_ip_adapter_weights(ip_adapter_state_dict(m), low_cpu_mem_usage=False)
    singles = {type(block.attn.processor) for block in model.single_transformer_blocks}
    assert singles == {flux.FluxFusedAttnProcessor}
    embeds = torch.randn(2, 1, 12, generator=torch.Generator().manual_seed(5))
    outputs = [forward(m, {**inputs, "joint_attention_kwargs": {"ip_adapter_image_embeds": [embeds]}})
               for m in (eager, model)]  # fmt: skip
    torch.testing.assert_close(outputs[1], outputs[0], rtol=FP32_RTOL, atol=FP32_ATOL)


@pytest.mark.parametrize("processor_cls", [flux.FluxFusedAttnProcessor, shared.FusedAttnProcessor,
                                           sd3.SD3FusedAttnProcessor])  # fmt: skip
def test_every_fused_processor_is_constructible_with_no_arguments(processor_cls):
    """``type(processor)()`` (diffusers' rebuild) gives a working processor: each op's default backend."""
    family = {flux.FluxFusedAttnProcessor: "flux", shared.FusedAttnProcessor: "hunyuan"}.get(processor_cls, "sd3")
    model, inputs = tiny(family)
    eager = forward(model, inputs)
    for attention in [m for m in model.modules() if hasattr(m, "processor")]:
        attention.set_processor(processor_cls())
    torch.testing.assert_close(forward(model, inputs), eager, rtol=FP32_RTOL, atol=FP32_ATOL)


def cast_like_diffusers_loading(model: torch.nn.Module, dtype: torch.dtype, keep: list[str]) -> None:
    """What ``from_pretrained(torch_dtype=dtype)`` does with ``_keep_in_fp32_modules = keep``: a parameter whose
    name has a component in ``keep`` stays fp32, every other one is cast (``load_model_dict_into_meta``)."""
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)


def test_keep_in_fp32_norms_accepted_where_the_fused_ops_compute_in_fp32(monkeypatch):
    """HunyuanDiT loaded in bf16 with its FP32LayerNorms norm2 / norm3 kept in fp32: the fused ops read the
    fp32 weights and compute in fp32; the output stays within the eager bf16 bound of the fp32 truth."""
    keep = ["norm2", "norm3"]
    monkeypatch.setattr(HunyuanDiT2DModel, "_keep_in_fp32_modules", keep)
    model, inputs = tiny("hunyuan")
    truth = forward(model, inputs)
    cast_like_diffusers_loading(model, torch.bfloat16, keep)
    inputs = zoo.transformer_inputs("hunyuan", model, zoo.Shape(2, 8, 8, 5), torch.bfloat16, seed=1)
    eager = forward(model, inputs)
    report = dit_kernels.patch(model, backend="torch")
    assert report.dtype == "bfloat16"
    assert_within_eager_bound(forward(model, inputs), eager, truth, factor=2.0, what="hunyuan keep-in-fp32 norms")


def test_keep_in_fp32_modules_the_fused_path_does_not_read_in_fp32_refused_by_name(monkeypatch):
    """``norm1`` of HunyuanDiT holds the shift Linear: kept in fp32 it is refused, naming it, and nothing changes."""
    monkeypatch.setattr(HunyuanDiT2DModel, "_keep_in_fp32_modules", ["norm1"])
    model, _ = tiny("hunyuan")
    cast_like_diffusers_loading(model, torch.bfloat16, ["norm1"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.norm1\.linear \(Linear\) is kept in float32"):
        dit_kernels.patch(model)
    assert_unchanged(model, before)


def test_hunyuan_one_row_rope_tables_broadcast_as_in_diffusers():
    """A RoPE table of one row (cos/sin [1, Dh]) is broadcast over the sequence by diffusers'
    ``apply_rotary_emb``; the patched model does the same."""
    model, inputs = tiny("hunyuan")
    cos, sin = inputs["image_rotary_emb"]
    inputs["image_rotary_emb"] = (cos[3:4].clone(), sin[3:4].clone())
    eager = forward(model, inputs)
    dit_kernels.patch(model, backend="torch")
    torch.testing.assert_close(forward(model, inputs), eager, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert hunyuan.FAMILY is family_of(model)
