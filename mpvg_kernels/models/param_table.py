"""Parameter counts of every registered model in every PE mode, and every model of the papers' tables next to the
number the paper prints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import count_parameters
from .registry import MODEL_CFGS, create_model, list_models
from .vision_transformer import PE_MODES

__all__ = ["PAPER_PARAMS_M", "PAPER_ROWS", "PaperRow", "format_param_table", "param_table", "paper_table"]


@dataclass(frozen=True)
class PaperRow:
    """One model of a paper's table: the registered ``model`` built with ``pe`` and ``kwargs``, and the #Params the
    paper prints (``printed_m``, millions, ``decimals`` digits). Where the table prints none (LaPE), ``printed_m``
    is the count of the original architecture (``source``: its paper, or timm's exact count), or None."""

    table: str
    model: str
    pe: str
    printed_m: float | None = None
    decimals: int = 3
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    source: str = "MPVG"

    @property
    def tolerance(self) -> int | None:
        """Largest accepted |ours - printed| in parameters for MPVG's three decimals and exact references: 1.5
        units of the last printed digit (0.0015 M for three decimals: the papers mostly truncate, so a count may
        sit just below the next printed value). None for a coarse reference (fewer than three decimals): it must
        round to the printed value instead."""
        if self.printed_m is None or self.decimals < 3:
            return None
        return round(1.5 * 10 ** (6 - self.decimals))

    def agrees(self, count: int) -> bool | None:
        """Whether ``count`` (parameters, as the papers count them) matches the printed value (None: none printed)."""
        if self.printed_m is None:
            return None
        if self.tolerance is None:
            return round(count / 1e6, self.decimals) == round(self.printed_m, self.decimals)
        return abs(count - round(self.printed_m * 1e6)) <= self.tolerance


def _rows(table: str, model: str, printed: Sequence[float | None], modes: Sequence[str] = PE_MODES,
          label: str = "", **kwargs: Any) -> list[PaperRow]:
    return [PaperRow(table, model, pe, p, 3, dict(kwargs), label) for pe, p in zip(modes, printed, strict=True)]


def _lape(table: str, model: str, ref: tuple[float, int, str] | None = None, label: str = "",
          lape_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> list[PaperRow]:
    """LaPE's default and LaPE rows (LaPE prints no #Params); ``ref``: (M, decimals, source) of the original
    architecture, compared with the default row; ``lape_kwargs``: options of the LaPE row only."""
    default = PaperRow(table, model, "default", None, 3, dict(kwargs), label, "")
    if ref is not None:
        default = PaperRow(table, model, "default", ref[0], ref[1], dict(kwargs), label, ref[2])
    return [default, PaperRow(table, model, "lape", None, 3, {**kwargs, **(lape_kwargs or {})}, label, "")]


_DEIT_TI_NO_PE = (5.717416 - 197 * 192 / 1e6, 6, "timm's DeiT-Ti minus its learned PE")

#: Every model of MPVG (Lee et al., AAAI 2025) Tables 1-2 and LaPE (Yu et al., ICCV 2023) Tables 1, 2 and 4, in the
#: papers' order. MPVG prints #Params (M); LaPE prints none (its rows carry ``printed_m=None``).
PAPER_ROWS: tuple[PaperRow, ...] = tuple(
    # MPVG Table 1: ImageNet-1K, 224x224, 1000 classes
    _rows("MPVG T1", "deit_tiny_patch16_224", (5.717, 5.721, 5.721, 5.721))
    + _rows("MPVG T1", "deit_small_patch16_224", (22.050, 22.059, 22.058, 22.059))
    + _rows("MPVG T1", "deit_base_patch16_224", (86.567, 86.586, 86.583, 86.584))
    + _rows("MPVG T1", "swin_tiny_patch4_window7_224", (28.589, 28.599, 28.598, 28.599))
    + _rows("MPVG T1", "ceit_tiny_patch16_224", (6.356, 6.361, 6.361, 6.361))
    + _rows("MPVG T1", "t2t_vit_7", (4.310, 4.313, 4.312, 4.313))
    # MPVG Table 2: CIFAR-100, 100 classes (ViT-Lite at 32x32; T2T-ViT-7 fine-tuned at 224)
    + _rows("MPVG T2", "vit_lite_7_4_32", (3.740, 3.744, 3.742, 3.743))
    + _rows("MPVG T2", "t2t_vit_7", (4.078, 4.082, 4.081, 4.081), label="CIFAR-100", num_classes=100)
    # LaPE Table 1: ImageNet-1K (default and LaPE); the default rows next to the original architectures' counts
    + _lape("LaPE T1", "deit_tiny_patch16_224", (5.717416, 6, "timm"))
    + _lape("LaPE T1", "deit_small_patch16_224", (22.050664, 6, "timm"))
    # T2T-ViT-7* in LaPE: LaPE on the first 3 of the 7 blocks ("we remove the LaPE for the last 4 layers")
    + _lape("LaPE T1", "t2t_vit_7", (4.3, 1, "T2T-ViT paper"), "*", lape_kwargs={"pe_layers": 3})
    + _lape("LaPE T1", "deit_tiny_distilled_patch16_224", (5.9108, 4, "timm"))
    + _lape("LaPE T1", "deit_small_distilled_patch16_224", (22.436432, 6, "timm"))
    + _lape("LaPE T1", "swin_tiny_patch4_window7_224", (28.288354, 6, "timm"), "RPE", pos_embed="rpe")
    + _lape("LaPE T1", "swin_small_patch4_window7_224", (49.606258, 6, "timm"), "RPE", pos_embed="rpe")
    + _lape("LaPE T1", "ceit_tiny_patch16_224", (6.4, 1, "CeiT paper"))
    + _lape("LaPE T1", "ceit_small_patch16_224", (24.2, 1, "CeiT paper"))
    # LaPE Table 2: CIFAR-10 and CIFAR-100 (the Compact-Transformers paper counts the 10-class models)
    + _lape("LaPE T2", "vit_lite_7_4_32", (3.72, 2, "CCT paper"), "CIFAR-10", num_classes=10)
    + _lape("LaPE T2", "cvt_7_4_32", (3.72, 2, "CCT paper"), "CIFAR-10", num_classes=10)
    + _lape("LaPE T2", "cct_7_3x1_32", (3.76, 2, "CCT paper"), "CIFAR-10", num_classes=10)
    + _lape("LaPE T2", "vit_lite_7_4_32", (3.740, 3, "MPVG T2"), "CIFAR-100", num_classes=100)
    + _lape("LaPE T2", "cvt_7_4_32", None, "CIFAR-100", num_classes=100)
    + _lape("LaPE T2", "cct_7_3x1_32", None, "CIFAR-100", num_classes=100)
    # LaPE Table 4: DeiT-Ti with sinusoidal PEs (basic = default, and LaPE); fixed tables are not parameters
    + _lape("LaPE T4", "deit_tiny_patch16_224", _DEIT_TI_NO_PE, "1-D sin", pos_embed="sincos1d")
    + _lape("LaPE T4", "deit_tiny_patch16_224", _DEIT_TI_NO_PE, "2-D sin", pos_embed="sincos2d")
)

#: #Params (M) printed by MPVG for (model, pe) at the registered class count (Tables 1 and 2).
PAPER_PARAMS_M: dict[tuple[str, str], float] = {
    (r.model, r.pe): r.printed_m for r in PAPER_ROWS if r.source == "MPVG" and not r.kwargs
}


def _count(name: str, pe: str, **kwargs: Any) -> tuple[Any, int, int, int]:
    """(model on the meta device, parameters, PE-LayerNorm parameters, parameters as the papers count them)."""
    with torch.device("meta"):  # no memory, no initialisation
        model = create_model(name, pe=pe, **kwargs)
    total = count_parameters(model)
    pe_norm = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".pos_weight", ".pos_bias")))
    frozen = set(MODEL_CFGS[name].get("paper_counts_buffers", ()))
    counted = total + sum(b.numel() for n, b in model.named_buffers() if n in frozen)
    return model, total, pe_norm, counted


def param_table(names: Sequence[str] | None = None, modes: Sequence[str] = PE_MODES) -> list[dict[str, Any]]:
    """One row per registered (model, mode) with the registered defaults (pool by mode: cls for default/lape, avg
    for pvg/mpvg, except families built around another pooling). Keys: ``model``, ``pe``, ``pool``, ``params``
    (total), ``pe_norm_params`` (the LN'_l and LN'_last parameters), ``delta_vs_default`` (params minus the same
    model in ``default`` mode), ``paper_params`` (as the papers count: plus the fixed tables the original code
    held as frozen parameters, see ``paper_counts_buffers`` in the registry), ``paper_m`` (MPVG's #Params in
    millions, or None) and ``diff_vs_paper`` (``paper_params - paper_m``).
    Models are built on the meta device: no memory is allocated and nothing is initialised.
    """
    rows: list[dict[str, Any]] = []
    for name in list_models() if names is None else names:
        base = None
        for pe in modes:
            model, total, pe_norm, counted = _count(name, pe)
            if pe == "default":
                base = total
            paper = PAPER_PARAMS_M.get((name, pe))
            rows.append(
                {
                    "model": name,
                    "pe": pe,
                    "pool": model.pool,
                    "params": total,
                    "pe_norm_params": pe_norm,
                    "delta_vs_default": None if base is None else total - base,
                    "paper_params": counted,
                    "paper_m": paper,
                    "diff_vs_paper": None if paper is None else counted - round(paper * 1e6),
                }
            )
    return rows


def paper_table(rows: Sequence[PaperRow] = PAPER_ROWS) -> list[dict[str, Any]]:
    """Every model of the papers' tables with our count: keys ``table``, ``model``, ``label``, ``pe``, ``kwargs``,
    ``params``, ``paper_params`` (as the papers count), ``printed_m``, ``diff`` (paper_params - printed),
    ``tolerance`` and ``ok`` (None where the paper prints no count)."""
    out: list[dict[str, Any]] = []
    for r in rows:
        _, total, _, counted = _count(r.model, r.pe, **r.kwargs)
        diff = None if r.printed_m is None else counted - round(r.printed_m * 1e6)
        out.append(
            {
                "table": r.table,
                "model": r.model,
                "label": r.label,
                "pe": r.pe,
                "kwargs": dict(r.kwargs),
                "params": total,
                "paper_params": counted,
                "printed_m": r.printed_m,
                "source": r.source,
                "decimals": r.decimals,
                "diff": diff,
                "tolerance": r.tolerance,
                "ok": r.agrees(counted),
            }
        )
    return out


def format_param_table(rows: Sequence[dict[str, Any]] | None = None, paper: Sequence[dict[str, Any]] | None = None
                       ) -> str:
    """The rows of :func:`param_table` and of :func:`paper_table` as two Markdown tables."""
    rows = param_table() if rows is None else rows
    head = "| model | pe | pool | params | params (M) | PE-LN params | vs default | MPVG (M) | ours - MPVG |"
    lines = ["Registered models, every PE mode:", "", head, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = "" if r["delta_vs_default"] is None else f"{r['delta_vs_default']:+,}"
        printed = "" if r["paper_m"] is None else f"{r['paper_m']:.3f}"
        diff = "" if r["diff_vs_paper"] is None else f"{r['diff_vs_paper']:+,}"
        counted = "" if r["paper_params"] == r["params"] else f" ({r['paper_params']:,} as counted)"
        lines.append(
            f"| {r['model']} | {r['pe']} | {r['pool']} | {r['params']:,}{counted} | {r['paper_params'] / 1e6:.3f} | "
            f"{r['pe_norm_params']:,} | {delta} | {printed} | {diff} |"
        )
    if paper is None:
        paper = paper_table()
    if paper:
        lines += ["", "The papers' tables (MPVG prints #Params; LaPE prints none: its default rows are compared with "
                  "the original architecture's count):", "",
                  "| table | model | setting | pe | params | params (M) | printed (M) | ours - printed | within |",
                  "|---|---|---|---|---:|---:|---:|---:|---|"]
        for r in paper:
            setting = ", ".join(filter(None, [r["label"], *(f"{k}={v}" for k, v in r["kwargs"].items())]))
            printed = "" if r["printed_m"] is None else f"{r['printed_m']:.{r['decimals']}f}"
            if r["printed_m"] is not None and r["source"] != "MPVG":
                printed += f" ({r['source']})"
            diff = "" if r["diff"] is None else f"{r['diff']:+,}"
            if r["ok"] is None:
                ok = ""
            elif r["tolerance"] is None:
                ok = "rounds to it" if r["ok"] else "NO (does not round to it)"
            else:
                ok = "yes" if r["ok"] else f"NO (> {r['tolerance']:,})"
            counted = "" if r["paper_params"] == r["params"] else f" ({r['paper_params']:,} as counted)"
            lines.append(f"| {r['table']} | {r['model']} | {setting} | {r['pe']} | {r['params']:,}{counted} | "
                         f"{r['paper_params'] / 1e6:.3f} | {printed} | {diff} | {ok} |")
    return "\n".join(lines)
