"""Whole video pipelines (tiny components, tests/tiny_pipelines.py): LattePipeline and WanPipeline (Wan 2.1
T2V, Wan 2.2 TI2V's per-token timesteps, Wan 2.2 A14B's two transformers) give eager's videos after
``dit_kernels.patch(pipe)`` and exactly eager's again after ``unpatch``; the A14B pipeline has both
transformers patched, a refused ``transformer_2`` leaves the pipeline unchanged, and with the step cache each
transformer keeps its own state (the switch at the boundary starts the second one afresh).

Every case runs 2-4 steps with classifier-free guidance from fixed latents and text embeddings
(``prompt_embeds``: no tokenizer or text encoder; Wan without a VAE, Latte decoding frame by frame).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import dit_kernels
import tiny_pipelines
from patch_parity import assert_unchanged, snapshot
from test_pipelines import assert_fp32_close, quiet_diffusers  # noqa: F401 (an autouse fixture: notices of cast pipelines)
from tolerances import assert_within_eager_bound

WAN = dict(guidance_scale=5.0, height=32, width=48, num_frames=9, output_type="latent")  # latents [1, 4, 3, 4, 6]
LATTE = dict(guidance_scale=4.5, height=16, width=16, video_length=3, negative_prompt=None, output_type="pt")
CALLS = {"latte": LATTE, "wan": WAN, "wan_ti2v": WAN, "wan_a14b": WAN}
TEXT = {"latte": (5, 32), "wan": (7, 16), "wan_ti2v": (7, 16), "wan_a14b": (7, 16)}  # prompt tokens, width


def run(name: str, dtype: torch.dtype = torch.float32, steps: int = 4) -> torch.Tensor:
    """The case's video (latents or decoded frames) as an fp32 tensor; embeddings drawn in fp32 and cast."""
    pipe = tiny_pipelines.build(name, dtype)
    generator = torch.Generator().manual_seed(1)
    prompt, negative = (torch.randn(1, *TEXT[name], generator=generator).to(dtype) for _ in range(2))
    out = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(0), return_dict=False, **CALLS[name])[0]  # fmt: skip
    return torch.as_tensor(out).float()


@contextlib.contextmanager
def patched(name: str, dtype: torch.dtype = torch.float32, **kwargs):
    """Patch the cached pipeline for the block's duration (always unpatched after)."""
    pipe = tiny_pipelines.build(name, dtype)
    report = dit_kernels.patch(pipe, **kwargs)
    try:
        yield pipe, report
    finally:
        dit_kernels.unpatch(pipe)


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CALLS))
def test_patched_pipeline_matches_eager_and_unpatch_restores_it(name):
    eager = run(name)
    with patched(name, backend="torch") as (pipe, report):
        ours = run(name)
    assert report.family == name.split("_")[0] and report.replaced
    assert_fp32_close(ours, eager, name)
    assert torch.equal(run(name), eager), f"{name}: unpatch did not restore eager output"


@pytest.mark.parametrize("name", ["latte", "wan_a14b"])
def test_bf16_pipelines_within_the_eager_bound(name):
    truth, eager = run(name), run(name, torch.bfloat16)
    with patched(name, torch.bfloat16, backend="torch"):
        ours = run(name, torch.bfloat16)
    assert_within_eager_bound(ours, eager, truth, what=f"{name} bf16")


@pytest.mark.parametrize("name", ["latte", "wan"])
def test_triton_backend_one_step(name):
    """The interpreter is slow: one step."""
    eager = run(name, steps=1)
    with patched(name, backend="triton"):
        ours = run(name, steps=1)
    assert_fp32_close(ours, eager, f"{name} triton")


# ----------------------------------------------------------------------------------------- two transformers


def test_both_transformers_of_a14b_are_patched_and_restored():
    pipe = tiny_pipelines.build("wan_a14b", torch.float32)  # the pipeline ``patched`` patches
    before = [snapshot(pipe.transformer), snapshot(pipe.transformer_2)]
    with patched("wan_a14b", backend="torch") as (pipe, report):
        assert dit_kernels.is_patched(pipe.transformer) and dit_kernels.is_patched(pipe.transformer_2)
        assert list(report.others) == ["transformer_2"] and report.others["transformer_2"].replaced
        assert "transformer_2:" in repr(report)
        assert dit_kernels.patch(pipe, backend="torch") is report, "patching again returns the first report"
    assert not dit_kernels.is_patched(pipe.transformer) and not dit_kernels.is_patched(pipe.transformer_2)
    assert_unchanged(pipe.transformer, before[0])
    assert_unchanged(pipe.transformer_2, before[1])


def test_a_transformer_2_of_another_class_is_refused_and_nothing_changes():
    pipe = tiny_pipelines.build_wan("a14b")
    pipe.transformer_2 = tiny_pipelines.tiny_transformer("latte").transformer_blocks[0]  # not a transformer
    before = snapshot(pipe.transformer)
    with pytest.raises(TypeError, match="cannot patch BasicTransformerBlock"):
        dit_kernels.patch(pipe)
    assert not dit_kernels.is_patched(pipe.transformer)
    assert_unchanged(pipe.transformer, before)


def test_step_cache_state_per_transformer_and_the_boundary_is_a_fresh_start():
    """Threshold 0: the cached A14B pipeline's video is the uncached one bit for bit. A threshold no miss
    reaches: ``transformer`` (2 high-noise steps) and ``transformer_2`` (2 low-noise steps, its own state)
    each compute their first step (warm-up: the boundary is a fresh start, never a prediction from the
    first transformer's outputs); the first computes its second step for its first estimate (4 steps left),
    the second because it is the sampling's final step (its step count is the steps left when it joins);
    each step's cond and uncond calls are two branches."""
    with patched("wan_a14b", backend="torch") as _:
        uncached = run("wan_a14b")
    with patched("wan_a14b", backend="torch", cache=dit_kernels.CacheConfig(threshold=0.0)) as (pipe, _):
        assert torch.equal(run("wan_a14b"), uncached)
    always = dit_kernels.CacheConfig(threshold=1e9, warmup_steps=1, final_steps_computed=1)
    with patched("wan_a14b", backend="torch", cache=always) as (pipe, _):
        run("wan_a14b")
        for transformer, second, num_steps in ((pipe.transformer, "no estimate", 4),
                                               (pipe.transformer_2, "final steps", 2)):  # fmt: skip
            call = dit_kernels.cache_stats(transformer)["calls"][-1]
            assert call["steps"] == 2 and call["num_steps"] == num_steps
            assert [(e["step"], e["branch"], e["reason"]) for e in call["trace"]] == [
                (0, 0, "warm-up"), (0, 1, "warm-up"), (1, 0, second), (1, 1, second)]
