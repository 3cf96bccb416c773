"""``mpvg analyze``: the MPVG and LaPE papers' measurements, on our own (trained or fresh) models.

What is measured (block indices l = 0..L are 0-based, as in DESIGN.md and the MPVG paper's Eqs. 2-6):

* **Token/PE correlation** (MPVG Figs. 2 and 4). For block l that adds a PE term to its attention input,
  ``T_l = LN1_l(x_l)`` (the normalised token term, affine included, [B, N, D]) and ``P_l`` (the PE term as added
  at block l, [N, D]). For every image b the Pearson correlation of the flattened ``T_l[b]`` and ``P_l`` over all
  N x D entries (patch tokens only, a class token is dropped) is computed in float64; the reported number is the
  mean over the images (``std`` is the spread over images). The paper's Fig. 8 adds an "after Last LN" point:
  for ``mpvg`` the same correlation between ``LN(x_{L+1})`` and ``LN'_last(pos_0)`` is reported as ``last_ln``.
* **Heatmaps** (tokens x channels) of ``T_l`` (mean over the images, as in MPVG Fig. 2) and ``P_l`` per chosen
  block, and before/after the last LN (MPVG Figs. 6-7): ``x_{L+1}``, ``LN(x_{L+1})``, for ``mpvg`` also
  ``LN'_last(pos_0)`` and the sum, both averaged over the images and for one image.
* **Last-LN statistics** (MPVG appendix A): mean/variance/std/min/max of the last LN's gamma and beta over the D
  channels (population variance, ddof=0; the paper reports beta variance 0.2387 for PVG and 0.0193 for MPVG on
  DeiT-Ti), the MPVG pooled PE bias ``c = mean_n LN'_last(pos_0)_n`` (a D-vector) and the cosine similarity of
  the token average before and after the last step (MPVG Fig. 6).
* **Position-correlation maps** (LaPE Figs. 3-4): cosine similarity between one reference token's PE row and
  every patch token's PE row, reshaped to the patch grid, for the input ``pos_embed``, each block's PE term and
  (``mpvg``) the last-LN PE term. ``mean_cosine`` (mean over all token pairs i != j) summarises how global a map is.

Which figure applies to which PE mode: see :func:`figure_applies`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError

FIGURES: tuple[str, ...] = ("correlation", "heatmaps", "last-ln", "pos-maps")
PE_STREAM_MODES: tuple[str, ...] = ("lape", "pvg", "mpvg")
PE_MODES: tuple[str, ...] = ("default", *PE_STREAM_MODES)

CORRELATION_DEFINITION = (
    "Pearson correlation between LN1_l(x_l)[b] (normalised token term of block l, affine included) and the PE term "
    "added at block l, both flattened over patch tokens x channels (class token dropped), computed per image b in "
    "float64; 'mean' and 'std' are over the images. 'last_ln' (mpvg only): the same between LN(x_{L+1}) and "
    "LN'_last(pos_0). null where a block has no PE term."
)


class NotApplicableError(UserError):
    """A requested figure does not apply to a model's PE mode (e.g. the correlation for ``default``)."""


# ----------------------------------------------------------------------------------------------------------------
# Numbers over tensors
# ----------------------------------------------------------------------------------------------------------------


def token_pe_correlation(tokens: Tensor, pe: Tensor) -> Tensor:
    """Pearson correlation of each image's ``tokens[b]`` ([B, N, D]) with ``pe`` ([N, D]), flattened over N x D.

    Returns a float64 tensor [B]. An image (or PE) with zero variance gives NaN.
    """
    if tokens.dim() != 3 or pe.dim() != 2 or tuple(tokens.shape[1:]) != tuple(pe.shape):
        raise ValueError(f"tokens must be [B, N, D] and pe [N, D] with the same N, D; got {list(tokens.shape)} "
                         f"and {list(pe.shape)}")
    t = tokens.detach().to(torch.float64).flatten(1)
    p = pe.detach().to(torch.float64).flatten()
    t = t - t.mean(dim=1, keepdim=True)
    p = p - p.mean()
    return (t @ p) / (t.norm(dim=1) * p.norm())


def position_correlation(pe: Tensor) -> Tensor:
    """Cosine similarity between every pair of rows of ``pe`` ([N, D]) -> float64 [N, N] (LaPE Sec. 3.3)."""
    if pe.dim() != 2:
        raise ValueError(f"pe must be [N, D]; got {list(pe.shape)}")
    p = torch.nn.functional.normalize(pe.detach().to(torch.float64), dim=1)
    return p @ p.T


def position_correlation_map(pe: Tensor, grid: tuple[int, int], ref_token: int) -> Tensor:
    """Cosine similarity of patch ``ref_token``'s PE to every patch's PE, reshaped to ``grid`` -> float64 [h, w]."""
    h, w = grid
    if pe.shape[0] != h * w:
        raise ValueError(f"pe has {pe.shape[0]} rows but the grid {h}x{w} has {h * w} patches")
    if not 0 <= ref_token < h * w:
        raise ValueError(f"ref_token {ref_token} is outside 0..{h * w - 1}")
    p = torch.nn.functional.normalize(pe.detach().to(torch.float64), dim=1)
    return (p @ p[ref_token]).reshape(h, w)


def mean_pairwise_cosine(pe: Tensor) -> float:
    """Mean cosine similarity over all pairs i != j of PE rows: near 1 means globally correlated ("all white")."""
    s = position_correlation(pe)
    n = s.shape[0]
    if n < 2:
        return float("nan")
    return float((s.sum() - s.diagonal().sum()) / (n * (n - 1)))


def vector_stats(v: Tensor) -> dict[str, float]:
    """mean, var and std (population, ddof=0), min, max and max |v| of a 1-D parameter, in float64."""
    v = v.detach().to(torch.float64).flatten()
    return {
        "mean": float(v.mean()),
        "var": float(v.var(unbiased=False)),
        "std": float(v.std(unbiased=False)),
        "min": float(v.min()),
        "max": float(v.max()),
        "abs_max": float(v.abs().max()),
    }


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two tensors flattened, in float64."""
    a = a.detach().to(torch.float64).flatten()
    b = b.detach().to(torch.float64).flatten()
    return float(a @ b / (a.norm() * b.norm()))


def default_layers(depth: int) -> list[int]:
    """Blocks shown in the heatmaps: all of them up to 6, else 5 spread out ending at the last (MPVG Fig. 2)."""
    if depth <= 6:
        return list(range(depth))
    picks = {round(1 + i * (depth - 2) / 4) for i in range(5)}
    return sorted(min(p, depth - 1) for p in picks)


def default_ref_token(grid: tuple[int, int]) -> int:
    """The patch at the centre of the grid (row h//2, column w//2), as LaPE picks a central token."""
    h, w = grid
    return (h // 2) * w + w // 2


# ----------------------------------------------------------------------------------------------------------------
# What a model exposes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Intermediates:
    """One batch's measured terms, patch tokens only (class token rows removed).

    ``tokens[l]``: LN1_l(x_l) [B, N, D]; ``pe[l]``: PE term added at block l [N, D] or None;
    ``last_in``: x_{L+1} [B, N, D]; ``last_norm``: LN(x_{L+1}) [B, N, D] (without any PE);
    ``last_pe``: LN'_last(pos_0) [N, D] for mpvg, else None.
    """

    tokens: list[Tensor]
    pe: list[Tensor | None]
    last_in: Tensor
    last_norm: Tensor
    last_pe: Tensor | None


@dataclass
class ModelSpec:
    """What the analysis needs to know about one model, besides its forward pass."""

    label: str
    pe_mode: str
    pool: str
    depth: int
    dim: int
    grid: tuple[int, int]
    num_prefix_tokens: int
    has_pe_stream: bool  # some block adds a PE term to its attention input (lape, pvg, mpvg)
    pos_embed: Tensor | None  # [N, D], patch rows of the input position embedding (None: the model has none)
    last_ln_weight: Tensor
    last_ln_bias: Tensor
    last_pe_weight: Tensor | None = None  # LN'_last (mpvg)
    last_pe_bias: Tensor | None = None
    source: str = "fresh"
    extra: dict[str, Any] = field(default_factory=dict)


def describe_model(model: nn.Module, label: str, source: str = "fresh") -> ModelSpec:
    """A :class:`ModelSpec` from a :class:`mpvg_kernels.models.VisionTransformer` (or a model with its attributes:
    ``pe``, ``pool``, ``blocks`` (with ``use_pos``), ``embed_dim``, ``patch_embed.grid_size``, ``num_prefix_tokens``,
    ``pos_embed``, ``norm`` (``weight``, ``bias``, optional ``pos_weight``/``pos_bias``) and
    ``forward_intermediates``)."""
    missing = [a for a in ("pe", "blocks", "norm", "patch_embed", "forward_intermediates") if not hasattr(model, a)]
    if missing:
        raise UserError(f"{label}: {type(model).__name__} lacks {', '.join(missing)}; `mpvg analyze` needs a "
                        "mpvg_kernels.models.VisionTransformer")
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    pos = getattr(model, "pos_embed", None)
    pos_rows = None if pos is None else pos.detach().cpu().reshape(-1, pos.shape[-1])[prefix:]
    norm = model.norm
    extra = {k: getattr(model, k) for k in ("include_layer0", "hierarchical", "add_pos_to_input", "last_pos",
                                            "block_style") if hasattr(model, k)}
    cfg = getattr(model, "default_cfg", None) or {}
    if "architecture" in cfg:
        extra = {"name": cfg["architecture"], **extra}
    return ModelSpec(
        label=label,
        pe_mode=str(model.pe),
        pool=str(getattr(model, "pool", "avg")),
        depth=len(model.blocks),
        dim=int(norm.weight.shape[0]),
        grid=tuple(int(v) for v in model.patch_embed.grid_size),  # type: ignore[arg-type]
        num_prefix_tokens=prefix,
        has_pe_stream=any(bool(getattr(b, "use_pos", False)) for b in model.blocks),
        pos_embed=pos_rows,
        last_ln_weight=norm.weight.detach().cpu(),
        last_ln_bias=norm.bias.detach().cpu(),
        last_pe_weight=None if getattr(norm, "pos_weight", None) is None else norm.pos_weight.detach().cpu(),
        last_pe_bias=None if getattr(norm, "pos_bias", None) is None else norm.pos_bias.detach().cpu(),
        source=source,
        extra=extra,
    )


def collect_intermediates(model: nn.Module, spec: ModelSpec, images: Tensor) -> Intermediates:
    """One batch through ``model.forward_intermediates`` (plain PyTorch steps, no PE cache), patch rows only."""
    out = model.forward_intermediates(images)
    p = int(out.get("num_prefix_tokens", spec.num_prefix_tokens))

    def rows(t: Tensor | None) -> Tensor | None:  # PE terms: [1, T, D] or [T, D], shared by the batch
        return None if t is None else t.detach().reshape(-1, t.shape[-1])[p:]

    def batch_rows(t: Tensor) -> Tensor:
        return t.detach()[:, p:]

    return Intermediates(
        tokens=[batch_rows(t) for t in out["token_terms"]],
        pe=[rows(t) for t in out["pos_terms"]],
        last_in=batch_rows(out["last_norm_input"]),
        last_norm=batch_rows(out["last_norm_output"]),
        last_pe=rows(out.get("last_pos_term")),
    )


def figure_applies(figure: str, spec: ModelSpec) -> str | None:
    """None if ``figure`` applies to the model ``spec``, else the reason it does not.

    ``correlation`` needs a per-layer PE stream (lape, pvg, mpvg; not default); ``pos-maps`` needs a position
    embedding; ``heatmaps`` (token rows only for default) and ``last-ln`` apply to every model.
    """
    if figure not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}; choose from {', '.join(FIGURES)}")
    if figure == "correlation" and not spec.has_pe_stream:
        return (f"pe={spec.pe_mode!r} has no per-layer PE stream (the position embedding is added once to the "
                "input and then shares LN1_l with the tokens), so there is no PE term to correlate with LN1_l(x_l); "
                "the correlation applies to lape, pvg and mpvg models")
    if figure == "pos-maps" and spec.pos_embed is None:
        return "the model has no position embedding"
    return None


def check_applicable(figures: Sequence[str], specs: Sequence[ModelSpec], explicit: bool) -> dict[str, dict[str, str]]:
    """Decide, before any work, which (model, figure) pairs are skipped.

    A figure that applies to none of the models is an error (:class:`NotApplicableError`) when it was asked for
    explicitly (``--figures``); otherwise it is skipped for the models it does not fit, with the reason.
    Returns {label: {figure: reason}}.
    """
    skipped: dict[str, dict[str, str]] = {s.label: {} for s in specs}
    for fig in figures:
        reasons = {s.label: figure_applies(fig, s) for s in specs}
        if explicit and all(r is not None for r in reasons.values()):
            detail = "; ".join(f"{s.label} ({s.source}): {reasons[s.label]}" for s in specs)
            raise NotApplicableError(f"figure {fig!r} does not apply to the given model(s): {detail}. "
                                     f"Drop {fig!r} from --figures or analyse a lape/pvg/mpvg checkpoint.")
        for s in specs:
            r = reasons[s.label]
            if r is not None:
                skipped[s.label][fig] = r
    return skipped


# ----------------------------------------------------------------------------------------------------------------
# Running a model over a batch of images
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelAnalysis:
    """Every number and array one model's figures and JSON are made from."""

    spec: ModelSpec
    num_images: int
    layers: list[int]  # blocks shown in the heatmaps
    ref_token: int
    corr: list[Tensor | None]  # per block: per-image correlations [num_images] or None (no PE term)
    corr_last: Tensor | None  # per-image correlation of LN(x_{L+1}) with LN'_last(pos_0) (mpvg)
    token_mean: dict[int, Tensor]  # block -> mean over images of LN1_l(x_l) [N, D] (shown blocks only)
    pe: list[Tensor | None]  # per block: PE term [N, D]
    last_in_mean: Tensor
    last_norm_mean: Tensor
    last_in_sample: Tensor  # image 0
    last_norm_sample: Tensor
    last_pe: Tensor | None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def has_pe_stream(self) -> bool:
        return any(p is not None for p in self.pe)


@torch.no_grad()
def analyze_model(
    model: nn.Module,
    spec: ModelSpec,
    images: Tensor,
    *,
    batch_size: int = 64,
    layers: Sequence[int] | None = None,
    ref_token: int | None = None,
    skipped: dict[str, str] | None = None,
) -> ModelAnalysis:
    """Run ``model`` (in eval mode) over ``images`` in chunks and gather what :func:`write_outputs` needs."""
    if images.shape[0] == 0:
        raise ValueError("no images to analyse")
    layers = list(default_layers(spec.depth) if layers is None else layers)
    bad = [l for l in layers if not 0 <= l < spec.depth]
    if bad:
        raise ValueError(f"--layers {bad} outside 0..{spec.depth - 1} for {spec.label} (depth {spec.depth})")
    ref = default_ref_token(spec.grid) if ref_token is None else ref_token
    n_patches = spec.grid[0] * spec.grid[1]
    if not 0 <= ref < n_patches:
        raise ValueError(f"--ref-token {ref} outside 0..{n_patches - 1} for the {spec.grid[0]}x{spec.grid[1]} grid "
                         f"of {spec.label}")
    was_training = model.training
    model.eval()
    corr: list[list[Tensor]] = [[] for _ in range(spec.depth)]
    corr_last: list[Tensor] = []
    token_sum = {l: None for l in layers}
    last_in_sum = last_norm_sum = None
    first: Intermediates | None = None
    try:
        for start in range(0, images.shape[0], batch_size):
            inter = collect_intermediates(model, spec, images[start : start + batch_size])
            if first is None:
                first = inter
            for l in range(spec.depth):
                if inter.pe[l] is not None:
                    corr[l].append(token_pe_correlation(inter.tokens[l], inter.pe[l]))
            if inter.last_pe is not None:
                corr_last.append(token_pe_correlation(inter.last_norm, inter.last_pe))
            for l in layers:
                s = inter.tokens[l].to(torch.float64).sum(0)
                token_sum[l] = s if token_sum[l] is None else token_sum[l] + s
            s_in, s_norm = inter.last_in.to(torch.float64).sum(0), inter.last_norm.to(torch.float64).sum(0)
            last_in_sum = s_in if last_in_sum is None else last_in_sum + s_in
            last_norm_sum = s_norm if last_norm_sum is None else last_norm_sum + s_norm
    finally:
        model.train(was_training)
    assert first is not None and last_in_sum is not None and last_norm_sum is not None
    n = images.shape[0]

    def host(t: Tensor) -> Tensor:  # everything kept is float64 on the CPU
        return t.detach().to(device="cpu", dtype=torch.float64)

    return ModelAnalysis(
        spec=spec,
        num_images=n,
        layers=layers,
        ref_token=ref,
        corr=[host(torch.cat(c)) if c else None for c in corr],
        corr_last=host(torch.cat(corr_last)) if corr_last else None,
        token_mean={l: host(token_sum[l] / n) for l in layers},  # type: ignore[operator]
        pe=[host(p) if p is not None else None for p in first.pe],
        last_in_mean=host(last_in_sum / n),
        last_norm_mean=host(last_norm_sum / n),
        last_in_sample=host(first.last_in[0]),
        last_norm_sample=host(first.last_norm[0]),
        last_pe=host(first.last_pe) if first.last_pe is not None else None,
        skipped=dict(skipped or {}),
    )


def _mean_std(v: Tensor | None) -> tuple[float | None, float | None]:
    if v is None:
        return None, None
    return float(v.mean()), float(v.std(unbiased=False))


def analysis_to_json(a: ModelAnalysis, figures: Sequence[str]) -> dict[str, Any]:
    """The numbers of one model as plain JSON types (see docs/analyze.md for every key)."""
    s = a.spec
    out: dict[str, Any] = {
        "source": s.source,
        "pe": s.pe_mode,
        "pool": s.pool,
        "depth": s.depth,
        "dim": s.dim,
        "grid": list(s.grid),
        "num_prefix_tokens": s.num_prefix_tokens,
        "num_images": a.num_images,
        **({"model": s.extra} if s.extra else {}),
        "skipped": dict(a.skipped),
    }
    if "correlation" in figures and "correlation" not in a.skipped:
        means, stds = zip(*(_mean_std(c) for c in a.corr), strict=True)
        lm, ls = _mean_std(a.corr_last)
        out["correlation"] = {
            "definition": CORRELATION_DEFINITION,
            "layers": list(range(s.depth)),
            "mean": list(means),
            "std": list(stds),
            "last_ln": {"mean": lm, "std": ls},
        }
    if "last-ln" in figures and "last-ln" not in a.skipped:
        y_mean = a.last_norm_mean + (a.last_pe if a.last_pe is not None else 0.0)
        c = pe_bias_c(a)
        out["last_ln"] = {
            "gamma": vector_stats(s.last_ln_weight),
            "beta": vector_stats(s.last_ln_bias),
            "beta_var": vector_stats(s.last_ln_bias)["var"],
            "pe_gamma": None if s.last_pe_weight is None else vector_stats(s.last_pe_weight),
            "pe_beta": None if s.last_pe_bias is None else vector_stats(s.last_pe_bias),
            "pe_bias_c": None if c is None else [float(v) for v in c],
            "pe_bias_c_stats": None if c is None else {**vector_stats(c), "norm": float(c.norm())},
            "pooled_bias_beta_plus_c": None if c is None else vector_stats(s.last_ln_bias.to(torch.float64) + c),
            "cosine_token_average_before_after": cosine(a.last_in_mean.mean(0), y_mean.mean(0)),
            "cosine_token_average_before_after_without_pe": cosine(a.last_in_mean.mean(0),
                                                                   a.last_norm_mean.mean(0)),
        }
    if "pos-maps" in figures and "pos-maps" not in a.skipped:
        maps = _pos_map_terms(a)
        out["pos_maps"] = {
            "ref_token": a.ref_token,
            "ref_row_col": [a.ref_token // s.grid[1], a.ref_token % s.grid[1]],
            "grid": list(s.grid),
            "terms": [name for name, _ in maps],
            "mean_cosine": {name: mean_pairwise_cosine(p) for name, p in maps},
            "maps": {name: position_correlation_map(p, s.grid, a.ref_token).tolist() for name, p in maps},
        }
    if "heatmaps" in figures and "heatmaps" not in a.skipped:
        out["heatmaps"] = {"layers": list(a.layers), "tokens": "mean over images", "last_ln_sample_image": 0}
    return out


def pe_bias_c(a: ModelAnalysis) -> Tensor | None:
    """MPVG's pooled PE bias ``c = mean_n LN'_last(pos_0)_n`` ([D], float64); None without a last-LN PE or when the
    model pools the class token (then no average over tokens is taken)."""
    if a.last_pe is None or a.spec.pool != "avg":
        return None
    return a.last_pe.mean(0)


def _pos_map_terms(a: ModelAnalysis) -> list[tuple[str, Tensor]]:
    """(name, [N, D]) of every PE term with a position-correlation map: input pos, block PE terms, last-LN PE."""
    terms: list[tuple[str, Tensor]] = []
    if a.spec.pos_embed is not None:
        terms.append(("input pos_embed", a.spec.pos_embed.detach().to(torch.float64)))
    terms += [(f"block {l}", p) for l, p in enumerate(a.pe) if p is not None]
    if a.last_pe is not None:
        terms.append(("last LN", a.last_pe))
    return terms


# ----------------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on the Agg canvas: no pyplot, no global state)
# ----------------------------------------------------------------------------------------------------------------


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
        (line,) = ax.plot(xs, m, marker="o", label=f"{a.spec.label} (pe={a.spec.pe_mode})")
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
                axes[1][j].text(0.5, 0.5, f"block {l}: no PE term\n(pe={a.spec.pe_mode})", ha="center", va="center",
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
    fig.suptitle(f"{a.spec.label} (pe={a.spec.pe_mode}): before / after the last LayerNorm")
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
    fig.suptitle(f"{a.spec.label} (pe={a.spec.pe_mode}): last LayerNorm parameters")
    path = Path(path)
    fig.savefig(path)
    return path


def plot_pos_maps(a: ModelAnalysis, path: str | Path) -> Path:
    """Position-correlation maps (LaPE Figs. 3-4): cosine of the reference token's PE to every patch's PE."""
    terms = _pos_map_terms(a)
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
        m = position_correlation_map(pe, a.spec.grid, a.ref_token).cpu().numpy()
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
        ax.plot([c0], [r0], marker="x", color="black", markersize=6)
        ax.set_title(f"{name}\nmean cos {mean_pairwise_cosine(pe):+.2f}", fontsize=9)
        ax.set_xlabel("patch column")
        ax.set_ylabel("patch row")
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02, label="cosine similarity to x-marked token")
    fig.suptitle(f"{a.spec.label} (pe={a.spec.pe_mode}): position correlation of token {a.ref_token} "
                 f"(row {r0}, col {c0}) on the {h}x{w} patch grid")
    path = Path(path)
    fig.savefig(path)
    return path


def correlation_table(analyses: Sequence[ModelAnalysis]) -> str:
    """Markdown table: one row per block (and 'last LN'), one column per model, 'mean ± std' over images."""
    shown = [a for a in analyses if "correlation" not in a.skipped]
    if not shown:
        return ""
    depth = max(a.spec.depth for a in shown)
    head = "| block | " + " | ".join(f"{a.spec.label} ({a.spec.pe_mode})" for a in shown) + " |"
    lines = [head, "|---|" + "---|" * len(shown)]

    def cell(v: Tensor | None) -> str:
        return "n/a" if v is None else f"{float(v.mean()):+.4f} ± {float(v.std(unbiased=False)):.4f}"

    for l in range(depth):
        lines.append(f"| {l} | " + " | ".join(cell(a.corr[l] if l < a.spec.depth else None) for a in shown) + " |")
    lines.append("| last LN | " + " | ".join(cell(a.corr_last) for a in shown) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Writing everything
# ----------------------------------------------------------------------------------------------------------------


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "model"


def write_outputs(
    analyses: Sequence[ModelAnalysis],
    out_dir: str | Path,
    figures: Sequence[str],
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the PNGs, ``correlation.md`` and ``analysis.json`` under ``out_dir``; return the JSON document.

    Layout: ``OUT/analysis.json``, ``OUT/correlation.png`` + ``OUT/correlation.md`` (all models in one),
    and per model ``OUT/<label>/{heatmaps,last_ln_heatmaps,last_ln_params,pos_maps}.png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"format": "mpvg-analyze/1", **(meta or {}), "figures": list(figures), "files": [],
                           "models": {}}

    def rel(p: Path) -> str:
        return p.relative_to(out).as_posix()

    if "correlation" in figures and any("correlation" not in a.skipped for a in analyses):
        doc["files"].append(rel(plot_correlation(analyses, out / "correlation.png")))
        table = correlation_table(analyses)
        (out / "correlation.md").write_text(
            "# Token/PE correlation per block\n\n" + CORRELATION_DEFINITION + "\n\n" + table + "\n"
        )
        doc["files"].append("correlation.md")
        doc["correlation_table"] = table
    for a in analyses:
        entry = analysis_to_json(a, figures)
        files: list[str] = []
        d = out / _slug(a.spec.label)
        todo = [f for f in figures if f != "correlation" and f not in a.skipped]
        if todo:
            d.mkdir(exist_ok=True)
        if "heatmaps" in todo:
            files.append(rel(plot_heatmaps(a, d / "heatmaps.png")))
        if "last-ln" in todo:
            files.append(rel(plot_last_ln_heatmaps(a, d / "last_ln_heatmaps.png")))
            files.append(rel(plot_last_ln_params(a, d / "last_ln_params.png")))
        if "pos-maps" in todo:
            files.append(rel(plot_pos_maps(a, d / "pos_maps.png")))
        entry["files"] = files
        doc["files"] += files
        doc["models"][a.spec.label] = entry
    doc["files"].append("analysis.json")
    (out / "analysis.json").write_text(json.dumps(_finite(doc), indent=1) + "\n")
    return doc


def _finite(obj: Any) -> Any:
    """NaN/inf -> None so the JSON is standard (json.dumps would write NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _parse_figures(text: str | None) -> tuple[list[str], bool]:
    """``--figures`` -> (figures, explicit). None or 'all' -> every figure, not explicit."""
    if text is None or text.strip().lower() == "all":
        return list(FIGURES), False
    figs = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in figs if f not in FIGURES]
    if bad or not figs:
        raise ValueError(f"--figures {text!r}: unknown figure(s) {bad}; choose from all, {', '.join(FIGURES)}")
    return [f for f in FIGURES if f in figs], True


def _parse_int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,4,7") from None


def _unique_labels(wanted: Sequence[str] | None, defaults: Sequence[str]) -> list[str]:
    if wanted is not None:
        if len(wanted) != len(defaults):
            raise UserError(f"--label got {len(wanted)} names for {len(defaults)} models")
        if len(set(wanted)) != len(wanted):
            raise UserError(f"--label names must differ, got {list(wanted)}")
        return list(wanted)
    seen: dict[str, int] = {}
    for d in defaults:
        seen[d] = seen.get(d, 0) + 1
    count: dict[str, int] = {}
    out = []
    for d in defaults:
        if seen[d] == 1:
            out.append(d)
        else:
            count[d] = count.get(d, 0) + 1
            out.append(f"{d}-{count[d]}")
    return out


@dataclass
class _Source:
    model: nn.Module
    origin: str  # checkpoint path or "fresh NAME"
    data: str  # --data spec of the images
    in_chans: int
    input_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    crop_pct: float


def _load_sources(args: argparse.Namespace) -> list[_Source]:
    from ..train import data as data_mod

    sources: list[_Source] = []
    if args.checkpoint:
        if args.pe is not None:
            raise UserError("--pe applies to a fresh --model; a checkpoint carries its own PE mode")
        from ..train.checkpoint import load_checkpoint, model_from_checkpoint

        for path in args.checkpoint:
            ckpt = load_checkpoint(path)
            model = model_from_checkpoint(ckpt, "auto", f"checkpoint {path}")
            meta = ckpt["data"]
            sources.append(_Source(model, str(path), str(data_mod.parse_data_spec(args.data or meta["spec"])),
                                   int(meta["in_chans"]), tuple(int(v) for v in meta["input_size"]),  # type: ignore
                                   [float(v) for v in meta["mean"]], [float(v) for v in meta["std"]],
                                   float(meta.get("crop_pct", 1.0))))
        return sources
    from ..train.checkpoint import build_model

    spec = data_mod.parse_data_spec(args.data or "digits")
    n_classes = len(data_mod.class_names(spec))
    for pe in args.pe or ["mpvg"]:
        torch.manual_seed(args.seed)
        model = build_model(args.model, pe, n_classes)
        cfg = model.default_cfg
        c, h, w = (int(v) for v in cfg["input_size"])
        sources.append(_Source(model, f"fresh {args.model} (seed {args.seed})", str(spec), c, (h, w),
                               [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]],
                               float(cfg.get("crop_pct", 0.875))))
    return sources


def load_eval_images(data: str, in_chans: int, input_size: Sequence[int], mean: Sequence[float],
                     std: Sequence[float], crop_pct: float, num_images: int) -> Tensor:
    """The first ``num_images`` held-out images of ``data``, preprocessed as ``mpvg eval`` does -> [n, C, H, W]."""
    from ..train.augment import EvalTransform
    from ..train.data import load_data

    if num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {num_images}")
    splits = load_data(data, in_chans, input_size, crop_pct)
    n = min(num_images, len(splits.test))
    if n == 0:
        raise UserError(f"{data} has no held-out images")
    raw = torch.stack([splits.test[i][0] for i in range(n)])
    return EvalTransform(input_size, in_chans, mean, std)(raw)


def run(args: argparse.Namespace) -> int:
    """``mpvg analyze``: build/load the models, check what applies, measure, write files, print a summary."""
    try:
        figures, explicit = _parse_figures(args.figures)
        layers = _parse_int_list(args.layers, "--layers")
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, figures, explicit, layers)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, figures: list[str], explicit: bool, layers: list[int] | None) -> int:
    device = torch.device(args.device)
    sources = _load_sources(args)
    labels = _unique_labels(args.label, [str(s.model.pe) for s in sources])
    specs = [describe_model(s.model, lab, s.origin) for s, lab in zip(sources, labels, strict=True)]
    skipped = check_applicable(figures, specs, explicit)
    for spec in specs:
        for fig, why in skipped[spec.label].items():
            print(f"note: {spec.label}: skipping {fig!r}: {why}", file=sys.stderr)

    image_cache: dict[tuple, Tensor] = {}
    analyses = []
    for src, spec in zip(sources, specs, strict=True):
        key = (src.data, src.in_chans, src.input_size, tuple(src.mean), tuple(src.std), src.crop_pct)
        if key not in image_cache:
            image_cache[key] = load_eval_images(src.data, src.in_chans, src.input_size, src.mean, src.std,
                                                src.crop_pct, args.num_images)
        images = image_cache[key].to(device)
        model = src.model.to(device)
        try:
            analyses.append(analyze_model(model, spec, images, batch_size=args.batch_size, layers=layers,
                                          ref_token=args.ref_token, skipped=skipped[spec.label]))
        except ValueError as e:
            raise UserError(str(e)) from None
    meta = {"data": sorted({s.data for s in sources}), "split": "held-out (test/val), first images in order",
            "num_images": sorted({a.num_images for a in analyses})}
    doc = write_outputs(analyses, args.out, figures, meta)
    _print_summary(doc, analyses, Path(args.out))
    return 0


def _print_summary(doc: dict[str, Any], analyses: Sequence[ModelAnalysis], out: Path) -> None:
    if doc.get("correlation_table"):
        print("Token/PE correlation per block (Pearson r, mean ± std over images):")
        print(doc["correlation_table"])
    for a in analyses:
        m = doc["models"][a.spec.label]
        ln = m.get("last_ln")
        if ln is not None:
            c = ln["pe_bias_c_stats"]
            print(f"{a.spec.label}: last LN beta var {ln['beta']['var']:.4f}, gamma mean {ln['gamma']['mean']:.4f}"
                  + ("" if c is None else f", |c| {c['norm']:.4f}, var(beta + c) "
                     f"{ln['pooled_bias_beta_plus_c']['var']:.4f}")
                  + f", cos(token avg before, after) {ln['cosine_token_average_before_after']:+.4f}")
    print(f"wrote {len(doc['files'])} files to {out}: {', '.join(doc['files'])}")
