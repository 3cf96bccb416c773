"""The ``mpvg`` command."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpvg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="check every available backend against the float64 reference and time it")
    p.add_argument("--batch", type=int, default=32, help="batch size B (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=196, help="tokens N (default: %(default)s)")
    p.add_argument("--dim", type=int, default=192, help="embedding dim D (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
