"""``mpvg analyze``: the MPVG and LaPE papers' measurements on trained checkpoints or fresh models."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mpvg_kernels_launcher import COMMANDS

from ..analysis.collect import FIGURES
from ..errors import UserError
from ..models.vision_transformer import PE_MODES
from .options import add_device_arg, add_model_arg, parse_model_args


def _figures(text: str | None) -> list[str] | None:
    """``--figures`` -> the figure names; None or ``all`` -> None (every figure, skipping those that do not apply)."""
    if text is None or text.strip().lower() == "all":
        return None
    figs = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in figs if f not in FIGURES]
    if bad or not figs:
        raise UserError(f"--figures {text!r}: unknown figure(s) {bad}; choose from all, {', '.join(FIGURES)}")
    return figs


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,4,7") from None


def _print_summary(doc: dict[str, Any]) -> None:
    if doc.get("correlation_table"):
        print("Token/PE correlation per block (Pearson r, mean ± std over images):")
        print(doc["correlation_table"])
    for label, m in doc["models"].items():
        ln = m.get("last_ln")
        if ln is not None:
            c = ln["pe_bias_c_stats"]
            print(f"{label}: last LN beta var {ln['beta']['var']:.4f}, gamma mean {ln['gamma']['mean']:.4f}"
                  + ("" if c is None else f", |c| {c['norm']:.4f}, var(beta + c) "
                     f"{ln['pooled_bias_beta_plus_c']['var']:.4f}")
                  + f", cos(token avg before, after) {ln['cosine_token_average_before_after']:+.4f}")


def _run(args: argparse.Namespace) -> int:
    from ..analysis.report import run_analysis

    report = run_analysis(
        out=args.out,
        checkpoints=args.checkpoint,
        model=args.model,
        pe=args.pe,
        model_kwargs=parse_model_args(args.model_arg),
        labels=args.label,
        data=args.data,
        num_images=args.num_images,
        batch_size=args.batch_size,
        figures=_figures(args.figures),
        layers=_int_list(args.layers, "--layers"),
        ref_token=args.ref_token,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        on_note=lambda msg: print(f"note: {msg}", file=sys.stderr),
    )
    _print_summary(report.doc)
    files = report.doc["files"]
    print(f"wrote {len(files)} files to {report.out}: {', '.join(files)}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mpvg analyze`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "analyze",
        help=COMMANDS["analyze"],
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
    add_model_arg(p)
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
    add_device_arg(p)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op CPU threads of this process (default: torch's default)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.set_defaults(func=_run)
    return p
