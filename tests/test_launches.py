"""The fused ops seen by a dispatch mode: one torch custom op per fused launch, with the bytes it reads and
writes (dit_kernels.bench.launches, the patched side of the traffic model); and a backend resolved once."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dit_kernels import backends
from dit_kernels.bench.launches import LaunchTracer, tensor_bytes
from dit_kernels.ops import gated_residual_layernorm_modulate, joint_attention, layernorm_modulate, qk_norm_rope

KERNEL_BACKENDS = ["torch", "cuda_emu", "triton"]


class EveryOp(TorchDispatchMode):
    """Records every op it sees but views (inside LaunchTracer: what reaches the dispatcher at all)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def traced(fn):
    with LaunchTracer() as tracer, EveryOp() as every:
        result = fn()
    return result, tracer.launches, every.seen


def require(backend):
    if backend == "triton" and not backends.triton().available:
        pytest.skip(backends.triton().reason)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_norm_modulate_is_one_launch(backend):
    require(backend)
    x, y = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    gate, shift, scale = torch.randn(3, 2, 16).unbind(0)
    (h, out), launches, seen = traced(
        lambda: gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend=backend)
    )
    assert seen == [f"norm_modulate_{backend}"]
    ((launch,),) = [launches]
    assert launch.name == f"norm_modulate_{backend}"
    assert launch.read_bytes == tensor_bytes([x, y, gate, shift, scale])
    assert launch.written_bytes == tensor_bytes([h, out])
    expected = gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="torch")
    torch.testing.assert_close((h, out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_qk_norm_rope_into_joint_buffers_writes_only_its_rows(backend):
    require(backend)
    q, k, v = torch.randn(3, 1, 5, 2, 16).unbind(0)
    cos, sin = torch.randn(2, 12, 16).unbind(0)
    buffers = [torch.zeros(1, 12, 2, 16) for _ in range(3)]
    out = dict(zip(("out_q", "out_k", "out_v"), buffers))
    written, launches, seen = traced(
        lambda: qk_norm_rope(q, k, v=v, cos=cos, sin=sin, seq_offset=4, **out, backend=backend)
    )
    assert seen == [f"qk_norm_rope_into_{backend}"]
    ((launch,),) = [launches]
    assert launch.read_bytes == tensor_bytes([q, k, v, cos, sin])
    assert launch.written_bytes == tensor_bytes([q, k, v])  # the rows 4..8, not the whole buffers
    expected = qk_norm_rope(q, k, v=v, cos=cos, sin=sin, seq_offset=4, backend="torch")
    for w, e, b in zip(written, expected, buffers):
        assert w.data_ptr() == b[:, 4].data_ptr()
        torch.testing.assert_close(w, e, rtol=1e-5, atol=1e-5)


def test_attention_is_one_launch():
    q, k, v = torch.randn(3, 2, 9, 2, 16).unbind(0)
    mask = torch.rand(2, 9) > 0.3
    out, launches, seen = traced(lambda: joint_attention(q, k, v, mask=mask, backend="torch"))
    assert seen == ["joint_attention_torch"]
    ((launch,),) = [launches]
    assert (launch.read_bytes, launch.written_bytes) == (tensor_bytes([q, k, v, mask]), tensor_bytes(out))
    torch.testing.assert_close(out, joint_attention(q, k, v, mask=mask, backend="torch"))


def test_a_resolved_backend_is_not_resolved_again(monkeypatch):
    """A patched model resolves once (backends.resolve returns a Resolved name); the ops dispatch it as
    it is. A plain name is resolved on every call."""
    resolved = backends.resolve("torch", torch.device("cpu"))
    assert isinstance(resolved, backends.Resolved) and resolved == "torch"

    def refuse(*args):
        raise AssertionError("resolved again")

    monkeypatch.setattr(backends, "resolve", refuse)
    x = torch.randn(2, 3, 8)
    q = torch.randn(1, 3, 2, 8)
    layernorm_modulate(x, backend=resolved)
    qk_norm_rope(q, q, backend=resolved)
    with pytest.raises(AssertionError, match="resolved again"):
        layernorm_modulate(x, backend="torch")
