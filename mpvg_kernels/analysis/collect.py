"""What ``mpvg analyze`` measures on one model: its description (:class:`ModelSpec`), one batch's token and PE terms
(:class:`Intermediates`), which figure applies to which PE mode, the measurements over all images
(:func:`analyze_model` -> :class:`ModelAnalysis`) and their JSON form (:func:`analysis_to_json`).

What is measured (block indices l = 0..L are 0-based, as in docs/design.md#notation and the MPVG paper's Eqs. 2-6):

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from .stats import (
    cosine,
    default_layers,
    default_ref_token,
    mean_pairwise_cosine,
    position_correlation_map,
    token_pe_correlation,
    vector_stats,
)

FIGURES: tuple[str, ...] = ("correlation", "heatmaps", "last-ln", "pos-maps")

CORRELATION_DEFINITION = (
    "Pearson correlation between LN1_l(x_l)[b] (normalised token term of block l, affine included) and the PE term "
    "added at block l, both flattened over patch tokens x channels (class token dropped), computed per image b in "
    "float64; 'mean' and 'std' are over the images. 'last_ln' (mpvg only): the same between LN(x_{L+1}) and "
    "LN'_last(pos_0). null where a block has no PE term."
)


class NotApplicableError(UserError):
    """A requested figure does not apply to a model's PE mode (e.g. the correlation for ``default``)."""


@dataclass
class Intermediates:
    """One batch's measured terms, patch tokens only (class token rows removed).

    ``tokens[l]``: LN1_l(x_l) [B, N, D]; ``pe[l]``: PE term added at block l [N, D] or None;
    ``last_in``: x_{L+1} [B, N, D]; ``last_norm``: LN(x_{L+1}) [B, N, D] (without any PE);
    ``last_pe``: LN'_last(pos_0) [N, D] for mpvg, else None. A model whose last norm acts on pooled vectors (CeiT:
    the LCA output) gives ``last_in``/``last_norm`` [B, 1, D] and ``last_pe`` the PE readout it adds [1, D].
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
    pe: str  # the PE mode: default, lape, pvg or mpvg
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
    ``forward_analysis``)."""
    missing = [a for a in ("pe", "blocks", "norm", "patch_embed", "forward_analysis") if not hasattr(model, a)]
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
        pe=str(model.pe),
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
    """One batch through ``model.forward_analysis`` (plain PyTorch steps, no PE cache), patch rows only."""
    out = model.forward_analysis(images)
    p = int(out.get("num_prefix_tokens", spec.num_prefix_tokens))

    def rows(t: Tensor | None) -> Tensor | None:  # PE terms: [1, T, D] or [T, D], shared by the batch
        return None if t is None else t.detach().reshape(-1, t.shape[-1])[p:]

    def batch_rows(t: Tensor) -> Tensor:
        return t.detach()[:, p:]

    last_in, last_norm = out["last_norm_input"], out["last_norm_output"]
    if last_in.shape[1] == out["token_terms"][-1].shape[1]:  # the last norm acts on every token
        last_in, last_norm, last_pe = batch_rows(last_in), batch_rows(last_norm), rows(out.get("last_pos_term"))
    else:  # it acts on pooled vectors (CeiT's LCA output): those, with the PE readout the model adds to them
        readout = out.get("last_pos_readout")
        last_in, last_norm = last_in.detach(), last_norm.detach()
        last_pe = None if readout is None else readout.detach().reshape(-1, readout.shape[-1])
    return Intermediates(
        tokens=[batch_rows(t) for t in out["token_terms"]],
        pe=[rows(t) for t in out["pos_terms"]],
        last_in=last_in,
        last_norm=last_norm,
        last_pe=last_pe,
    )


def figure_applies(figure: str, spec: ModelSpec) -> str | None:
    """None if ``figure`` applies to the model ``spec``, else the reason it does not.

    ``correlation`` needs a per-layer PE stream (lape, pvg, mpvg; not default); ``pos-maps`` needs a position
    embedding; ``heatmaps`` (token rows only for default) and ``last-ln`` apply to every model.
    """
    if figure not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}; choose from {', '.join(FIGURES)}")
    if figure == "correlation" and not spec.has_pe_stream:
        return (f"pe={spec.pe!r} has no per-layer PE stream (the position embedding is added once to the "
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
    """Run ``model`` (in eval mode) over ``images`` in chunks and gather what the figures and the JSON need."""
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
        "pe": s.pe,
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
        maps = pos_map_terms(a)
        out["pos_maps"] = {
            "ref_token": a.ref_token,
            "ref_row_col": [a.ref_token // s.grid[1], a.ref_token % s.grid[1]],
            "grid": list(s.grid),
            "terms": [name for name, _ in maps],
            "mean_cosine": {name: mean_pairwise_cosine(p) for name, p in maps},
            "maps": {name: term_correlation_map(p, s.grid, a.ref_token).tolist() for name, p in maps},
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


def term_grid(grid: tuple[int, int], ref_token: int, num_rows: int) -> tuple[tuple[int, int], int]:
    """(grid, reference token) of a PE term with ``num_rows`` rows: the model's ``grid``, or for a staged model
    (Swin: later stages merge 2x2 patches) that grid halved k times, the reference at the same place."""
    h, w = grid
    f = 1
    while (h // f) * (w // f) > num_rows and h // f > 1 and w // f > 1:
        f *= 2
    if (h // f) * (w // f) != num_rows:
        raise ValueError(f"a PE term of {num_rows} rows fits neither the {h}x{w} grid nor a 2x2-merged one")
    r, c = divmod(ref_token, w)
    return (h // f, w // f), (r // f) * (w // f) + c // f


def term_correlation_map(pe: Tensor, grid: tuple[int, int], ref_token: int) -> Tensor:
    """:func:`position_correlation_map` of ``pe`` on its own grid (see :func:`term_grid`)."""
    g, ref = term_grid(grid, ref_token, pe.shape[0])
    return position_correlation_map(pe, g, ref)


def pos_map_terms(a: ModelAnalysis) -> list[tuple[str, Tensor]]:
    """(name, [N, D]) of every PE term with a position-correlation map: input pos, block PE terms, last-LN PE."""
    terms: list[tuple[str, Tensor]] = []
    if a.spec.pos_embed is not None:
        terms.append(("input pos_embed", a.spec.pos_embed.detach().to(torch.float64)))
    terms += [(f"block {l}", p) for l, p in enumerate(a.pe) if p is not None]
    if a.last_pe is not None and a.last_pe.shape[0] > 1:  # a pooled readout (one row) has no map
        terms.append(("last LN", a.last_pe))
    return terms

