"""``mpvg analyze``: the MPVG and LaPE papers' measurements on trained checkpoints or fresh models."""

from __future__ import annotations

import argparse
from typing import Any

from ..analysis.analyze import FIGURES
from ..models.vision_transformer import PE_MODES


def _run(args: argparse.Namespace) -> int:
    from ..analysis.analyze import run

    return run(args)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mpvg analyze`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "analyze",
        help="measure token/PE correlation, heatmaps, last-LN statistics and position-correlation maps",
        description="The MPVG and LaPE papers' measurements on trained checkpoints (or fresh models): per-block "
        "correlation of LN1_l(x_l) with the PE term (MPVG Figs. 2, 4), token/PE heatmaps per block and before/after "
        "the last LN (Figs. 2, 6, 7), last-LN gamma/beta statistics and the MPVG pooled PE bias c, and position-"
        "correlation maps (LaPE Figs. 3-4). Writes PNGs, correlation.md and analysis.json to --out; see "
        "docs/analyze.md for the exact definitions.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", metavar="CKPT",
                     help="one or more checkpoints written by `mpvg train` (several: compared in one plot)")
    src.add_argument("--model", metavar="NAME", help="analyse a freshly initialised registered model instead")
    p.add_argument("--pe", nargs="+", choices=PE_MODES, metavar="MODE",
                   help="PE mode(s) of the fresh --model, one model per mode (default: mpvg)")
    p.add_argument("--label", nargs="+", metavar="NAME",
                   help="names of the models in plots and JSON, one per model (default: their PE mode)")
    p.add_argument("--data", default=None,
                   help="digits | cifar10:PATH | cifar100:PATH | folder:PATH: whose held-out images are fed, "
                   "preprocessed as `mpvg eval` does (default: the checkpoint's data set; digits for --model)")
    p.add_argument("--num-images", type=int, default=128, metavar="N",
                   help="the first N held-out images, in order (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="images per forward pass (default: %(default)s)")
    p.add_argument("--figures", default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(FIGURES)} (default: all; then a figure that does not "
                   "apply to a model is skipped with a note, while an explicitly listed one that applies to none of "
                   "the models is an error)")
    p.add_argument("--layers", default=None, metavar="LIST",
                   help="0-based blocks shown in the heatmaps, e.g. 1,4,7,9,11 (default: all up to 6 blocks, "
                   "else 5 spread out ending with the last)")
    p.add_argument("--ref-token", type=int, default=None, metavar="I",
                   help="patch index whose PE is compared in the position-correlation maps (default: grid centre)")
    p.add_argument("--seed", type=int, default=0, help="seed for freshly initialised models (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op CPU threads of this process (default: torch's default)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.set_defaults(func=_run)
    return p


