"""``mpvg demo``: check every available backend against the float64 reference and time it."""

from __future__ import annotations

import argparse
from typing import Any

from mpvg_kernels_launcher import COMMANDS

from .options import add_device_arg


def _run(args: argparse.Namespace) -> int:
    from ..benchmark.demo import run_demo

    return run_demo(args)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mpvg demo``."""
    p = subparsers.add_parser("demo", help=COMMANDS["demo"],
                              description=__doc__)
    p.add_argument("--batch", type=int, default=32, help="batch size B (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=196, help="tokens N (default: %(default)s)")
    p.add_argument("--dim", type=int, default=192, help="embedding dim D (default: %(default)s)")
    add_device_arg(p)
    p.set_defaults(func=_run)
    return p
