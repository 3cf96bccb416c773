"""``mpvg analyze`` end to end: load or build the models, check which figures apply, measure, and write the PNGs,
``correlation.md`` and ``analysis.json`` (:func:`run_analysis`, every option a keyword); :func:`write_outputs` and
:func:`correlation_table` for results measured by hand with :func:`~mpvg_kernels.analysis.collect.analyze_model`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from .collect import (
    CORRELATION_DEFINITION,
    FIGURES,
    ModelAnalysis,
    ModelSpec,
    analysis_to_json,
    analyze_model,
    check_applicable,
    describe_model,
)
from .plots import plot_correlation, plot_heatmaps, plot_last_ln_heatmaps, plot_last_ln_params, plot_pos_maps


def correlation_table(analyses: Sequence[ModelAnalysis]) -> str:
    """Markdown table: one row per block (and 'last LN'), one column per model, 'mean ± std' over images."""
    shown = [a for a in analyses if "correlation" not in a.skipped]
    if not shown:
        return ""
    depth = max(a.spec.depth for a in shown)
    head = "| block | " + " | ".join(f"{a.spec.label} ({a.spec.pe})" for a in shown) + " |"
    lines = [head, "|---|" + "---|" * len(shown)]

    def cell(v: Tensor | None) -> str:
        return "n/a" if v is None else f"{float(v.mean()):+.4f} ± {float(v.std(unbiased=False)):.4f}"

    for l in range(depth):
        lines.append(f"| {l} | " + " | ".join(cell(a.corr[l] if l < a.spec.depth else None) for a in shown) + " |")
    lines.append("| last LN | " + " | ".join(cell(a.corr_last) for a in shown) + " |")
    return "\n".join(lines)


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


def load_eval_images(data: str, in_chans: int, input_size: Sequence[int], mean: Sequence[float],
                     std: Sequence[float], crop_pct: float, num_images: int) -> Tensor:
    """The first ``num_images`` held-out images of ``data``, preprocessed as ``mpvg eval`` does -> [n, C, H, W]."""
    from ..data import EvalTransform, load_data

    if num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {num_images}")
    splits = load_data(data, in_chans, input_size, crop_pct)
    n = min(num_images, len(splits.test))
    if n == 0:
        raise UserError(f"{data} has no held-out images")
    raw = torch.stack([splits.test[i][0] for i in range(n)])
    return EvalTransform(input_size, in_chans, mean, std)(raw)


# ----------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    model: nn.Module
    origin: str  # checkpoint path or "fresh NAME"
    data: str  # data spec of the images
    in_chans: int
    input_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    crop_pct: float


def _load_sources(
    checkpoints: Sequence[str | Path] | None,
    model: str | None,
    pe: Sequence[str] | None,
    model_kwargs: dict[str, Any] | None,
    data: str | None,
    seed: int,
) -> list[_Source]:
    from .. import data as data_mod

    if bool(checkpoints) == (model is not None):
        raise UserError("give either checkpoints (--checkpoint) or a registered model name (--model), not both")
    sources: list[_Source] = []
    if checkpoints:
        if pe is not None:
            raise UserError("--pe applies to a fresh --model; a checkpoint carries its own PE mode")
        if model_kwargs:
            raise UserError("--model-arg applies to a fresh --model; a checkpoint carries its own model options")
        from ..models.factory import load_checkpoint, model_from_checkpoint

        for path in checkpoints:
            ckpt = load_checkpoint(path)
            net = model_from_checkpoint(ckpt, "auto", f"checkpoint {path}")
            meta = ckpt["data"]
            sources.append(_Source(net, str(path), str(data_mod.parse_data_spec(data or meta["spec"])),
                                   int(meta["in_chans"]), tuple(int(v) for v in meta["input_size"]),  # type: ignore
                                   [float(v) for v in meta["mean"]], [float(v) for v in meta["std"]],
                                   float(meta.get("crop_pct", 1.0))))
        return sources
    from ..models.factory import build_model

    assert model is not None
    spec = data_mod.parse_data_spec(data or "digits")
    n_classes = len(data_mod.class_names(spec))
    for mode in pe or ["mpvg"]:
        torch.manual_seed(seed)
        net = build_model(model, mode, n_classes, dict(model_kwargs or {}))
        cfg = net.default_cfg
        c, h, w = (int(v) for v in cfg["input_size"])
        sources.append(_Source(net, f"fresh {model} (seed {seed})", str(spec), c, (h, w),
                               [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]],
                               float(cfg.get("crop_pct", 0.875))))
    return sources


def _check_figures(figures: Sequence[str] | None) -> tuple[list[str], bool]:
    """``figures`` -> (figures in canonical order, explicit). None -> every figure, not explicit."""
    if figures is None:
        return list(FIGURES), False
    if isinstance(figures, str):
        raise TypeError("figures must be a sequence of figure names (or None for all), not a string")
    figs = [f.strip().lower() for f in figures]
    bad = [f for f in figs if f not in FIGURES]
    if bad or not figs:
        raise UserError(f"figures {list(figures)}: unknown figure(s) {bad}; choose from {', '.join(FIGURES)}")
    return [f for f in FIGURES if f in figs], True


@dataclass
class AnalysisReport:
    """What :func:`run_analysis` produced: the JSON document written to ``out/analysis.json`` (``doc["files"]``
    lists every file, relative to ``out``), the per-model measurements, and the (model, figure) pairs skipped."""

    out: Path
    doc: dict[str, Any]
    analyses: list[ModelAnalysis]
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> {figure: reason}


def run_analysis(
    *,
    out: str | Path,
    checkpoints: Sequence[str | Path] | None = None,
    model: str | None = None,
    pe: Sequence[str] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    data: str | None = None,
    num_images: int = 128,
    batch_size: int = 64,
    figures: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    ref_token: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    threads: int | None = None,
    on_note: Callable[[str], None] | None = None,
) -> AnalysisReport:
    """Analyse ``checkpoints`` (written by ``mpvg train``) or fresh models and write every output under ``out``.

    - ``checkpoints``: paths of ``mpvg train`` checkpoints; or ``model``: a registered model name, built once per
      PE mode of ``pe`` (default ``["mpvg"]``) with ``model_kwargs`` (``create_model`` keywords) after
      ``torch.manual_seed(seed)``. Exactly one of the two.
    - ``labels``: names of the models in plots and JSON (default: their PE modes, numbered when repeated).
    - ``data``: ``digits | cifar10:PATH | cifar100:PATH | folder:PATH`` whose first ``num_images`` held-out images
      are fed, ``batch_size`` per forward pass (default: each checkpoint's data set; ``digits`` for fresh models).
    - ``figures``: a subset of :data:`~mpvg_kernels.analysis.collect.FIGURES`; None = all, and then a figure that
      does not apply to a model is skipped (reported through ``on_note``), while a listed figure that applies to
      none of the models is an error (:class:`~mpvg_kernels.analysis.collect.NotApplicableError`), raised before
      any work.
    - ``layers``: 0-based blocks shown in the heatmaps (default: all up to 6, else 5 spread out); ``ref_token``:
      patch index of the position-correlation maps (default: grid centre).
    - ``device``: ``auto | cpu | cuda | cuda:N``; ``threads``: intra-op CPU threads while running (restored after).

    Every mistake in the options is a :class:`~mpvg_kernels.errors.UserError`.
    """
    figs, explicit = _check_figures(figures)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(out=Path(out), checkpoints=checkpoints, model=model, pe=pe, model_kwargs=model_kwargs,
                    labels=labels, data=data, num_images=num_images, batch_size=batch_size, figures=figs,
                    explicit=explicit, layers=None if layers is None else [int(v) for v in layers],
                    ref_token=ref_token, seed=seed, device=device, on_note=on_note)
    finally:
        torch.set_num_threads(threads_before)


def _run(*, out: Path, checkpoints: Sequence[str | Path] | None, model: str | None, pe: Sequence[str] | None,
         model_kwargs: dict[str, Any] | None, labels: Sequence[str] | None, data: str | None, num_images: int,
         batch_size: int, figures: list[str], explicit: bool, layers: list[int] | None, ref_token: int | None,
         seed: int, device: str | torch.device, on_note: Callable[[str], None] | None) -> AnalysisReport:
    from ..device import resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    sources = _load_sources(checkpoints, model, pe, model_kwargs, data, seed)
    names = _unique_labels(labels, [str(s.model.pe) for s in sources])
    specs: list[ModelSpec] = [describe_model(s.model, lab, s.origin) for s, lab in zip(sources, names, strict=True)]
    skipped = check_applicable(figures, specs, explicit)
    if on_note is not None:
        for spec in specs:
            for fig, why in skipped[spec.label].items():
                on_note(f"{spec.label}: skipping {fig!r}: {why}")

    image_cache: dict[tuple, Tensor] = {}
    analyses = []
    for src, spec in zip(sources, specs, strict=True):
        key = (src.data, src.in_chans, src.input_size, tuple(src.mean), tuple(src.std), src.crop_pct)
        if key not in image_cache:
            image_cache[key] = load_eval_images(src.data, src.in_chans, src.input_size, src.mean, src.std,
                                                src.crop_pct, num_images)
        images = image_cache[key].to(dev)
        net = src.model.to(dev)
        try:
            analyses.append(analyze_model(net, spec, images, batch_size=batch_size, layers=layers,
                                          ref_token=ref_token, skipped=skipped[spec.label]))
        except ValueError as e:
            raise UserError(str(e)) from None
    meta = {"data": sorted({s.data for s in sources}), "split": "held-out (test/val), first images in order",
            "num_images": sorted({a.num_images for a in analyses})}
    doc = write_outputs(analyses, out, figures, meta)
    return AnalysisReport(out=out, doc=doc, analyses=analyses, skipped=skipped)
