"""Two small models trained by this project (``tools/train_builtin.py``) on scikit-learn's digits, shipped
as package data under ``dit_kernels/assets/<name>/`` and loaded with no network.

- ``digits-dit``: class-conditional ``DiTTransformer2DModel`` (adaLN-Zero, the DiT paper's setting):
  epsilon prediction on DDPM linear betas, sampled with DDIM; the null class id ``NUM_CLASSES`` is the
  classifier-free-guidance "unconditional" label, as in ``DiTPipeline``.
- ``digits-flux``: a tiny MM-DiT ``FluxTransformer2DModel``: 2x2 pixel patches packed into tokens as
  ``FluxPipeline`` packs latents, the class label as a learned 4-token "prompt" plus a learned pooled
  vector (``label_prompts.safetensors``), rectified flow (``x_t = (1 - t) x0 + t noise``, predicts
  ``noise - x0``), sampled with ``FlowMatchEulerDiscreteScheduler``.

Images are 16x16, one channel, in [-1, 1] (the 8x8 digits upsampled bilinearly). ``sample`` is a plain
denoising loop whose every step is one call of ``bundle.transformer`` (its ``forward``), so a model
patched with ``dit_kernels.patch(bundle.transformer, cache=...)`` and sampled inside
``dit_kernels.cache_session(bundle.transformer, num_steps=steps)`` runs the fused, cached path.
Classifier-free guidance batches ``[conditional; unconditional]`` into that one call, as ``DiTPipeline``
does (the two halves the step cache's ``cfg="per_half"`` separates).

The family conventions (how the pipeline passes the timestep, whether latents are packed into tokens)
come from the transformer's ``Family`` (``dit_kernels.models``); what is particular to these models (how
the class label conditions the call) lives in one adapter class per model below (``_DiTDigits``,
``_FluxDigits``) and the ``_ADAPTERS`` table.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit_kernels.models import family_of

ASSETS = Path(__file__).resolve().parent.parent / "assets"
IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the classifier-free-guidance label, as DiTPipeline's class_null
PATCH = 2  # FLUX packing: 2x2 pixels per token
LABEL_PROMPTS_FILE = "label_prompts.safetensors"


# ------------------------------------------------------------------------------------------- data


def digits(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits (no download) as ``(images (N, 1, size, size) in [-1, 1], labels (N,))``:
    pixel values 0..16 scaled to [-1, 1], upsampled bilinearly."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images, torch.tensor(data.target, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def _digit_classifier():
    """An RBF SVM on the same upsampled digits (5-fold accuracy 97.1 % on real digits; gamma and C from a
    small grid on that score). Deterministic: SVC's fit has no randomness without ``probability``."""
    from sklearn.svm import SVC

    images, labels = digits()
    return SVC(gamma=0.01, C=10.0).fit(images.flatten(1).numpy(), labels.numpy())


def classify(images: Tensor) -> Tensor:
    """Digit class (0-9) of each ``(B, 1, 16, 16)`` image in [-1, 1], by the SVM above (fit at first use)."""
    if images.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"classify takes (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) images, got {tuple(images.shape)}")
    flat = images.detach().float().clamp(-1, 1).flatten(1).cpu().numpy()
    return torch.from_numpy(_digit_classifier().predict(flat)).long()


# ------------------------------------------------------------------------------- FLUX token layout


def pack(images: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/2)(W/2), 4C)`` tokens, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = images.shape
    tokens = images.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Inverse of ``pack`` for square ``size x size`` images, as ``FluxPipeline._unpack_latents``."""
    b, _, d = tokens.shape
    side = size // PATCH
    images = tokens.view(b, side, side, d // (PATCH * PATCH), PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return images.reshape(b, d // (PATCH * PATCH), size, size)


def image_ids(size: int = IMAGE_SIZE) -> Tensor:
    """``(tokens, 3)`` RoPE positions (0, row, column) of the packed tokens, as
    ``FluxPipeline._prepare_latent_image_ids``."""
    side = size // PATCH
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return ids.reshape(side * side, 3)


class LabelPrompts(nn.Module):
    """The FLUX model's "text encoder": per class id (``NULL_CLASS`` included) a learned token sequence
    ``(num_tokens, joint_attention_dim)`` and a learned pooled vector ``(pooled_projection_dim,)``."""

    def __init__(self, num_tokens: int, token_dim: int, pooled_dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(NUM_CLASSES + 1, num_tokens, token_dim) * 0.02)
        self.pooled = nn.Parameter(torch.randn(NUM_CLASSES + 1, pooled_dim) * 0.02)

    def forward(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.tokens[labels], self.pooled[labels]


# ------------------------------------------------------------------------------- per-model adapters


class _DiTDigits:
    """DiT: the class label as ``class_labels``; learned-sigma output channels dropped, as DiTPipeline."""

    @staticmethod
    def load_extras(directory: Path, device, dtype) -> Optional[nn.Module]:
        return None

    @staticmethod
    def conditioning(bundle: "BuiltinModel", labels: Tensor, x: Tensor) -> dict:
        return {"class_labels": labels}

    @staticmethod
    def prediction(out: Tensor, x: Tensor) -> Tensor:
        return out[:, : x.shape[1]]


class _FluxDigits:
    """FLUX: the class label as its learned prompt and pooled vector, with FluxPipeline's RoPE ids."""

    @staticmethod
    def load_extras(directory: Path, device, dtype) -> nn.Module:
        from safetensors.torch import load_file

        state = load_file(str(directory / LABEL_PROMPTS_FILE))
        _, num_tokens, token_dim = state["tokens"].shape
        prompts = LabelPrompts(num_tokens, token_dim, state["pooled"].shape[1])
        prompts.load_state_dict(state)
        return prompts.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @staticmethod
    def conditioning(bundle: "BuiltinModel", labels: Tensor, x: Tensor) -> dict:
        tokens, pooled = bundle.extras(labels)
        return dict(encoder_hidden_states=tokens, pooled_projections=pooled, img_ids=image_ids().to(x),
                    txt_ids=torch.zeros(tokens.shape[1], 3).to(x))  # fmt: skip

    @staticmethod
    def prediction(out: Tensor, x: Tensor) -> Tensor:
        return out


_ADAPTERS = {"digits-dit": _DiTDigits, "digits-flux": _FluxDigits}
NAMES = tuple(_ADAPTERS)


# ------------------------------------------------------------------------------------ load / sample


@dataclass
class BuiltinModel:
    """A loaded built-in model: its transformer, its sampling scheduler, and (FLUX) its label prompts."""

    name: str
    transformer: nn.Module
    scheduler: object
    extras: Optional[nn.Module] = None

    @property
    def adapter(self):
        return _ADAPTERS[self.name]

    @property
    def family(self):
        return family_of(self.transformer)


def load(name: str, device="cpu", dtype: torch.dtype = torch.float32, directory: Optional[Path] = None) -> BuiltinModel:
    """Load a shipped model from ``dit_kernels/assets/<name>/`` (or ``directory``, as written by
    ``tools/train_builtin.py --out``) with no network, in eval mode, cast to ``dtype`` on ``device`` (the
    weights are stored in fp16)."""
    if name not in _ADAPTERS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {NAMES}")
    import diffusers

    directory = Path(directory or ASSETS / name)

    def saved_class(config_file: str):
        return getattr(diffusers, json.loads((directory / config_file).read_text())["_class_name"])

    transformer = saved_class("config.json").from_pretrained(str(directory), torch_dtype=dtype, local_files_only=True)
    transformer = transformer.to(device).eval().requires_grad_(False)
    scheduler = saved_class("scheduler_config.json").from_pretrained(str(directory), local_files_only=True)
    return BuiltinModel(name, transformer, scheduler, _ADAPTERS[name].load_extras(directory, device, dtype))


@torch.no_grad()
def sample(
    bundle: BuiltinModel,
    labels,
    steps: int = 50,
    guidance: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Generate one ``(1, 16, 16)`` image in [-1, 1] per class label (fp32, returned on the CPU).

    ``guidance`` > 1: classifier-free guidance ``u + guidance (c - u)``, the conditional and ``NULL_CLASS``
    halves batched into one transformer call per step; 1: conditional only. The initial noise is drawn
    on the CPU from ``generator`` (same seed, same noise on any device or dtype); the latents stay on the
    model's device in fp32 (the transformer gets them in its dtype), as the diffusers pipelines keep them."""
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be a non-empty list of classes in 0..{NUM_CLASSES - 1}, got {labels.tolist()}")
    adapter, family, model = bundle.adapter, bundle.family, bundle.transformer
    device, dtype = model.device, model.dtype
    packed = family.latent_packing > 1
    scheduler = type(bundle.scheduler).from_config(bundle.scheduler.config)  # fresh step state per call
    scheduler.set_timesteps(steps)
    x = torch.randn(labels.numel(), 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    x = (pack(x) if packed else x).to(device)
    guided = guidance > 1.0
    call_labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if guided else labels
    call_labels = call_labels.to(device)
    for t in scheduler.timesteps:
        model_input = (torch.cat([x, x]) if guided else x).to(dtype)
        out = model(
            hidden_states=model_input,
            timestep=family.timestep(float(t), model_input.shape[0], model_input),
            **adapter.conditioning(bundle, call_labels, model_input),
            return_dict=False,
        )[0]
        out = adapter.prediction(out, model_input).float()
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return (unpack(x) if packed else x).clamp(-1, 1).cpu()
