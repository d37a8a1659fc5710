"""``python -m dit_kernels.bench.op_table``: eager diffusers-style ops vs dit_kernels' fused ops, same
process, same inputs, interleaved repetitions, medians; prints a markdown table with the device it ran on.

Measures the norm/modulate op family at real model shapes on the best backend here (Triton on a GPU; the
torch reference on CPU, where fusion saves little: the table says which backend ran).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dit_kernels import backends
from dit_kernels.bench.ops import H100_HBM_BYTES_PER_S, MODEL_SHAPES, OpCase, cases
from dit_kernels.bench.report import device_name, markdown, write

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dit_kernels.bench.op_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="input dtype (default bf16)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--backend", default=None, choices=backends.BACKENDS, help="fused-op backend (default: the device's best)"
    )
    parser.add_argument("--models", nargs="+", choices=MODEL_SHAPES, default=None, help="model shapes to run")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per path (default 50 GPU, 5 CPU)")
    parser.add_argument("--out", type=Path, default=None, help="also write results.md and results.json here")
    return parser.parse_args(argv)


def _timer(device: torch.device):
    if device.type == "cuda":

        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return run

    def run(fn) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return run


def _max_abs(got, want) -> float:
    pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
    return max((a.double() - b.double()).abs().max().item() for a, b in pairs)


def measure(case: OpCase, dtype, device, backend, repeats: int) -> dict:
    """Median ms of eager and fused (interleaved, after one warm-up each) and both errors vs fp32."""
    tensors = case.inputs(dtype, device)
    truth = case.eager(**case.inputs(torch.float32, device))
    eager = lambda: case.eager(**tensors)  # noqa: E731
    fused = lambda: case.fused(**tensors, backend=backend)  # noqa: E731
    eager_err, fused_err = _max_abs(eager(), truth), _max_abs(fused(), truth)
    timer, times = _timer(device), {"eager": [], "fused": []}
    for _ in range(repeats):
        times["eager"].append(timer(eager))
        times["fused"].append(timer(fused))
    eager_ms, fused_ms = (statistics.median(times[k]) for k in ("eager", "fused"))
    row = {
        "op": case.name,
        "model": case.model,
        "shape": "x".join(map(str, case.shape)),
        "eager_ms": eager_ms,
        "fused_ms": fused_ms,
        "speedup": eager_ms / fused_ms,
        "eager_err": eager_err,
        "fused_err": fused_err,
    }
    if device.type == "cuda":
        row["fused_GBps"] = case.min_bytes(dtype) / (fused_ms * 1e-3) / 1e9
        row["floor_us"] = case.min_bytes(dtype) / H100_HBM_BYTES_PER_S * 1e6
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    backend = backends.resolve(args.backend, device)
    repeats = args.repeats or (50 if device.type == "cuda" else 5)
    header = (
        f"device: {device_name(device)} | dtype: {args.dtype} | fused backend: {backend} | repeats: {repeats} "
        f"(medians, interleaved) | torch {torch.__version__}\n"
        "errors are max-abs vs the same eager math in fp32"
    )
    print(header, flush=True)
    rows = []
    for case in cases(args.models):
        rows.append(measure(case, dtype, device, backend, repeats))
        print(f"  {case.model:22s} {case.name:36s} {rows[-1]['speedup']:.2f}x", flush=True)
    table = markdown(rows, header)
    print("\n" + table)
    if args.out:
        write(args.out, table, {"header": header, "rows": rows})


if __name__ == "__main__":
    main()
