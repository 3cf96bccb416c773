"""The ``mpvg`` command (also ``python -m mpvg_kernels``, so ``torchrun ... -m mpvg_kernels train`` works): argparse
only; every subcommand parses its flags and calls the library. May import anything in the package.

Each subcommand lives in its own module that defines ``add_parser(subparsers) -> argparse.ArgumentParser``; the
parser it registers sets ``func`` (``func(args) -> int``) with ``set_defaults``. Adding a subcommand is one line
in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from mpvg_kernels_launcher import DESCRIPTION

from .options import missing_extra_message

#: Modules that register a subcommand, in the order ``mpvg --help`` lists them.
COMMANDS: list[str] = [
    "mpvg_kernels.cli.train",
    "mpvg_kernels.cli.evaluate",
    "mpvg_kernels.cli.predict",
    "mpvg_kernels.cli.demo",
    "mpvg_kernels.cli.params",
    "mpvg_kernels.cli.bench",
    "mpvg_kernels.cli.export",
    "mpvg_kernels.cli.analyze",
]

def _unavailable_command(sub: Any, module: str, why: str) -> None:
    """Register ``module``'s subcommand as one that only explains which extra to install."""
    name = module.rsplit(".", 1)[-1]
    name = {"evaluate": "eval"}.get(name, name)

    def run(args: argparse.Namespace) -> int:
        from ..errors import UserError

        raise UserError(why)

    p = sub.add_parser(name, help=f"(unavailable: {why})", description=why, add_help=False, prefix_chars="\0")
    p.add_argument("ignored", nargs="*", help=argparse.SUPPRESS)  # any flags: the command cannot run anyway
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """The ``mpvg`` parser with every subcommand of :data:`COMMANDS` registered."""
    parser = argparse.ArgumentParser(
        prog="mpvg",
        description=DESCRIPTION,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            why = missing_extra_message(e)
            if why is None:
                raise
            _unavailable_command(sub, name, why)
            continue
        module.add_parser(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``command``."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _short_message(e: BaseException) -> str:
    """The user-facing line of an error: errors re-raised from DataLoader workers carry a whole traceback (their
    last line says what went wrong), and one that quotes a library's error may carry its C++ stack (the first line
    says it)."""
    msg = str(e).strip()
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    if "Original Traceback" in msg:
        last = lines[-1] if lines else msg
        _, sep, rest = last.partition(": ")
        return rest if sep and "Error" in last.split(": ", 1)[0] else last
    return lines[0] if lines else msg


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand and return its exit status."""
    from ..errors import UserError
    from ..ops.backends import BackendUnavailableError, UnknownBackendError, UnknownOpDesignError, check_environment

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # an option the subcommand does not know: its own usage, not the top-level one
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_environment()  # MPVG_BACKEND / MPVG_OP_DESIGN: one line before any work, not a traceback later
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"mpvg {args.command}: error: {_short_message(e)}", file=sys.stderr)
        return 2
    except (BackendUnavailableError, UnknownBackendError, UnknownOpDesignError) as e:  # e.g. MPVG_BACKEND=triton
        print(f"mpvg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        why = missing_extra_message(e)
        if why is None:
            raise
        print(f"mpvg {args.command}: error: {why}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command may say what was saved and how to continue
        print(f"mpvg {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
