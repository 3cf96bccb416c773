"""``mpvg bench``: model-level images/s of every PE mode, fused vs unfused, eager vs compiled."""

from __future__ import annotations

import argparse
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from ..benchmark.models import main

    return main(args)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="model-level images/s: PE modes x fused/unfused x eager/compiled, training and inference",
        description=__doc__,
    )
    from ..benchmark.models import add_arguments

    add_arguments(p)
    p.set_defaults(func=_run)
    return p
