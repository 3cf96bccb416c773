"""Parameter counts of every registered model in every PE mode, next to the papers' numbers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .registry import create_model, list_models
from .vision_transformer import PE_MODES, count_parameters

__all__ = ["PAPER_PARAMS_M", "format_param_table", "param_table"]

#: #Params (M) as printed in MPVG (Lee et al., AAAI 2025), Table 1 (ImageNet-1K, 1000 classes) and Table 2
#: (ViT-Lite on CIFAR-100, 100 classes). The paper prints three decimals.
PAPER_PARAMS_M: dict[tuple[str, str], float] = {
    ("deit_tiny_patch16_224", "default"): 5.717,
    ("deit_tiny_patch16_224", "lape"): 5.721,
    ("deit_tiny_patch16_224", "pvg"): 5.721,
    ("deit_tiny_patch16_224", "mpvg"): 5.721,
    ("deit_small_patch16_224", "default"): 22.050,
    ("deit_small_patch16_224", "lape"): 22.059,
    ("deit_small_patch16_224", "pvg"): 22.058,
    ("deit_small_patch16_224", "mpvg"): 22.059,
    ("deit_base_patch16_224", "default"): 86.567,
    ("deit_base_patch16_224", "lape"): 86.586,
    ("deit_base_patch16_224", "pvg"): 86.583,
    ("deit_base_patch16_224", "mpvg"): 86.584,
    ("vit_lite_7_4_32", "default"): 3.740,
    ("vit_lite_7_4_32", "lape"): 3.744,
    ("vit_lite_7_4_32", "pvg"): 3.742,
    ("vit_lite_7_4_32", "mpvg"): 3.743,
}


def param_table(names: Sequence[str] | None = None, modes: Sequence[str] = PE_MODES) -> list[dict[str, Any]]:
    """One row per (model, mode) with the registered defaults (pool by mode: cls for default/lape, avg for
    pvg/mpvg). Keys: ``model``, ``pe``, ``pool``, ``params`` (total), ``pe_norm_params`` (the LN'_l and LN'_last
    parameters), ``delta_vs_default`` (params minus the same model in ``default`` mode), ``paper_m`` (MPVG's
    #Params in millions, or None) and ``diff_vs_paper`` (params - paper_m * 1e6, or None).

    Models are built on the meta device: no memory is allocated and nothing is initialised.
    """
    rows: list[dict[str, Any]] = []
    for name in list_models() if names is None else names:
        base = None
        for pe in modes:
            with torch.device("meta"):
                model = create_model(name, pe=pe)
            total = count_parameters(model)
            pe_norm = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".pos_weight", ".pos_bias")))
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
                    "paper_m": paper,
                    "diff_vs_paper": None if paper is None else total - round(paper * 1e6),
                }
            )
    return rows


def format_param_table(rows: Sequence[dict[str, Any]] | None = None) -> str:
    """The rows of :func:`param_table` as a Markdown table."""
    rows = param_table() if rows is None else rows
    head = "| model | pe | pool | params | params (M) | PE-LN params | vs default | paper (M) | ours - paper |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = "" if r["delta_vs_default"] is None else f"{r['delta_vs_default']:+,}"
        paper = "" if r["paper_m"] is None else f"{r['paper_m']:.3f}"
        diff = "" if r["diff_vs_paper"] is None else f"{r['diff_vs_paper']:+,}"
        lines.append(
            f"| {r['model']} | {r['pe']} | {r['pool']} | {r['params']:,} | {r['params'] / 1e6:.3f} | "
            f"{r['pe_norm_params']:,} | {delta} | {paper} | {diff} |"
        )
    return "\n".join(lines)
