"""End to end: whole diffusers pipelines (tiny components, tests/tiny_pipelines.py) give the same images
after ``dit_kernels.patch`` as eager diffusers, and exactly eager's images again after ``unpatch``.

Each case runs a pipeline for 2 steps from fixed latents (drawn in fp32 and cast, since ``torch.randn``
in bf16 does not draw the fp32 numbers rounded) and a fixed generator: eager, patched, unpatched.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

import dit_kernels
from dit_kernels.models import FAMILY_MODULES
import tiny_pipelines
from patch_parity import FP32_RTOL
from tolerances import assert_within_eager_bound

# diffusers' DPMSolver builds its sigmas with np.array(tensor), which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

FAMILY_OF = {"dit": "dit", "pixart": "pixart", "sd3": "sd3", "sd35": "sd3", "flux": "flux", "hunyuan": "hunyuan"}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    pipeline: str  # a tiny_pipelines.FAMILIES entry
    call: dict  # keyword arguments of the pipeline call
    latents: tuple | None = None  # shape of the initial latents (None: DiTPipeline draws its own)

    def __str__(self) -> str:
        return self.name


PIXART = dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=8, output_type="latent")
HUNYUAN = dict(use_resolution_binning=False, output_type="latent")
CASES = {
    case.name: case
    for case in (
        # DiT's guidance doubles the batch of 2 class labels to 4; its pipeline always decodes.
        Case("dit_cfg", "dit", dict(class_labels=[3, 7], guidance_scale=4.0, output_type="np")),
        Case("pixart", "pixart", dict(prompt="a photo of a cat", guidance_scale=1.0, height=16, width=16, **PIXART),
             latents=(1, 4, 8, 8)),
        Case("pixart_cfg", "pixart", dict(prompt="a photo of a cat", negative_prompt="blue dog", guidance_scale=4.5,
                                          height=16, width=24, **PIXART), latents=(1, 4, 8, 12)),
        Case("sd3_cfg", "sd3", dict(prompt="an astronaut riding a horse", negative_prompt="red", guidance_scale=5.0,
                                    height=16, width=24, max_sequence_length=8, output_type="latent"),
             latents=(1, 4, 8, 12)),
        Case("sd35", "sd35", dict(prompt="an astronaut riding a horse", guidance_scale=1.0, height=24, width=16,
                                  max_sequence_length=8, output_type="latent"), latents=(1, 4, 12, 8)),
        # Two prompts, packed latents [B, (h/2)(w/2), 4 * 4], decoded to images.
        Case("flux", "flux", dict(prompt=["a cat on the moon", "a red horse"], guidance_scale=3.5, height=16, width=24,
                                  max_sequence_length=8, output_type="np"), latents=(2, 24, 16)),
        Case("hunyuan", "hunyuan", dict(prompt="a small red dog", guidance_scale=1.0, height=64, width=64, **HUNYUAN),
             latents=(1, 4, 8, 8)),
        Case("hunyuan_cfg", "hunyuan", dict(prompt="a small red dog", negative_prompt="moon", guidance_scale=5.0,
                                            height=64, width=96, **HUNYUAN), latents=(1, 4, 8, 12)),
    )
}  # fmt: skip
BF16_CASES = ("dit_cfg", "pixart_cfg", "sd3_cfg", "sd35", "flux", "hunyuan_cfg")
TRITON_CASES = ("dit_cfg", "pixart_cfg", "sd3_cfg", "flux", "hunyuan_cfg")  # the interpreter is slow: one step each


def _has_patcher(name: str) -> bool:
    return FAMILY_OF[CASES[name].pipeline] in FAMILY_MODULES


# Patched runs only for families with a patcher; the others' eager pipelines are still built and checked.
PATCHED_CASES = [name for name in CASES if _has_patcher(name)]
BF16_CASES = tuple(filter(_has_patcher, BF16_CASES))
TRITON_CASES = tuple(filter(_has_patcher, TRITON_CASES))


def run(case: Case, dtype: torch.dtype = torch.float32, steps: int = 2) -> torch.Tensor:
    """The case's pipeline output (latents or images) as an fp32 tensor."""
    pipe = tiny_pipelines.build(case.pipeline, dtype)
    kwargs = dict(case.call, num_inference_steps=steps)
    if case.latents is not None:
        kwargs["latents"] = torch.randn(case.latents, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0), return_dict=False)[0]
    return torch.as_tensor(out).float()


@contextlib.contextmanager
def patched(case: Case, dtype: torch.dtype, backend: str):
    """Patch the cached pipeline for the block's duration; always unpatched after, so a failure cannot leave
    a patched pipeline in the cache for the next test."""
    pipe = tiny_pipelines.build(case.pipeline, dtype)
    report = dit_kernels.patch(pipe, backend=backend)
    try:
        assert report.family == FAMILY_OF[case.pipeline], report
        assert report.replaced, f"{case}: patch replaced nothing"
        yield report
    finally:
        dit_kernels.unpatch(pipe)


def assert_fp32_close(ours: torch.Tensor, eager: torch.Tensor, what: str) -> None:
    """Patched fp32 computes eager's math with a different fp32 rounding (fused ops reduce in another
    order). Eager fp32 itself is within 1.6e-6 of the output's scale from an fp64 run of the same cases,
    and a second rounding of the same math is within about twice that of eager; FP32_RTOL = 2e-5 of the
    scale (the largest |value|: schedulers amplify the model output by up to 1/sqrt(alphā)) leaves ~6x."""
    error = (ours.double() - eager.double()).abs().max().item()
    scale = eager.abs().max().item()
    assert error <= FP32_RTOL * scale, f"{what}: max |patched - eager| {error:.3g} > {FP32_RTOL} x scale {scale:.3g}"


@pytest.fixture(autouse=True, scope="module")
def quiet_diffusers():
    """Silence diffusers' notices that are expected here (casting whole pipelines to bf16), for this module."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)


@pytest.mark.parametrize("case", CASES.values(), ids=str)
def test_eager_pipeline_is_deterministic(case):
    """The ground the other tests stand on: the tiny pipeline runs, gives finite, non-constant output of the
    expected batch, and the same output twice (fixed latents and generator)."""
    first = run(case)
    assert torch.isfinite(first).all() and first.std() > 0, f"{case}: degenerate output"
    batch = len(case.call["class_labels"]) if case.latents is None else case.latents[0]
    assert first.shape[0] == batch, f"{case}: output shape {tuple(first.shape)}"
    assert torch.equal(run(case), first), f"{case}: two eager runs differ"


@pytest.mark.parametrize("name", PATCHED_CASES)
def test_patched_pipeline_fp32_torch(name):
    case = CASES[name]
    eager = run(case)
    with patched(case, torch.float32, "torch"):
        ours = run(case)
    assert torch.isfinite(ours).all(), f"{case}: non-finite patched output"
    assert_fp32_close(ours, eager, f"{case} fp32 torch")
    assert torch.equal(run(case), eager), f"{case}: unpatch did not restore eager output bit for bit"


@pytest.mark.parametrize("name", BF16_CASES)
def test_patched_pipeline_bf16_torch(name):
    """bf16 (every component, text encoders included) against the fp32 eager truth: the patched pipeline may
    err at most 2x what eager bf16 errs (tolerances.assert_within_eager_bound)."""
    case = CASES[name]
    truth = run(case, torch.float32)
    eager = run(case, torch.bfloat16)
    with patched(case, torch.bfloat16, "torch"):
        ours = run(case, torch.bfloat16)
    assert torch.isfinite(ours).all(), f"{case}: non-finite patched output"
    assert_within_eager_bound(ours, eager, truth, factor=2.0, what=f"{case} bf16 torch")
    assert torch.equal(run(case, torch.bfloat16), eager), f"{case}: unpatch did not restore eager bf16 output"


@pytest.mark.parametrize("name", TRITON_CASES)
def test_patched_pipeline_fp32_triton(name):
    """The Triton kernels (in the interpreter on CPU) inside a whole pipeline, one step."""
    case = CASES[name]
    eager = run(case, steps=1)
    with patched(case, torch.float32, "triton"):
        ours = run(case, steps=1)
    assert_fp32_close(ours, eager, f"{case} fp32 triton")
    assert torch.equal(run(case, steps=1), eager), f"{case}: unpatch did not restore eager output bit for bit"
