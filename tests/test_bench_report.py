"""The benchmark's plot: its title (the long header line) must fit the figure."""

import pytest

from dit_kernels.bench.report import TITLE_WIDTH, plot, wrap_header

HEADER = (
    "device: CPU (2 threads) | model: flux (tiny) | dtype: fp32 | image 256px, batch 1, tokens 256+77 | "
    "steps: 20 | repeats: 3 (medians, interleaved, warm-up excluded) | torch 2.13.0+cpu"
)
ROWS = [
    {"path": "eager diffusers", "ms/step": 3.0, "vs eager": 1.0},
    {"path": "patched + cache 0.3 + CUDA graphs", "ms/step": 1.2, "vs eager": 2.5},
]


def test_wrap_header_breaks_between_fields_only():
    lines = wrap_header(HEADER).split("\n")
    assert len(lines) > 1 and all(len(line) <= TITLE_WIDTH for line in lines)
    assert " | ".join(lines) == HEADER
    assert wrap_header("a single field " + "x" * 200) == "a single field " + "x" * 200  # too long: left whole


@pytest.mark.parametrize("spans", [None, [(2.8, 3.6), (1.0, 1.9)]], ids=["bars", "bars-with-IQR"])
def test_plot_title_and_labels_lie_inside_the_figure(spans):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plot(ROWS, HEADER, spans)
    try:
        renderer = figure.canvas.get_renderer()
        figure.draw(renderer)
        box = figure.bbox
        texts = [figure._suptitle, *figure.axes[0].texts, *figure.axes[0].get_yticklabels()]
        for text in texts:
            extent = text.get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1, f"{text.get_text()!r} is cut off: {extent} vs {box}"
            assert box.y0 <= extent.y0 and extent.y1 <= box.y1, f"{text.get_text()!r} is cut off: {extent} vs {box}"
    finally:
        plt.close(figure)
