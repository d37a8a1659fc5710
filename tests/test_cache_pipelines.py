"""Step cache through whole diffusers pipelines (tiny components, tests/tiny_pipelines.py) of every family
with a patcher: each pipeline call is one cache call (``scheduler.set_timesteps`` resets the state and
gives the step count), threshold 0 gives eager's images exactly, and a second call with another seed,
prompt and resolution equals that call on a freshly patched pipeline (nothing leaks between calls)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import dit_kernels
import tiny_pipelines
from test_pipelines import CASES, FAMILY_OF, PIXART, Case, quiet_diffusers  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

STEPS = 8
SKIPPING = dit_kernels.CacheConfig(threshold=1e9, warmup_steps=1, max_consecutive_skips=2, final_steps_computed=1)

# A second call per pipeline: other seed, prompt / class labels, and resolution where the pipeline takes one.
SECOND = {
    "dit_cfg": Case("dit_cfg", "dit", dict(class_labels=[5, 1], guidance_scale=3.0, output_type="np")),
    "pixart_cfg": Case("pixart_cfg", "pixart", dict(prompt="a red horse", negative_prompt="cat", guidance_scale=3.0,
                                                    height=24, width=16, **PIXART), latents=(1, 4, 12, 8)),
    "sd3_cfg": Case("sd3_cfg", "sd3", dict(prompt="a small dog", negative_prompt="moon", guidance_scale=4.0,
                                           height=24, width=24, max_sequence_length=8, output_type="latent"),
                    latents=(1, 4, 12, 12)),
    "sd35": Case("sd35", "sd35", dict(prompt="a blue cat", guidance_scale=1.0, height=16, width=16,
                                      max_sequence_length=8, output_type="latent"), latents=(1, 4, 8, 8)),
    "flux": Case("flux", "flux", dict(prompt=["a dog"], guidance_scale=2.5, height=24, width=16,
                                      max_sequence_length=8, output_type="np"), latents=(1, 24, 16)),
    "hunyuan_cfg": Case("hunyuan_cfg", "hunyuan", dict(prompt="an astronaut", negative_prompt="red", guidance_scale=4.0,
                                                       height=96, width=64, use_resolution_binning=False,
                                                       output_type="latent"), latents=(1, 4, 12, 8)),
}  # fmt: skip
NAMES = [name for name in SECOND if FAMILY_OF[CASES[name].pipeline] in dit_kernels.models.FAMILY_MODULES]


@contextlib.contextmanager
def cached(case: Case, kernels: bool, cache):
    pipe = tiny_pipelines.build(case.pipeline, torch.float32)
    dit_kernels.patch(pipe, kernels=kernels, backend="torch", cache=cache)
    try:
        yield pipe
    finally:
        dit_kernels.unpatch(pipe)


def call(case: Case, seed: int) -> torch.Tensor:
    """``run`` with the latents and the generator drawn from ``seed``."""
    pipe = tiny_pipelines.build(case.pipeline, torch.float32)
    kwargs = dict(case.call, num_inference_steps=STEPS)
    if case.latents is not None:
        kwargs["latents"] = torch.randn(case.latents, generator=torch.Generator().manual_seed(seed))
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed), return_dict=False)[0]
    return torch.as_tensor(out).float()


@pytest.mark.parametrize("name", NAMES)
def test_threshold_zero_gives_eager_images_and_one_call_per_pipeline_call(name):
    case = CASES[name]
    eager = call(case, 0)
    with cached(case, kernels=False, cache=0.0) as pipe:
        assert torch.equal(call(case, 0), eager)
        assert torch.equal(call(case, 0), eager)
        stats = dit_kernels.cache_stats(pipe)
    assert [(c["num_steps"], c["steps"], c["blocks_skipped"]) for c in stats["calls"]] == [(STEPS, STEPS, 0)] * 2
    assert "set_timesteps" not in vars(tiny_pipelines.build(case.pipeline, torch.float32).scheduler)


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_second_call_equals_a_fresh_pipeline_call(name, kernels):
    first, second = CASES[name], SECOND[name]
    with cached(second, kernels, SKIPPING):
        fresh = call(second, 1)
    with cached(first, kernels, SKIPPING) as pipe:
        call(first, 0)
        assert torch.equal(call(second, 1), fresh), "state from the first call leaked into the second"
        calls = dit_kernels.cache_stats(pipe)["calls"]
    # per call: step 0 (warm-up) computed, steps 1 and 2 too (no estimate: the first miss needs two computed
    # steps), then at most 2 skips in a row, step 5 computed (planned), step 7 (final): c c c s s c s c
    assert [decision["decision"][0] for decision in calls[-1]["trace"]] == list("cccsscsc")
    assert [c["num_steps"] for c in calls] == [STEPS, STEPS] and calls[-1]["hit_rate"] == 3 / STEPS


def test_steps_left_follow_img2img_starts_and_second_order_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler

    from dit_kernels.cache.step_cache import steps_left

    euler = FlowMatchEulerDiscreteScheduler()
    euler.set_timesteps(10)
    assert steps_left(euler) == 10
    euler.set_begin_index(4)  # img2img at strength 0.6: the loop runs the last 6 timesteps
    assert steps_left(euler) == 6
    heun = HeunDiscreteScheduler()
    heun.set_timesteps(10)  # 19 timesteps, every one but the first visited twice: 10 steps
    assert len(heun.timesteps) == 19 and steps_left(heun) == 10


def test_a_scheduler_swapped_in_after_patch_still_gives_each_call_its_step_count():
    """``pipe.scheduler = ...`` after ``patch``: the new scheduler has no hook, so the next call is found by
    its rising timestep, and its step count is read from the pipeline's scheduler of the moment."""
    case = CASES["flux"]
    with cached(case, kernels=False, cache=0.0) as pipe:
        pipe(**dict(case.call, num_inference_steps=STEPS), generator=torch.Generator().manual_seed(0))
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        pipe(**dict(case.call, num_inference_steps=5), generator=torch.Generator().manual_seed(0))
        calls = dit_kernels.cache_stats(pipe)["calls"]
    assert [(c["num_steps"], c["steps"]) for c in calls] == [(STEPS, STEPS), (5, 5)]
