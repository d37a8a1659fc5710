"""qk_norm_rope at FLUX.1's joint shape [1, 4608, 24, 128] (512 text + 4096 image tokens), bf16: diffusers'
eager chain (RMSNorm on q and k, apply_rotary_emb, torch.cat of the text and image streams) vs one fused
launch per stream writing q, k and v into the joint buffers. The fused kernels move each byte of q, k, v
once: read 3 x 28.3 MB, write 3 x 28.3 MB = 170 MB, a 51 us floor at 3.35 TB/s (H100 HBM3); on a GPU
timed by do_bench with L2 flushed (conftest.py). On CPU only the torch reference runs, at a smaller shape."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed

from dit_kernels import backends
from dit_kernels.ops import qk_norm_rope

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
HEADS, DIM = 24, 128
TXT, IMG = (512, 4096) if DEVICE.type == "cuda" else (64, 512)
PATHS = ["eager", "triton", "cuda"] if DEVICE.type == "cuda" else ["eager", "torch"]


def _streams():
    gen = torch.Generator().manual_seed(0)
    make = lambda s: torch.randn(1, s, HEADS, DIM, generator=gen).to(DEVICE, DTYPE)  # noqa: E731
    txt, img = [make(TXT) for _ in range(3)], [make(IMG) for _ in range(3)]
    weight = torch.ones(DIM, device=DEVICE, dtype=DTYPE)
    cos, sin = (t.to(DEVICE) for t in get_1d_rotary_pos_embed(DIM, TXT + IMG, use_real=True, repeat_interleave_real=True))
    return txt, img, weight, cos, sin


def _eager(txt, img, weight, cos, sin):
    norm = torch.nn.functional.rms_norm
    q = torch.cat([norm(txt[0], (DIM,), weight, 1e-6), norm(img[0], (DIM,), weight, 1e-6)], dim=1)
    k = torch.cat([norm(txt[1], (DIM,), weight, 1e-6), norm(img[1], (DIM,), weight, 1e-6)], dim=1)
    v = torch.cat([txt[2], img[2]], dim=1)
    rotate = lambda x: apply_rotary_emb(x.transpose(1, 2), (cos, sin)).transpose(1, 2)  # noqa: E731
    return rotate(q), rotate(k), v


def _fused(txt, img, weight, cos, sin, backend):
    out = {name: torch.empty(1, TXT + IMG, HEADS, DIM, device=DEVICE, dtype=DTYPE) for name in ("out_q", "out_k", "out_v")}
    for offset, (q, k, v) in ((0, txt), (TXT, img)):
        qk_norm_rope(q, k, v=v, q_weight=weight, k_weight=weight, cos=cos, sin=sin, seq_offset=offset, **out,
                     backend=backend)  # fmt: skip
    return out


@pytest.mark.parametrize("path", PATHS)
def test_qk_norm_rope_flux_joint(benchmark, timed, path):
    if path != "eager":
        try:
            backends.resolve(path, DEVICE)
        except RuntimeError as err:
            pytest.skip(f"{path} unavailable here: {err}")
    args = _streams()
    fn = (lambda: _eager(*args)) if path == "eager" else (lambda: _fused(*args, path))
    fn()
    benchmark.group = f"qk_norm_rope FLUX joint [1, {TXT}+{IMG}, {HEADS}, {DIM}] {DTYPE}"
    seconds = timed(fn, cpu_rounds=3, warmup_rounds=1)
    if DEVICE.type == "cuda" and path != "eager":
        timed.report_bandwidth(f"{benchmark.group} [{path}]", 6 * (TXT + IMG) * HEADS * DIM * 2, seconds)
