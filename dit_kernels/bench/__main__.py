"""``python -m dit_kernels.bench`` (also ``dit-kernels-bench``): the README's main job.

With neither ``--config`` nor ``--parallel``, the trained built-in models (``dit_kernels.bench.trained``:
images, quality and diffusers' own caches; its own ``--help``). With ``--config tiny|small|real``:

A denoising loop of one family's transformer (random weights, built from a config: no download): eager
diffusers, ``dit_kernels.patch``-ed, patched + step cache (--cache; by default at the default threshold),
patched + CUDA graphs (--cuda-graphs, CUDA only) and torch.compile (--compile); same process, same inputs,
interleaved rounds after a warm-up (``bench.timing``: at least 5, until a time budget). Prints a markdown
table (median ms/step, IQR, the ratio vs eager with an interval), the noise level and machine load, and
warnings where the noise makes a ratio meaningless; ``--out DIR`` also writes results.md, results.json (what
ran: resolved device, dtype, config and op backends; every sample; the load) and results.png (matplotlib,
optional).
Op-level tables: ``python -m dit_kernels.bench.op_table``; the launch/traffic model of each family's
blocks at real shapes: ``python -m dit_kernels.bench.traffic``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from dit_kernels.bench import e2e, parallel, timing, trained
from dit_kernels.cache import CacheConfig
from dit_kernels.bench.report import device_name, markdown, write
from dit_kernels.models import DEFAULT_FAMILY, FAMILY_MODULES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dit_kernels.bench", description=__doc__.split("\n\n")[1].replace("\n", " ")
    )
    parser.add_argument("--model", choices=FAMILY_MODULES, default=DEFAULT_FAMILY,
                        help=f"model family with a patcher (default {DEFAULT_FAMILY})")
    parser.add_argument(
        "--config", choices=("tiny", "small", "real"), default=None,
        help="widths: tiny (ms per forward on CPU; default there), small (DiT-S/2; other families: real width, "
        "fewest blocks; default on CUDA), real (published config: GPU only in practice)",
    )  # fmt: skip
    parser.add_argument("--size", type=int, default=256, help="image side in pixels; latent side = size / 8")
    parser.add_argument("--batch", type=int, default=1, help="images per transformer call (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per run (default 20)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--backend", default="auto", help="patch backend: auto, triton, cuda, torch")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile(eager) row")
    parser.add_argument("--cache", type=_thresholds, default=(CacheConfig().threshold,), metavar="T1[,T2,...]|none",
                        help="a patched + step-cache row per threshold (dit_kernels.CacheConfig(threshold=T); default: "
                        f"the default threshold {CacheConfig().threshold}; none: no cache row)")  # fmt: skip
    parser.add_argument("--cuda-graphs", action="store_true", help="add a patched + CUDA graphs row (CUDA only)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (one run of each path, interleaved; "
                        f"default: at least {timing.MIN_REPEATS}, then until --budget seconds)")
    parser.add_argument("--budget", type=float, default=timing.BUDGET_S, metavar="SECONDS",
                        help=f"timed seconds after which rounds stop, unless --repeats (default {timing.BUDGET_S:g})")
    parser.add_argument("--out", type=Path, default=None, help="write results.md, results.json, results.png here")
    parser.add_argument("--parallel", type=parallel.degrees, default=None, metavar="ulysses=N[,ring=M]",
                        help="under torchrun: patched paths sharded over the ranks vs one process (bench/parallel.py)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(arg.split("=")[0] in ("--config", "--parallel") for arg in argv):  # default: the trained models
        return trained.main(argv)
    args = parse_args(argv)
    requested = dict(vars(args))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.config = args.config or ("small" if device.type == "cuda" else "tiny")
    setting = e2e.Setting(args.model, args.config, args.size, args.batch, args.steps, DTYPES[dtype_name], str(device))
    if args.parallel:  # fixed rounds: every rank must time the same number
        args.repeats = args.repeats or timing.MIN_REPEATS
        return parallel.run(args, setting)
    unavailable = []
    args.cuda_graphs = args.cuda_graphs and device.type == "cuda"
    if requested["cuda_graphs"] and not args.cuda_graphs:
        unavailable.append(f"--cuda-graphs row skipped: CUDA graphs are unavailable on {device.type} (no CUDA device)")
    with tqdm(desc="timed runs", leave=False) as bar:
        result = e2e.run(setting, repeats=args.repeats, budget_s=args.budget, compile_=args.compile,
                         backend=args.backend, cuda_graphs=args.cuda_graphs, caches=args.cache,
                         progress=bar.update)  # fmt: skip
    header = (
        f"device: {device_name(device)} | model: {args.model} ({args.config}) | dtype: {dtype_name} | "
        f"image {args.size}px, batch {args.batch}, tokens {result['tokens']} | steps: {args.steps} | "
        f"{result['timing'].describe()} | torch {torch.__version__}"
    )
    table = markdown(result["rows"], header)
    notes = result["notes"] + unavailable
    print("\n" + table + "".join(f"\n- {note}" for note in notes))
    print("".join(f"- warning: {line}\n" for line in result["warnings"]), end="")
    if args.out:
        measured = result["timing"]
        payload = {"header": header, "setting": _what_ran(args, setting, result), "requested": requested,
                   "rows": result["rows"], "notes": notes, "warnings": result["warnings"],
                   "timing": measured.as_dict(base=result["rows"][0]["path"])}  # fmt: skip
        quartiles = [measured.spread(row["path"]) for row in result["rows"]]
        spans = [(q.q1 / args.steps, q.q3 / args.steps) for q in quartiles]
        for note in write(args.out, table, payload, result["rows"], header, spans):
            print(f"- {note}")


def _what_ran(args: argparse.Namespace, setting: e2e.Setting, result: dict) -> dict:
    """The resolved setting for results.json: the device, dtype, config and op backends that ran (not the
    command line's defaults), the rounds timed and the torch version."""
    return {"model": args.model, "config": args.config, "size": args.size, "batch": args.batch, "steps": args.steps,
            "dtype": str(setting.dtype).removeprefix("torch."), "device": setting.device,
            "device_name": device_name(torch.device(setting.device)), "backend": args.backend, "ops": result["ops"],
            "compile": args.compile, "cuda_graphs": args.cuda_graphs, "cache": list(args.cache),
            "rounds": result["timing"].rounds, "budget_s": None if args.repeats else args.budget,
            "torch": torch.__version__}  # fmt: skip


def _thresholds(text: str) -> tuple[float, ...]:
    """``--cache 0.05,0.1``: one step-cache row per threshold; ``none``: no row."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thresholds like 0.05,0.1, got {text!r}") from None


if __name__ == "__main__":
    main()
