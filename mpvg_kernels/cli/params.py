"""``mpvg params``: parameter counts of every registered model and PE mode, next to the MPVG paper."""

from __future__ import annotations

import argparse
from typing import Any

from mpvg_kernels_launcher import COMMANDS


def _run(args: argparse.Namespace) -> int:
    from ..models import format_param_table, param_table

    print(format_param_table(param_table()))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mpvg params``."""
    p = subparsers.add_parser("params", help=COMMANDS["params"])
    p.set_defaults(func=_run)
    return p
