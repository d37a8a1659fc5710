"""joint_attention at real model shapes: our Triton kernel vs PyTorch SDPA (and flash-attention /
xformers when importable), bf16, [B, S, H, Dh] inputs.

On a GPU: B=1, S=4096 (a 1024px image at patch 2 / 8x VAE: 64x64 tokens), the head count of the model
that uses each head dim (72: DiT-XL/2 and PixArt, 16 heads; 88: HunyuanDiT, 16 heads; 128: FLUX,
24 heads), plus PixArt's masked cross-attention to 300 text tokens. Each backend is timed by do_bench
with L2 flushed (conftest.py); TFLOP/s counts the useful work 4 * B * H * Sq * Skv * Dh (not the padding
of 72/88) against the device's bf16 dense peak, in ``benchmark.extra_info`` and on stdout. On CPU: the
torch path (SDPA) at a small shape only (the Triton kernel needs a GPU; its interpreter form is a test
vehicle, not timed)."""

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from dit_kernels.ops import attention_backend, joint_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class AttentionCase:
    model: str
    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    masked: bool = False

    @property
    def flops(self) -> int:
        return 4 * self.batch * self.heads * self.seq_q * self.seq_kv * self.head_dim

    def inputs(self, device):
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(self.batch, self.seq_q, self.heads, self.head_dim, generator=gen)
        k = torch.randn(self.batch, self.seq_kv, self.heads, self.head_dim, generator=gen)
        v = torch.randn(self.batch, self.seq_kv, self.heads, self.head_dim, generator=gen)
        mask: Optional[torch.Tensor] = None
        if self.masked:  # PixArt's bias: (1 - keep) * -10000 over 300 text tokens, 120 of them real
            keep = torch.arange(self.seq_kv)[None, :] < 120
            mask = ((1 - keep.to(DTYPE)) * -10000.0).expand(self.batch, -1).to(device)
        return *(t.to(device=device, dtype=DTYPE) for t in (q, k, v)), mask

    @property
    def id(self) -> str:
        masked = "-masked" if self.masked else ""
        return f"{self.model}-B{self.batch}-H{self.heads}-{self.seq_q}x{self.seq_kv}-D{self.head_dim}{masked}"


if DEVICE.type == "cuda":
    CASES = [
        AttentionCase("DiT-XL_PixArt", 1, 16, 4096, 4096, 72),
        AttentionCase("HunyuanDiT", 1, 16, 4096, 4096, 88),
        AttentionCase("FLUX", 1, 24, 4096, 4096, 128),
        AttentionCase("PixArt-cross", 1, 16, 4096, 300, 72, masked=True),
    ]
    BACKENDS = ["torch", "triton", "flash_attn", "xformers"]
else:
    CASES = [AttentionCase("small", 1, 4, 256, 256, 64), AttentionCase("small", 1, 4, 256, 77, 72, masked=True)]
    BACKENDS = ["torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_joint_attention(benchmark, timed, case, backend):
    q, k, v, mask = case.inputs(DEVICE)
    try:
        name, why = attention_backend(q, k, v, mask=mask, backend=backend)
    except RuntimeError as err:
        pytest.skip(f"{backend}: {err}")
    fn = lambda: joint_attention(q, k, v, mask=mask, backend=backend)  # noqa: E731
    fn()  # warm-up: compiles the Triton kernel before timing
    benchmark.group = case.id
    benchmark.extra_info["backend"] = f"{name} ({why})"
    seconds = timed(fn, cpu_rounds=5)
    timed.report_flops(f"{case.id} [{backend}]", case.flops, seconds)
