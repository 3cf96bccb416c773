"""``mpvg bench``: model-level images/s of every PE mode, fused vs unfused, eager vs compiled.

Every field of ``BenchConfig`` is a flag, generated from the dataclass as ``mpvg train``'s flags are from
``TrainConfig``; ``--device`` and ``--model-arg`` are the flags every command shares. ``--smoke`` starts from a
run of well under a minute (the digits model, eager), and explicit flags override it.

``--device cuda``: models and inputs live on the GPU, every sample is one call timed with CUDA events (the device
synchronised around warm-up calls and after each round), and the report carries no targets (the MPVG/default
ratio targets are the CPU run's).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from mpvg_kernels_launcher import COMMANDS

from ..benchmark.models import BenchConfig, smoke_config
from ..dataclass_flags import add_dataclass_flags, explicit_values
from .options import add_device_arg, add_model_arg, parse_model_args

#: BenchConfig fields whose flag is a shared one (cli/options.py) rather than a generated one
SHARED_FLAGS = {"device": "--device", "model_kwargs": "--model-arg"}


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from parsed flags: ``--smoke`` (or the defaults) gives the base, explicit flags
    override it; ``--batch`` entries and ``--model-arg`` items are added to the base's."""
    cfg = smoke_config() if args.smoke else BenchConfig()
    given = {k: v for k, v in explicit_values(args, BenchConfig, skip=SHARED_FLAGS).items() if v is not None}
    if "batch_overrides" in given:
        given["batch_overrides"] = {**cfg.batch_overrides, **given["batch_overrides"]}
    return dataclasses.replace(
        cfg,
        **given,
        device=args.device,
        model_kwargs={**cfg.model_kwargs, **parse_model_args(args.model_arg)},
    )


def _run(args: argparse.Namespace) -> int:
    from ..benchmark.models import run_and_report

    return run_and_report(config_from_args(args), profile=args.profile)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help=COMMANDS["bench"],
        description=__doc__,
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, eager, few iterations: well under a minute")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: torch.profiler op tables of every eager case (writes NAME_profile.md)",
    )
    add_device_arg(p)
    add_model_arg(p)
    g = p.add_argument_group("benchmark settings (BenchConfig fields; --smoke changes some defaults)")
    add_dataclass_flags(g, BenchConfig, skip=SHARED_FLAGS)
    p.set_defaults(func=_run)
    return p
