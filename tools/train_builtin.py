"""Train the built-in models (``dit_kernels.bench.builtin``) on scikit-learn's digits, on the CPU.

    OPENBLAS_NUM_THREADS=1 python tools/train_builtin.py digits-dit    # then digits-flux
    OPENBLAS_NUM_THREADS=1 python tools/train_builtin.py digits-flux --evaluate-only

Writes ``dit_kernels/assets/<name>/``: the EMA weights in fp16 (``config.json`` +
``diffusion_pytorch_model.safetensors``; FLUX also ``label_prompts.safetensors``), the sampling
scheduler's ``scheduler_config.json``, ``train_log.tsv`` (step, loss, EMA of the loss, lr, seconds),
``loss.png``, ``training.json`` (command, seed, steps, wall time, final loss) and, after sampling 20 images
per class with and without guidance, ``evaluation.json`` and the model card ``README.md``.

Objectives: DiT as the DiT paper (epsilon prediction, DDPM linear betas 1e-4..0.02, 1000 steps, 10 %
label dropout to the null class); FLUX as rectified flow (``x_t = (1 - t) x0 + t noise``, target
``noise - x0``, t logit-normal as SD3/FLUX training), the same 10 % null-label dropout.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import shlex
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dit_kernels.bench import builtin

SEED = 0
LABEL_DROPOUT = 0.1

HPARAMS = {  # both: AdamW, linear warm-up then cosine decay to 10 %, grad-norm clip 1, EMA 0.999
    "digits-dit": dict(steps=2000, batch=64, lr=1e-3, warmup=100, ema=0.999),
    "digits-flux": dict(steps=2000, batch=64, lr=1e-3, warmup=100, ema=0.999),
}
EVAL_PER_CLASS, EVAL_STEPS, EVAL_GUIDANCE = 20, 50, 2.0


def build_dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=5,
        sample_size=builtin.IMAGE_SIZE, patch_size=2, num_embeds_ada_norm=builtin.NUM_CLASSES,
        norm_type="ada_norm_zero",
    )  # fmt: skip
    # label dropout is done once per sample below (diffusers' per-block LabelEmbedding would drop each
    # block's label independently); the tables keep their null-class row NUM_CLASSES
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    # adaLN-Zero init as the DiT paper (diffusers does not do it): each block starts as the identity (zero
    # modulation, so zero gates) and the output as zero (zero final modulation and projection)
    for linear in [block.norm1.linear for block in model.transformer_blocks] + [model.proj_out_1, model.proj_out_2]:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return model


def build_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    width = 128
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=builtin.PATCH * builtin.PATCH, num_layers=2, num_single_layers=2,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=width, pooled_projection_dim=width,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )  # fmt: skip
    return nn.ModuleDict({"transformer": transformer, "prompts": builtin.LabelPrompts(4, width, width)})


@functools.lru_cache(maxsize=None)
def dit_schedulers():
    """(the DDPM training scheduler, the DDIM sampling scheduler on the same betas)"""
    from diffusers import DDIMScheduler, DDPMScheduler

    train = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return train, DDIMScheduler.from_config(train.config)


def dit_loss(model, images, labels, generator) -> torch.Tensor:
    train_scheduler, _ = dit_schedulers()
    noise = torch.randn(images.shape, generator=generator)
    t = torch.randint(0, 1000, (images.shape[0],), generator=generator)
    noisy = train_scheduler.add_noise(images, noise, t)
    eps = model(noisy, timestep=t, class_labels=labels, return_dict=False)[0]
    return F.mse_loss(eps, noise)


def flux_loss(model, images, labels, generator) -> torch.Tensor:
    x0 = builtin.pack(images)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))  # logit-normal(0, 1)
    noisy = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    tokens, pooled = model["prompts"](labels)
    velocity = model["transformer"](
        hidden_states=noisy, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t,
        img_ids=builtin.image_ids(), txt_ids=torch.zeros(tokens.shape[1], 3), return_dict=False,
    )[0]  # fmt: skip
    return F.mse_loss(velocity, noise - x0)


def train(name: str, out: Path) -> None:
    hp = HPARAMS[name]
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = build_dit() if name == "digits-dit" else build_flux()
    loss_fn = dit_loss if name == "digits-dit" else flux_loss
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=0.0)

    def lr_at(step):
        if step < hp["warmup"]:
            return hp["lr"] * (step + 1) / hp["warmup"]
        progress = (step - hp["warmup"]) / max(1, hp["steps"] - hp["warmup"])
        return hp["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    images, labels = builtin.digits()
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train_log.tsv", "w")
    log.write("step\tloss\tloss_ema\tlr\tseconds\n")
    start, loss_ema = time.time(), None
    model.train()
    for step in range(hp["steps"]):
        index = torch.randint(0, images.shape[0], (hp["batch"],), generator=generator)
        batch_labels = labels[index].clone()
        drop = torch.rand(hp["batch"], generator=generator) < LABEL_DROPOUT
        batch_labels[drop] = builtin.NULL_CLASS
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_fn(model, images[index], batch_labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(hp["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 10 == 0 or step == hp["steps"] - 1:
            log.write(f"{step}\t{loss.item():.5f}\t{loss_ema:.5f}\t{lr_at(step):.2e}\t{time.time() - start:.1f}\n")
            log.flush()
    wall = time.time() - start
    save(name, ema, out)
    command = "OPENBLAS_NUM_THREADS=1 python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = dict(command=command, seed=SEED, threads=1, label_dropout=LABEL_DROPOUT, **hp,
                wall_seconds=round(wall, 1), final_loss_ema=round(loss_ema, 5),
                torch=torch.__version__)  # fmt: skip
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    plot_loss(out)


def save(name: str, ema: nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    if name == "digits-dit":
        transformer, scheduler = ema, dit_schedulers()[1]
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        transformer = ema["transformer"]
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        prompts = {k: v.detach().to(torch.float16).contiguous() for k, v in ema["prompts"].state_dict().items()}
        save_file(prompts, str(out / builtin.LABEL_PROMPTS_FILE))
    copy.deepcopy(transformer).to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    scheduler.save_pretrained(str(out))


def _pyplot():
    """matplotlib's pyplot on the file backend, or None without matplotlib (no PNGs then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_loss(out: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    rows = [line.split("\t") for line in (out / "train_log.tsv").read_text().splitlines()[1:]]
    steps, loss, loss_ema = ([float(r[i]) for r in rows] for i in range(3))
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
    ax.plot(steps, loss_ema, lw=1.2, label="EMA of loss")
    ax.set(xlabel="step", ylabel="MSE", yscale="log", title=out.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png")


def evaluate(name: str, out: Path) -> dict:
    """Sample ``EVAL_PER_CLASS`` images per class from the shipped (fp16-stored, fp32-loaded) weights,
    uncached, with and without guidance; the share the digit SVM labels as the requested class."""
    bundle = builtin.load(name, directory=out)
    labels = torch.arange(builtin.NUM_CLASSES).repeat_interleave(EVAL_PER_CLASS)
    result = dict(samples=labels.numel(), steps=EVAL_STEPS, seed=SEED)
    for key, guidance in (("no_cfg", 1.0), (f"cfg_{EVAL_GUIDANCE}", EVAL_GUIDANCE)):
        start = time.time()
        images = builtin.sample(bundle, labels, EVAL_STEPS, guidance, torch.Generator().manual_seed(SEED))
        hits = builtin.classify(images) == labels
        result[key] = dict(
            guidance=guidance, accuracy=round(hits.float().mean().item(), 4), seconds=round(time.time() - start, 1),
            per_class=[round(h.float().mean().item(), 2) for h in hits.view(builtin.NUM_CLASSES, -1)],
        )  # fmt: skip
        save_grid(images[:: EVAL_PER_CLASS // 10].view(builtin.NUM_CLASSES, 10, -1), out / f"samples_{key}.png")
    real_images, real_labels = builtin.digits()
    result["real_digits_accuracy"] = (builtin.classify(real_images) == real_labels).float().mean().item()
    (out / "evaluation.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def save_grid(images: torch.Tensor, path: Path) -> None:
    """``(rows, columns, 256)`` images in [-1, 1] as one grayscale PNG (rows: class 0..9)."""
    plt = _pyplot()
    if plt is None:
        return
    rows, cols, _ = images.shape
    side = builtin.IMAGE_SIZE
    grid = images.view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(rows * side, cols * side)
    plt.imsave(path, ((grid + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)


ARCHITECTURE = {
    "digits-dit": (
        "`diffusers.DiTTransformer2DModel`, `norm_type=\"ada_norm_zero\"` (adaLN-Zero, the DiT paper's block, "
        "with its zero init of every modulation and the output projection, which diffusers does not do): "
        "5 layers, 4 heads x 32 (hidden 128), patch 2 (16x16x1 -> 64 tokens), `in_channels=out_channels=1` "
        "(no learned sigma), `num_embeds_ada_norm=10` (label table rows 0-9 and the null class 10)."
    ),
    "digits-flux": (
        "`diffusers.FluxTransformer2DModel` (MM-DiT): 2 double-stream + 2 single-stream blocks, 4 heads x 32 "
        "(hidden 128), RoPE axes (8, 12, 12) on FluxPipeline's ids (image: (0, row, col) of the 8x8 token grid; "
        "text: zeros), `in_channels=4` (2x2 pixel patches packed as FluxPipeline packs latents: 16x16x1 -> 64 "
        "tokens), `guidance_embeds=False`. Conditioning (`label_prompts.safetensors`, `builtin.LabelPrompts`): "
        "per class (0-9 and the null class 10) a learned 4-token sequence of width `joint_attention_dim=128` and "
        "a learned pooled vector of width `pooled_projection_dim=128`."
    ),
}
OBJECTIVE = {
    "digits-dit": (
        "epsilon prediction, MSE; DDPM linear betas 1e-4..0.02, 1000 training steps (the DiT paper's setting). "
        "Sampling: `DDIMScheduler` (eta 0), 50 steps."
    ),
    "digits-flux": (
        "rectified flow as FLUX: `x_t = (1 - t) x0 + t noise`, the model predicts `noise - x0` (MSE), t "
        "logit-normal(0, 1) (SD3/FLUX training). Sampling: `FlowMatchEulerDiscreteScheduler` (shift 1), 50 "
        "steps; the transformer gets `timestep = sigma` in [0, 1] as in FluxPipeline."
    ),
}


def write_card(name: str, out: Path) -> None:
    """The model card ``README.md`` from ``training.json`` and ``evaluation.json``."""
    meta = json.loads((out / "training.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    accuracy = [
        f"guidance {r['guidance']:g}{' (none)' if r['guidance'] == 1 else ''}: **{100 * r['accuracy']:.1f} %** "
        f"(per class 0-9: {', '.join(f'{c:.2f}' for c in r['per_class'])}); grid `samples_{key}.png` (rows: class)"
        for key, r in evaluation.items() if isinstance(r, dict)
    ]  # fmt: skip
    items = [
        "**Data**: scikit-learn's `load_digits` (1797 8x8 digits, ships with scikit-learn, no download), pixel "
        "values 0..16 scaled to [-1, 1], upsampled bilinearly to 16x16; one channel, pixel space (no VAE).",
        f"**Architecture**: {ARCHITECTURE[name]}",
        f"**Objective**: {OBJECTIVE[name]}",
        f"**Conditioning / guidance**: class labels 0-9; {100 * meta['label_dropout']:.0f} % of training labels "
        "replaced by the null class 10, so classifier-free guidance `u + g (c - u)` works (the null class is "
        "`builtin.NULL_CLASS`, as DiTPipeline's `class_null`).",
        f"**Training**: seed {meta['seed']}, {meta['steps']} steps, batch {meta['batch']}, AdamW lr {meta['lr']} "
        f"(linear warm-up {meta['warmup']} steps, cosine to 10 %), grad-norm clip 1, EMA {meta['ema']} (the EMA "
        f"weights ship), {meta['threads']} CPU thread, torch {meta['torch']}. Wall time "
        f"{meta['wall_seconds'] / 60:.1f} min on a shared 2-core machine busy with other jobs. Final loss (EMA "
        f"of the per-step loss): {meta['final_loss_ema']}. Curve: `train_log.tsv`, `loss.png`.",
        f"**Command**: `{meta['command']}` (then `--evaluate-only` re-samples and rewrites this card).",
        f"**Weights**: fp16 storage, {size / 1e6:.2f} MB ({', '.join(f.name for f in files)}); `load` casts to "
        "the requested dtype. The accuracy below is measured on these fp16-stored weights run in fp32.",
        f"**Sample accuracy**: {evaluation['samples']} samples ({evaluation['samples'] // builtin.NUM_CLASSES} per "
        f"class), {evaluation['steps']} steps, no step cache, seed {evaluation['seed']}, labelled by "
        "`builtin.classify` (an RBF SVM on the same upsampled digits: "
        f"{100 * evaluation['real_digits_accuracy']:.1f} % on the training digits, ~97 % in 5-fold "
        "cross-validation):",
        *(f"  {line}" for line in accuracy),
        "**Limitations**: 16x16 upsampled 8x8 digits only; the model has seen each of the 1797 digits "
        f"~{meta['steps'] * meta['batch'] / 1797:.0f} times and may reproduce training images; the trajectory "
        "of a model this small is smoother than a production model's, so step-cache results on it are "
        "indicative, not a substitute for a real model.",
    ]
    lines = [f"# {name}", "", "A small class-conditional diffusion transformer trained by this project for the "
             f"benchmark and tests (`dit_kernels.bench.builtin.load(\"{name}\")`). Not a general-purpose model.", ""]
    for item in items:
        indent = "  " if item.startswith("  ") else ""
        lines += textwrap.wrap(item.strip(), 110, initial_indent=indent + "- ", subsequent_indent=indent + "  ",
                               break_on_hyphens=False, break_long_words=False)  # fmt: skip
    (out / "README.md").write_text("\n".join(lines[:2]) + "\n" + textwrap.fill(lines[2], 110) + "\n"
                                   + "\n".join(lines[3:]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=builtin.NAMES)
    parser.add_argument("--evaluate-only", action="store_true", help="skip training; sample and write the card")
    parser.add_argument("--steps", type=int, help="override the training steps (smoke runs)")
    parser.add_argument("--out", type=Path, help="output folder (default: the package's assets/<name>)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or builtin.ASSETS / args.name
    if args.steps is not None:
        HPARAMS[args.name]["steps"] = args.steps
    if not args.evaluate_only:
        train(args.name, out)
    result = evaluate(args.name, out)
    write_card(args.name, out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
