"""The install advice this package prints: every ``pip install`` of an extra pins the torch already installed, so
following the advice never swaps torch (for example a CPU build for a CUDA one pulled in by torchvision)."""

from __future__ import annotations

from importlib import metadata


def torch_pin() -> str:
    """``torch==X.Y.Z`` for the installed torch (its local label, such as ``+cpu``, left out: ``==`` matches it)."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:  # pragma: no cover - the package needs torch
        return "torch"
    return f"torch=={version.split('+')[0]}"


def install_command(extra: str, checkout: bool = False) -> str:
    """The ``pip install`` command that adds ``extra`` and keeps the installed torch."""
    if checkout:
        return f'pip install --no-build-isolation -e ".[{extra}]" "{torch_pin()}"'
    return f'pip install "mpvg-kernels[{extra}]" "{torch_pin()}"'


def install_advice(extra: str) -> str:
    """The advice as the CLI and the error messages print it."""
    return f"{install_command(extra)} (in a checkout: {install_command(extra, checkout=True)})"
