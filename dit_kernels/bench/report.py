"""Output of the benchmark CLIs: the device line, markdown tables, JSON, and the optional PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def markdown(rows: list[dict], header: str) -> str:
    columns = list(rows[0])
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, table: str, payload: dict, plot_rows: list[dict] | None = None, title: str = "") -> list[str]:
    """results.md, results.json and (matplotlib permitting) results.png in ``out``; returns notes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    if plot_rows is None:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["results.png not written: matplotlib is not installed (pip install 'dit-kernels[plot]')"]
    figure, axis = plt.subplots(figsize=(7, 0.6 * len(plot_rows) + 1.5))
    labels = [row["path"] for row in plot_rows]
    axis.barh(labels, [row["ms/step"] for row in plot_rows], color="#4a7fb5")
    for y, row in enumerate(plot_rows):
        axis.text(row["ms/step"], y, f" {row['vs eager']:.2f}x", va="center")
    axis.invert_yaxis()
    axis.set_xlabel("ms per denoising step (median)")
    axis.set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "results.png", dpi=120)
    plt.close(figure)
    return []
