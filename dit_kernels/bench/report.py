"""Output of the benchmark CLIs: the device line, markdown tables, JSON, and the optional PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TITLE_WIDTH = 95  # characters per title line: fits a 7-inch figure at font size 8 with room to spare


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


def wrap_header(header: str, width: int = TITLE_WIDTH) -> str:
    """The header's ``" | "``-separated fields on lines of at most ``width`` characters (a field longer
    than that on a line of its own), so a plot title fits its figure."""
    lines: list[str] = []
    for field in header.split(" | "):
        if lines and len(lines[-1]) + 3 + len(field) <= width:
            lines[-1] += " | " + field
        else:
            lines.append(field)
    return "\n".join(lines)


def write(out: Path, table: str, payload: dict, plot_rows: list[dict] | None = None, title: str = "",
          spans: list[tuple[float, float]] | None = None) -> list[str]:  # fmt: skip
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
    figure = plot(plot_rows, title, spans)
    figure.savefig(out / "results.png", dpi=120)
    plt.close(figure)
    return []


def plot(rows: list[dict], title: str, spans: list[tuple[float, float]] | None = None):
    """A matplotlib figure: one bar per row (``path``, ``ms/step``), its ``vs eager`` ratio printed after
    it, ``spans`` (each row's (low, high), e.g. its quartiles) as error bars, ``title`` (the header line)
    wrapped to the figure's width above."""
    import matplotlib.pyplot as plt

    title = wrap_header(title)
    lines = title.count("\n") + 1
    figure, axis = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.3 + 0.15 * lines), layout="constrained")
    widths = [row["ms/step"] for row in rows]
    errors = None if spans is None else [[w - low for w, (low, _) in zip(widths, spans)],
                                         [high - w for w, (_, high) in zip(widths, spans)]]  # fmt: skip
    axis.barh([row["path"] for row in rows], widths, xerr=errors, color="#4a7fb5", ecolor="#333333", capsize=3)
    for y, row in enumerate(rows):
        end = row["ms/step"] if spans is None else max(row["ms/step"], spans[y][1])
        axis.text(end, y, f" {row['vs eager']:.2f}x", va="center")
    axis.margins(x=0.15)  # room for the ratio printed after the longest bar
    axis.invert_yaxis()
    axis.set_xlabel("ms per denoising step (median" + ("; error bars: IQR)" if spans else ")"))
    figure.suptitle(title, fontsize=8)  # the figure's width, not the axes': the labels take the left part
    return figure
