"""Flags shared by several subcommands, defined once: model keyword arguments, the device, missing extras."""

from __future__ import annotations

import argparse
import ast
import importlib.util
from collections.abc import Iterable
from typing import Any

from .._install import install_advice
from ..errors import UserError

DEVICE_HELP = "auto | cpu | cuda | cuda:N (default: %(default)s; auto = cuda when available, else cpu)"


def add_device_arg(parser: argparse.ArgumentParser | Any) -> None:
    """``--device`` with the same default (``auto``) on every command."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_weights_arg(parser: argparse.ArgumentParser | Any, help: str) -> None:  # noqa: A002
    """``--weights auto|ema|model``: which weights of an ``mpvg train`` checkpoint (``help`` says what for)."""
    parser.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                        help=f"{help} (default: %(default)s)")


def add_model_arg(parser: argparse.ArgumentParser | Any) -> None:
    """``--model-arg KEY=VALUE`` (repeatable): a keyword argument of ``create_model``, the one syntax for model
    options on every command."""
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="create_model keyword, e.g. pool=avg or drop_path_rate=0.1; values are Python literals, anything else "
        "is a string (repeatable; default: none)",
    )


def parse_model_args(items: Iterable[str] | None) -> dict[str, Any]:
    """``["pool=avg", "depth=6"]`` -> ``{"pool": "avg", "depth": 6}``; a malformed item is a :class:`UserError`."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"--model-arg expects KEY=VALUE with KEY a keyword name, got {item!r}")
        if key in out:
            raise UserError(f"--model-arg {key} given twice")
        try:
            out[key] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            out[key] = val.strip()
    return out


#: Optional modules and the extra that installs each (:func:`mpvg_kernels._install.install_advice`).
EXTRA_OF_MODULE: dict[str, str] = {
    "yaml": "train",
    "sklearn": "train",
    "kornia": "train",
    "matplotlib": "train",
    "PIL": "train",
    "tqdm": "train",
    "onnx": "export",
    "onnxruntime": "export",
    "safetensors": "export",
    "triton": "triton",
}


def missing_extra_message(e: ModuleNotFoundError) -> str | None:
    """``pip install "mpvg-kernels[EXTRA]"`` advice when ``e`` is about an optional module, else None."""
    extra = EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
    if extra is None:
        return None
    return f"{e.name} is not installed; it comes with the [{extra}] extra: {install_advice(extra)}"


def require_extra(*modules: str) -> None:
    """Raise a :class:`UserError` naming ``pip install "mpvg-kernels[EXTRA]"`` (the extra of the first missing
    module, from :data:`EXTRA_OF_MODULE`) when any of ``modules`` is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extra = EXTRA_OF_MODULE[missing[0]]
        raise UserError(f"this command needs {', '.join(missing)}, which is not installed: run {install_advice(extra)}")


def check_at_least(flag: str, value: int | float | None, minimum: int | float) -> None:
    """A :class:`UserError` naming the flag and its value when ``value`` is below ``minimum`` (None passes)."""
    if value is not None and value < minimum:
        raise UserError(f"{flag} {value}: must be at least {minimum}")
