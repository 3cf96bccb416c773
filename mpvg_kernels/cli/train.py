"""``mpvg train``: train a model on a data set with a recipe, write checkpoint, metrics, curves and summary.

Examples:
  mpvg train                                   # digits, vit_digits, pe=mpvg -> runs/digits-mpvg
  mpvg train --pe default --epochs 10
  mpvg train --recipe vit_lite_cifar100 --data cifar100:/data/cifar-100-python
  torchrun --nproc_per_node=8 -m mpvg_kernels train --recipe deit_imagenet --data folder:/data/imagenet \\
      --model deit_small_patch16_224 --out runs/deit-s-mpvg
  mpvg train --set model_kwargs.drop_path_rate=0.05 --set betas=[0.9,0.95]
  mpvg train --model-arg drop_path_rate=0.05     # merged into model_kwargs; wins over the recipe and --set

The batch size is per process: under torchrun the global batch is --batch-size x WORLD_SIZE (and the learning
rate scales with the global batch when the recipe sets lr_base_batch). Only rank 0 writes files.

Every setting is checked before anything is written or deleted (ranges: see each flag; the model is built and run
on one batch; the data and --out are checked); --dry-run stops after these checks. Ctrl-C prints the epoch that is
saved and the command that continues the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

from mpvg_kernels_launcher import COMMANDS

from ..train.config import (
    DEFAULT_RECIPE,
    add_config_flags,
    build_config,
    config_to_dict,
    flags_from_args,
    list_recipes,
    load_recipe,
)
from .options import add_model_arg, parse_model_args


def default_out(recipe: str, pe: str) -> str:
    """``runs/<recipe name>-<pe>`` (e.g. ``runs/digits-mpvg``)."""
    return str(Path("runs") / f"{Path(recipe).stem}-{pe}")


def _run(args: argparse.Namespace) -> int:
    import yaml

    cfg = build_config(args.recipe, args.set, flags_from_args(args))
    model_args = parse_model_args(args.model_arg)
    if model_args:  # the most explicit source: wins over --model-kwargs, --set model_kwargs.K=V and the recipe
        cfg = dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, **model_args})
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from ..train.trainer import TrainingInterrupted, train

    out = args.out or default_out(args.recipe, cfg.pe)
    try:
        summary = train(cfg, out, resume=args.resume, stop_after_epoch=args.stop_after_epoch,
                        progress=args.progress, overwrite=args.overwrite, dry_run=args.dry_run)
    except TrainingInterrupted as e:
        raise KeyboardInterrupt(f"{e}; continue with: {continue_command(getattr(args, 'argv', None), e)}") from None
    return 0 if summary.get("ranks_in_sync", True) else 1


def continue_command(argv: list[str] | None, stop: Any) -> str:
    """The ``mpvg train`` command line that continues an interrupted run: the same arguments with ``--resume``
    (without ``--overwrite``), or with ``--overwrite`` when no epoch was saved (``stop.saved_epoch == 0``)."""
    words = list(argv if argv is not None else sys.argv[1:])
    if words and words[0] == "train":
        words = words[1:]
    if stop.saved_epoch:
        words = [w for w in words if w != "--overwrite"]
        if not any(w == "--resume" or w.startswith("--resume=") for w in words):
            words.append("--resume")
    elif "--overwrite" not in words:
        words.append("--overwrite")
    return shlex.join(["mpvg", "train", *words])


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mpvg train``; one flag per config field, documented with the digits recipe's defaults."""
    p = subparsers.add_parser("train", help=COMMANDS["train"],
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--recipe", default=DEFAULT_RECIPE,
                   help=f"bundled recipe ({', '.join(list_recipes())}) or a YAML file (default: %(default)s)")
    g.add_argument("--out", default=None,
                   help="output directory (default: runs/<recipe>-<pe>, e.g. runs/digits-mpvg)")
    g.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override any config field, repeatable; values are YAML (e.g. lr=5e-4, betas=[0.9,0.95], "
                   "model_kwargs.drop_path_rate=0.1); explicit flags win over --set (default: none)")
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from OUT/checkpoint.pt, or from CKPT; settings must match the run that wrote it "
                   "(default: off)")
    g.add_argument("--stop-after-epoch", type=int, default=None, metavar="K",
                   help="end after epoch K although the schedule spans --epochs, as a preemption would; continue "
                   "with --resume (default: off)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in OUT even if it holds an unfinished run (default: off)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar (default: on when stderr is a terminal)")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as YAML and exit (default: off)")
    g.add_argument("--dry-run", action="store_true",
                   help="check every setting (ranges, --out, the checkpoint to resume, the model built and run on "
                   "one batch, the data) and exit without writing anything (default: off)")
    add_model_arg(g)
    add_config_flags(p, load_recipe(DEFAULT_RECIPE))
    p.set_defaults(func=_run)
    return p
