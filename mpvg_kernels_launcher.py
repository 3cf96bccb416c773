"""The ``mpvg`` console script: ``mpvg``, ``mpvg --help`` and a mistyped command are answered without importing
torch (``import mpvg_kernels`` loads torch and registers the ``mpvg::`` ops, which takes seconds); a command runs
:func:`mpvg_kernels.cli.main`.

A module outside the package on purpose: importing anything inside ``mpvg_kernels`` runs the package's
``__init__`` first. :data:`COMMANDS` and :data:`DESCRIPTION` are the one source of the help lines: the subcommand
modules of :mod:`mpvg_kernels.cli` register their parsers with them (its :data:`~mpvg_kernels.cli.COMMANDS` lists
their modules; ``tests/train/test_train_flags.py::test_top_level_help_is_the_full_parsers_help`` holds the two
lists to the same commands).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

DESCRIPTION = ("Fused LayerNorm + position-embedding kernels, models and pipelines for MPVG, PVG and LaPE "
               "vision transformers. Run `mpvg COMMAND --help` for the options of a command.")

#: Every subcommand and its help line, in the order ``mpvg --help`` lists them.
COMMANDS: dict[str, str] = {
    "train": "train a model (default: the bundled digits, in a few minutes on CPU)",
    "eval": "top-1/top-5 accuracy of a checkpoint on a held-out split",
    "predict": "top-k classes of image files under a checkpoint",
    "demo": "check every available backend against the float64 reference and time it",
    "params": "parameter table of every model and PE mode vs the MPVG paper",
    "bench": "model-level images/s: PE modes x fused/unfused x eager/compiled, training and inference",
    "export": "export an inference graph (PE cache frozen) to ONNX or torch.export (.pt2)",
    "analyze": "measure token/PE correlation, heatmaps, last-LN statistics and position-correlation maps",
}

#: Optional modules some subcommand imports to build its flags; when one is missing the full parser is used, as it
#: marks those commands unavailable and names the extra to install.
FLAG_MODULES = ("yaml",)


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def top_level_parser() -> argparse.ArgumentParser:
    """The ``mpvg`` parser with every subcommand listed but none of their options (they need the package)."""
    parser = argparse.ArgumentParser(prog="mpvg", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``mpvg`` with ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if (argv and argv[0] in COMMANDS) or not all(_available(m) for m in FLAG_MODULES):
        from mpvg_kernels.cli import main as run

        return run(argv)
    top_level_parser().parse_args(argv)  # --help, no command or an unknown one: prints and exits
    return 2


if __name__ == "__main__":
    sys.exit(main())
