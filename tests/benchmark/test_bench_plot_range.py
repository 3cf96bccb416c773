"""``mpvg bench``'s chart shows every bar: the y axis spans each ratio, also far outside the usual 0.80-1.10."""

from __future__ import annotations

import math

import pytest
from test_bench_cuda import _record, _result

from mpvg_kernels.benchmark import models as B


def _bars_and_ranges(monkeypatch, result: dict, tmp_path) -> list[tuple[float, tuple[float, float]]]:
    """(bar height, the y range of its axes) of every bar of ``B.plot(result)``, read when the figure is saved."""
    import matplotlib.figure

    seen: list[tuple[float, tuple[float, float]]] = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        for ax in fig.axes:
            seen.extend((p.get_height(), ax.get_ylim()) for p in ax.patches)
        return save(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    B.plot(result, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").is_file()
    return seen


@pytest.mark.parametrize("slow_s,fast_s", [(0.025, 0.004), (0.0101, 0.0099)])
def test_plot_y_axis_includes_every_bar(tmp_path, monkeypatch, slow_s, fast_s) -> None:
    """Ratios 0.4 and 2.5 (and ones near 1): each bar's top lies inside its panel's y range."""
    pytest.importorskip("matplotlib")
    result = _result("cpu")
    result["records"] = [
        _record(m, t, s) for t in B.TASKS for m, s in (("default", 0.010), ("mpvg", slow_s), ("lape", fast_s))
    ]
    bars = _bars_and_ranges(monkeypatch, result, tmp_path)
    heights = [h for h, _ in bars if not math.isnan(h)]
    assert len(heights) == 3 * len(B.TASKS)  # default, mpvg, lape per task panel
    outside = [(round(h, 3), lim) for h, lim in bars if not math.isnan(h) and not lim[0] <= h <= lim[1]]
    assert outside == []
    # the usual range is kept when every bar fits in it
    if slow_s == 0.0101:
        assert all(lim == pytest.approx((0.8, 1.1)) for _, lim in bars)
