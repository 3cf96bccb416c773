"""``mpvg analyze``'s figures: matplotlib's object API on the Agg canvas (no pyplot, no global state). Each
``plot_*`` function draws one PNG from :class:`~mpvg_kernels.analysis.collect.ModelAnalysis` results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .collect import ModelAnalysis, pe_bias_c, pos_map_terms, term_correlation_map, term_grid
from .stats import mean_pairwise_cosine, vector_stats


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _sym_heatmap(fig: Any, ax: Any, data: Tensor, title: str, cmap: str = "RdBu_r") -> None:
    """Tokens x channels heatmap, colour scale symmetric around 0, with its own colour bar."""
    arr = data.detach().to(torch.float64).cpu().numpy()
    lim = float(abs(arr).max()) or 1.0
    im = ax.imshow(arr, aspect="auto", cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("channel")
    ax.set_ylabel("patch token")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)


def plot_correlation(analyses: Sequence[ModelAnalysis], path: str | Path) -> Path:
    """One line per model: mean token/PE correlation per block (band: +-1 std over images), plus the last-LN point."""
    fig = _figure(7.5, 4.6)
    ax = fig.subplots()
    depth = 0
    for a in analyses:
        if "correlation" in a.skipped or not a.has_pe_stream:
            continue
        depth = max(depth, a.spec.depth)
        xs = [l for l, c in enumerate(a.corr) if c is not None]
        m = [float(a.corr[l].mean()) for l in xs]  # type: ignore[union-attr]
        sd = [float(a.corr[l].std(unbiased=False)) for l in xs]  # type: ignore[union-attr]
        (line,) = ax.plot(xs, m, marker="o", label=f"{a.spec.label} (pe={a.spec.pe})")
        ax.fill_between(xs, [u - v for u, v in zip(m, sd, strict=True)], [u + v for u, v in zip(m, sd, strict=True)],
                        color=line.get_color(), alpha=0.15, linewidth=0)
        if a.corr_last is not None:
            ax.errorbar([a.spec.depth], [float(a.corr_last.mean())], yerr=[float(a.corr_last.std(unbiased=False))],
                        marker="D", markerfacecolor="white", color=line.get_color(), capsize=3)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(range(depth + 1)), [str(l) for l in range(depth)] + ["last LN"])
    ax.set_xlim(-0.5, depth + 0.5)
    ax.set_xlabel("block l (0-based); 'last LN': LN(x_{L+1}) vs LN'_last(pos_0), mpvg only")
    ax.set_ylabel("Pearson r( LN1_l(x_l), PE_l )")
    n = max((a.num_images for a in analyses), default=0)
    ax.set_title(f"Token embedding vs PE after their LayerNorms, per block\n(mean over {n} images; band and bar: "
                 "±1 std over images)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    path = Path(path)
    fig.savefig(path)
    return path


def plot_heatmaps(a: ModelAnalysis, path: str | Path) -> Path:
    """Row 1: LN1_l(x_l) averaged over the images; row 2: the PE term of block l; one column per chosen block."""
    cols = len(a.layers)
    rows = 2 if a.has_pe_stream else 1
    fig = _figure(3.2 * cols + 0.5, 3.0 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for j, l in enumerate(a.layers):
        _sym_heatmap(fig, axes[0][j], a.token_mean[l], f"block {l}: LN1(x_{l}), mean of {a.num_images}")
        if rows == 2:
            pe = a.pe[l]
            if pe is None:
                axes[1][j].set_axis_off()
                axes[1][j].text(0.5, 0.5, f"block {l}: no PE term\n(pe={a.spec.pe})", ha="center", va="center",
                                transform=axes[1][j].transAxes)
            else:
                r = float(a.corr[l].mean()) if a.corr[l] is not None else math.nan  # type: ignore[union-attr]
                _sym_heatmap(fig, axes[1][j], pe, f"block {l}: PE term, r = {r:+.3f}")
    note = "" if a.has_pe_stream else " (pe=default: no per-layer PE stream, token embedding only)"
    fig.suptitle(f"{a.spec.label}: token embedding{' and PE' if rows == 2 else ''} per block{note}")
    path = Path(path)
    fig.savefig(path)
    return path


def plot_last_ln_heatmaps(a: ModelAnalysis, path: str | Path) -> Path:
    """Before/after the last LN: x_{L+1}, LN(x_{L+1}) [, LN'_last(pos_0), their sum]; mean over images and image 0."""
    has_pe = a.last_pe is not None
    cols = 4 if has_pe else 2
    fig = _figure(3.3 * cols + 0.5, 6.6)
    axes = fig.subplots(2, cols, squeeze=False)
    rows = ((f"mean of {a.num_images}", a.last_in_mean, a.last_norm_mean),
            ("image 0", a.last_in_sample, a.last_norm_sample))
    for i, (what, x_in, x_norm) in enumerate(rows):
        _sym_heatmap(fig, axes[i][0], x_in, f"before last LN: x_(L+1) ({what})")
        _sym_heatmap(fig, axes[i][1], x_norm, f"LN(x_(L+1)) ({what})")
        if has_pe:
            assert a.last_pe is not None
            _sym_heatmap(fig, axes[i][2], a.last_pe, "PE term LN'_last(pos_0)")
            _sym_heatmap(fig, axes[i][3], x_norm + a.last_pe, f"after: LN(x) + LN'_last(pos_0) ({what})")
    fig.suptitle(f"{a.spec.label} (pe={a.spec.pe}): before / after the last LayerNorm")
    path = Path(path)
    fig.savefig(path)
    return path


def plot_last_ln_params(a: ModelAnalysis, path: str | Path) -> Path:
    """Per channel: the last LN's gamma and beta, and (mpvg) the pooled PE bias c."""
    c = pe_bias_c(a)
    rows = 3 if c is not None else 2
    fig = _figure(8.0, 2.3 * rows + 0.5)
    axes = fig.subplots(rows, 1, squeeze=False, sharex=True)
    ch = list(range(a.spec.dim))
    series = [("gamma", a.spec.last_ln_weight), ("beta", a.spec.last_ln_bias)]
    if c is not None:
        series.append(("c = mean_n LN'_last(pos_0)", c))
    for ax, (name, v) in zip([r[0] for r in axes], series, strict=True):
        st = vector_stats(v)
        ax.bar(ch, v.detach().to(torch.float64).cpu().numpy(), width=1.0, color="tab:blue")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_ylabel(name.split(" ")[0])
        ax.set_title(f"{name}: mean {st['mean']:+.4f}, var {st['var']:.4f}, min {st['min']:+.3f}, "
                     f"max {st['max']:+.3f}", fontsize=9)
    axes[-1][0].set_xlabel("channel")
    fig.suptitle(f"{a.spec.label} (pe={a.spec.pe}): last LayerNorm parameters")
    path = Path(path)
    fig.savefig(path)
    return path


def plot_pos_maps(a: ModelAnalysis, path: str | Path) -> Path:
    """Position-correlation maps (LaPE Figs. 3-4): cosine of the reference token's PE to every patch's PE."""
    terms = pos_map_terms(a)
    h, w = a.spec.grid
    r0, c0 = a.ref_token // w, a.ref_token % w
    cols = min(len(terms), 7)
    rows = math.ceil(len(terms) / cols)
    fig = _figure(2.3 * cols + 1.0, 2.4 * rows + 0.7)
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for k, ax in enumerate(ax for row in axes for ax in row):
        if k >= len(terms):
            ax.set_axis_off()
            continue
        name, pe = terms[k]
        m = term_correlation_map(pe, a.spec.grid, a.ref_token).cpu().numpy()
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
        g, ref = term_grid(a.spec.grid, a.ref_token, pe.shape[0])  # a staged model's later stages: a coarser grid
        ax.plot([ref % g[1]], [ref // g[1]], marker="x", color="black", markersize=6)
        ax.set_title(f"{name}\nmean cos {mean_pairwise_cosine(pe):+.2f}", fontsize=9)
        ax.set_xlabel("patch column")
        ax.set_ylabel("patch row")
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02, label="cosine similarity to x-marked token")
    fig.suptitle(f"{a.spec.label} (pe={a.spec.pe}): position correlation of token {a.ref_token} "
                 f"(row {r0}, col {c0}) on the {h}x{w} patch grid")
    path = Path(path)
    fig.savefig(path)
    return path

