"""``torchrun --nproc-per-node N -m dit_kernels.bench --parallel ulysses=N[,ring=M]``: the main job's
denoising loop with the transformer's sequence sharded over the ranks (``dit_kernels.enable_parallelism``),
against the same loop in one process at the same config.

Every rank builds the same seeded model and inputs and times, interleaved after a warm-up, each patched path
(patched; + CUDA graphs with --cuda-graphs; + step cache per --cache threshold) twice: alone (one process,
as if it had the whole model to itself) and sharded. Rank 0 prints one row per path: the slowest rank's
median ms/step each way, the speed-up, and the sharded output's difference from the one-process output;
the notes give every rank's own timings. The text length is rounded down to a multiple of the rank count
when the family shards its text. On a CPU machine the ranks share its cores (gloo), so the times show the
cost of the communication, not a multi-device speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import torch
import torch.distributed as dist

import dit_kernels
from dit_kernels.bench import e2e, timing, zoo
from dit_kernels.bench.report import device_name, markdown
from dit_kernels.parallel.enable import PROCESS_GROUP_BACKENDS

DEGREES = {"ulysses": "ulysses_degree", "ring": "ring_degree"}


def degrees(text: str) -> dict[str, int]:
    """``--parallel ulysses=2,ring=2`` -> ``{"ulysses_degree": 2, "ring_degree": 2}`` (absent degrees: 1)."""
    found = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in DEGREES or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected ulysses=N and/or ring=M separated by a comma, got {text!r}")
        found[DEGREES[key.strip()]] = int(value)
    return found


def run(args: argparse.Namespace, setting: e2e.Setting) -> None:
    """One rank's part of the parallel benchmark (``args``: the bench's parsed arguments)."""
    device = torch.device(setting.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(PROCESS_GROUP_BACKENDS.get(device.type, "gloo"))
    setting = dataclasses.replace(setting, device=str(device))
    graphed = args.cuda_graphs and device.type == "cuda"
    torch.manual_seed(0)
    base = zoo.to_dtype(zoo.build(setting.family, setting.config).to(device), setting.dtype)
    shape = setting.shape(base)
    world = dist.get_world_size()
    shape = dataclasses.replace(shape, text_len=shape.text_len // world * world)
    inputs = zoo.transformer_inputs(setting.family, base, shape, setting.dtype, device)
    variants = [("patched", {})] + [("patched + CUDA graphs", {"cuda_graphs": True})] * graphed + [
        (f"patched + cache {t:g}", {"cache": t}) for t in args.cache]  # fmt: skip
    paths = [(label, *(_patched(base, options, args, sharded) for sharded in (False, True)))
             for label, options in variants]  # fmt: skip
    outputs = {(label, i): path.denoise(setting, inputs) for label, *pair in paths for i, path in enumerate(pair)}
    times = {key: [] for key in outputs}
    for _ in range(args.repeats):
        for label, *pair in paths:
            for i, path in enumerate(pair):
                dist.barrier()
                times[label, i].append(timing.time_ms(lambda: path.denoise(setting, inputs), setting.device))
    mine = {key: statistics.median(t) / setting.steps for key, t in times.items()}
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        print(_report(args, setting, shape, base, paths, outputs, ranks, device))
    dist.destroy_process_group()


def _patched(base: torch.nn.Module, options: dict, args: argparse.Namespace, sharded: bool) -> e2e.Path:
    """A patched copy of ``base`` sharing its weights, sharded over the ranks when ``sharded``."""
    model = e2e._sharing_weights(base)
    if sharded:
        dit_kernels.enable_parallelism(model, **args.parallel)
    dit_kernels.patch(model, backend=args.backend, **({"cuda_graphs": False} | options))
    return e2e.Path("", model, cache=options.get("cache"))


def _report(args, setting, shape, base, paths, outputs, ranks, device) -> str:
    rows, notes = [], []
    for label, *_ in paths:
        alone, sharded = (max(rank[label, i] for rank in ranks) for i in (0, 1))
        got, want = outputs[label, 1], outputs[label, 0]
        rows.append({"path": label, "ms/step one process": alone, f"ms/step {len(ranks)} ranks": sharded,
                     "speed-up": alone / sharded, "max-abs vs one process": (got - want).abs().max().item(),
                     "PSNR vs one process (dB)": e2e.psnr(got, want)})  # fmt: skip
        notes.append(f"{label}: " + ", ".join(f"rank {r} {t[label, 0]:.4g} / {t[label, 1]:.4g} ms/step"
                                              for r, t in enumerate(ranks)) + " (one process / sharded)")  # fmt: skip
    if device.type == "cpu":
        notes.append("CPU: the ranks share this machine's cores (gloo); the times show the cost of the "
                     "communication, not a multi-device speed-up")  # fmt: skip
    layout = " x ".join(f"{key} {args.parallel.get(name, 1)}" for key, name in DEGREES.items())
    header = (f"device: {device_name(device)} x {len(ranks)} ranks ({dist.get_backend()}) | {layout} | model: "
              f"{setting.family} ({setting.config}) | dtype: {str(setting.dtype).removeprefix('torch.')} | batch "
              f"{shape.batch}, tokens {zoo.tokens(setting.family, base.config, shape)}+{shape.text_len} | steps: "
              f"{setting.steps} | repeats: {args.repeats} (medians, interleaved, warm-up excluded) | torch "
              f"{torch.__version__}")  # fmt: skip
    return "\n" + markdown(rows, header) + "".join(f"\n- {note}" for note in notes)
