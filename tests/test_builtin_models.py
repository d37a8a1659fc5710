"""The built-in models (``dit_kernels.bench.builtin``): the shipped weights load with no network, their
samples are recognisable digits, and the fused and cached paths reproduce the eager samples."""

import socket

import pytest
import torch

import dit_kernels
from dit_kernels.bench import builtin

STEPS = 10  # a fifth of the model cards' 50: fast, and still a full trajectory


@pytest.fixture(autouse=True)
def one_thread():
    # batches of 2-20 16x16 images: intra-op threads do not help, and on a busy machine they make each
    # call ~20x slower (spinning threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("a built-in model tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _samples(bundle, labels, guidance=2.0):
    return builtin.sample(bundle, labels, steps=STEPS, guidance=guidance, generator=torch.Generator().manual_seed(0))


def test_shipped_weights_fit_the_package_budget():
    files = list(builtin.ASSETS.glob("*/*.safetensors"))
    assert {f.parent.name for f in files} == set(builtin.NAMES)
    assert sum(f.stat().st_size for f in files) <= 8_000_000


@pytest.mark.parametrize("name", builtin.NAMES)
def test_loads_offline_in_eval_mode_and_requested_dtype(name, no_network):
    bundle = builtin.load(name, dtype=torch.bfloat16)
    tensors = list(bundle.transformer.parameters()) + list((bundle.extras or torch.nn.Module()).parameters())
    assert not bundle.transformer.training
    assert all(t.dtype == torch.bfloat16 and not t.requires_grad for t in tensors)


@pytest.mark.parametrize("name", builtin.NAMES)
def test_samples_are_recognisable(name):
    # one per class, 10 steps, guidance 2: both models label 10 of 10 here (and >= 90 % of 200 at 50 steps,
    # their cards); we ask 8. A model ignoring its label, or untrained weights, scores ~1 of 10, so this
    # fails on broken conditioning, weights or sampler, with room for small numerical changes.
    labels = torch.arange(builtin.NUM_CLASSES)
    images = _samples(builtin.load(name), labels)
    assert images.shape == (10, 1, builtin.IMAGE_SIZE, builtin.IMAGE_SIZE)
    assert (builtin.classify(images) == labels).sum() >= 8


def test_classify_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"\(3, 1, 8, 8\)"):
        builtin.classify(torch.zeros(3, 1, 8, 8))


@pytest.mark.parametrize("name", builtin.NAMES)
def test_patched_and_cached_sampling_reproduce_eager(name):
    labels = [3, 7]
    bundle = builtin.load(name)
    eager = _samples(bundle, labels)

    dit_kernels.patch(bundle.transformer)
    patched = _samples(bundle, labels)
    dit_kernels.unpatch(bundle.transformer)
    # fp32: the fused path reorders sums (norm, modulation, attention), ~1e-6 per call, over 10 steps
    torch.testing.assert_close(patched, eager, atol=1e-4, rtol=0)

    dit_kernels.patch(bundle.transformer, cache=dit_kernels.CacheConfig(threshold=0.0))
    with dit_kernels.cache_session(bundle.transformer, num_steps=STEPS):
        exact = _samples(bundle, labels)
    stats = dit_kernels.cache_stats(bundle.transformer)
    dit_kernels.unpatch(bundle.transformer)
    torch.testing.assert_close(exact, patched, atol=0, rtol=0)  # threshold 0 computes every block as patched
    assert stats["steps"] == STEPS and stats["blocks_skipped"] == 0

    # every step is one transformer call the cache sees (a loose threshold does skip blocks in this loop)
    dit_kernels.patch(bundle.transformer, cache=dit_kernels.CacheConfig(threshold=1.0))
    with dit_kernels.cache_session(bundle.transformer, num_steps=STEPS):
        _samples(bundle, labels)
    stats = dit_kernels.cache_stats(bundle.transformer)
    dit_kernels.unpatch(bundle.transformer)
    assert stats["steps"] == STEPS and stats["blocks_skipped"] > 0
