"""Op-level benchmark cases: the norm/modulate family at real model shapes, eager vs fused.

Shared by the main-job CLI (``python -m dit_kernels.bench``) and the pytest-benchmark files under
``benchmarks/``. Each case knows how many bytes its fused kernel must move at the least (every input
read once, every output written once), so a GPU timing can be reported as GB/s against that floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dit_kernels.ops import gated_residual_layernorm_modulate, layernorm_modulate

H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3 peak: the floor the targets are stated against


@dataclass(frozen=True)
class OpCase:
    """One op at one shape: ``eager`` is what diffusers runs (several aten ops in the input dtype),
    ``fused`` is ours on ``backend``; both take the tensors built by ``inputs``."""

    name: str
    model: str
    shape: tuple[int, int, int]
    inputs: Callable[[torch.dtype, torch.device], dict]
    eager: Callable[..., object]
    fused: Callable[..., object]
    min_bytes: Callable[[torch.dtype], int]


def _modulation(batch: int, dim: int, dtype, device, generator) -> dict:
    emb = torch.randn(batch, 6 * dim, generator=generator).to(device=device, dtype=dtype) * 0.5
    shift, scale, gate, *_ = emb.chunk(6, dim=1)
    return {"shift": shift, "scale": scale, "gate": gate}


def _rows(shape, dtype, device, generator, count: int) -> list[torch.Tensor]:
    return [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(count)]


def _ln_modulate_case(model: str, shape) -> OpCase:
    batch, seq, dim = shape

    def inputs(dtype, device):
        gen = torch.Generator().manual_seed(0)
        (x,) = _rows(shape, dtype, device, gen, 1)
        return {"x": x, **_modulation(batch, dim, dtype, device, gen)}

    def eager(x, shift, scale, gate):
        return F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def fused(x, shift, scale, gate, backend=None):
        return layernorm_modulate(x, shift, scale, backend=backend)

    def min_bytes(dtype):  # read x, shift, scale; write y
        return (2 * batch * seq * dim + 2 * batch * dim) * torch.finfo(dtype).bits // 8

    return OpCase("layernorm_modulate", model, shape, inputs, eager, fused, min_bytes)


def _residual_norm_case(model: str, shape) -> OpCase:
    batch, seq, dim = shape

    def inputs(dtype, device):
        gen = torch.Generator().manual_seed(0)
        residual, y = _rows(shape, dtype, device, gen, 2)
        return {"residual": residual, "y": y, **_modulation(batch, dim, dtype, device, gen)}

    def eager(residual, y, shift, scale, gate):
        h = residual + gate[:, None] * y
        return h, F.layer_norm(h, (dim,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def fused(residual, y, shift, scale, gate, backend=None):
        return gated_residual_layernorm_modulate(residual, y, gate, shift, scale, backend=backend)

    def min_bytes(dtype):  # read residual, y, gate, shift, scale; write h, out
        return (4 * batch * seq * dim + 3 * batch * dim) * torch.finfo(dtype).bits // 8

    return OpCase("gated_residual_layernorm_modulate", model, shape, inputs, eager, fused, min_bytes)


# Image tokens x hidden size of real models (batch 1: one CFG half).
MODEL_SHAPES = {
    "DiT-XL/2 256px": (1, 256, 1152),
    "PixArt-Sigma 1024px": (1, 4096, 1152),
    "SD3-medium 1024px": (1, 4096, 1536),
    "FLUX.1 1024px": (1, 4096, 3072),
}


def cases(models=None) -> list[OpCase]:
    chosen = MODEL_SHAPES if models is None else {m: MODEL_SHAPES[m] for m in models}
    return [make(model, shape) for model, shape in chosen.items() for make in (_ln_modulate_case, _residual_norm_case)]
