"""Whole-transformer parity of a patched model against eager diffusers, shared by the per-family tests.

The truth is the eager model in fp32. In fp32 the patched model must agree with it to fp32 reordering
noise (the fused ops compute in fp32 and differ only in reduction order: ``FP32_RTOL``/``FP32_ATOL``); in
fp16/bf16 it may err at most ``factor`` x what eager diffusers errs in the same dtype, plus a small floor
(``tolerances.assert_within_eager_bound``, the flash-attention rule). After ``unpatch`` the model must give
eager's output bit for bit.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch

import dit_kernels
from tolerances import assert_within_eager_bound



def _precision_case(dtype: torch.dtype, backend: str, slow: bool = False):
    return pytest.param(dtype, backend, id=f"{str(dtype).removeprefix('torch.')}-{backend}",
                        marks=[pytest.mark.slow] if slow else [])  # fmt: skip


# A family's parity matrix, (dtype, backend): the default run keeps one pair per dtype with both backends
# present (fp32 on the reference ops: the spec; bf16 through the Triton kernels; fp16 on the reference
# ops); the other three pairs are in the slow set (`pytest -m slow`, CI's second step).
PRECISION_CASES = [
    _precision_case(torch.float32, "torch"),
    _precision_case(torch.bfloat16, "triton"),
    _precision_case(torch.float16, "torch"),
    _precision_case(torch.float32, "triton", slow=True),
    _precision_case(torch.bfloat16, "torch", slow=True),
    _precision_case(torch.float16, "triton", slow=True),
]

# Several blocks of fp32 math whose reductions the fused kernels order differently from aten: relative
# error grows ~sqrt(n) ulps per reduction, a few reductions deep; 2e-5 relative leaves room for 150 ulps.
FP32_RTOL, FP32_ATOL = 2e-5, 2e-6


def forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out.float()


def assert_patched_parity(
    build: Callable[[], torch.nn.Module],
    make_inputs: Callable[[torch.dtype], dict],
    *,
    dtype: torch.dtype,
    backend: str,
    factor: float = 2.0,
    what: str = "",
) -> dit_kernels.PatchReport:
    """Build the model in fp32 (seeded), compare patched ``dtype`` output against the fp32 eager truth,
    then check ``unpatch`` restores eager ``dtype`` output exactly. Returns the patch report."""
    torch.manual_seed(0)
    reference = build().eval()
    truth = forward(reference, make_inputs(torch.float32))
    model = copy.deepcopy(reference).to(dtype)
    inputs = make_inputs(dtype)
    eager = forward(model, inputs)
    report = dit_kernels.patch(model, backend=backend)
    assert report.replaced, f"{what}: patch replaced nothing"
    ours = forward(model, inputs)
    assert torch.isfinite(ours).all(), f"{what}: non-finite patched output"
    if dtype == torch.float32:
        torch.testing.assert_close(ours, truth, rtol=FP32_RTOL, atol=FP32_ATOL, msg=lambda m: f"{what}: {m}")
    else:
        assert_within_eager_bound(ours, eager, truth, factor=factor, what=what)
    dit_kernels.unpatch(model)
    assert torch.equal(forward(model, inputs), eager), f"{what}: unpatch did not restore eager output"
    return report


def attention_processors(model: torch.nn.Module) -> dict[str, object]:
    """Every attention module's processor, by module name: what ``unpatch`` must put back."""
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def assert_unpatch_restores(model: torch.nn.Module, processors: dict[str, object], fused: type) -> None:
    """The patched ``model`` runs a ``fused`` processor in every attention of ``processors``
    (``attention_processors`` before ``patch``); ``unpatch`` puts each original back and leaves no instance
    ``forward`` on any module."""
    assert all(type(model.get_submodule(n).processor) is fused for n in processors)
    dit_kernels.unpatch(model)
    assert all(model.get_submodule(n).processor is p for n, p in processors.items())
    assert not any("forward" in vars(m) for m in model.modules())


def inject_lora(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    """peft LoRA (rank 2, random B: it changes the output) on the Linears named by ``targets``, in place (for
    models without diffusers' ``add_adapter``); returns the model."""
    from peft import LoraConfig, inject_adapter_in_model

    return inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False),
                                   model)  # fmt: skip


def assert_modified_patched_matches(build: Callable[[], torch.nn.Module], modify: Callable[[torch.nn.Module], object],
                                    inputs: dict) -> None:  # fmt: skip
    """``modify`` (a LoRA adapter, fused projections, ...) changes the output of a fresh ``build()`` in place;
    patched, the modified model gives its eager fp32 output within fp32 noise (the patched path calls the
    model's own modules)."""
    plain = forward(build(), inputs)
    model = build()
    modify(model)
    truth = forward(model, inputs)
    assert not torch.allclose(truth, plain), "the modification should change the output"
    dit_kernels.patch(model, backend="torch")
    torch.testing.assert_close(forward(model, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)


def snapshot(model: torch.nn.Module) -> tuple:
    """Everything patch may touch: parameters, buffers, module types, instance attributes."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layout = [(name, type(m), dict(vars(m))) for name, m in model.named_modules()]
    return state, layout


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    state, layout = snapshot(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert [(n, t) for n, t, _ in layout] == [(n, t) for n, t, _ in before[1]]
    for (name, _, attrs), (_, _, attrs_before) in zip(layout, before[1]):
        assert attrs.keys() == attrs_before.keys(), f"{name}: instance attributes changed"
        assert all(attrs[k] is attrs_before[k] for k in attrs if k not in ("_parameters", "_buffers")), name


def assert_refused_unchanged(model: torch.nn.Module, message: str, backend: str = "torch") -> None:
    """``patch`` raises ValueError matching ``message`` and leaves ``model`` exactly as it was."""
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        dit_kernels.patch(model, backend=backend)
    assert not dit_kernels.is_patched(model)
    assert_unchanged(model, before)


def assert_compiled_matches(model: torch.nn.Module, inputs: dict) -> None:
    """The model patched with the reference backend, under ``torch.compile``, gives its eager fp32 output."""
    truth = forward(model, inputs)
    dit_kernels.patch(model, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False)
    torch.testing.assert_close(forward(compiled, inputs), truth, rtol=FP32_RTOL, atol=FP32_ATOL)


def assert_fails_as_eager(model: torch.nn.Module, inputs: dict) -> None:
    """Inputs diffusers itself cannot run (a shape its model does not take): the patched model fails with
    diffusers' own error, message for message."""
    with pytest.raises(RuntimeError) as eager:
        forward(model, inputs)
    dit_kernels.patch(model, backend="torch")
    with pytest.raises(RuntimeError) as patched:
        forward(model, inputs)
    assert str(patched.value) == str(eager.value)
