"""The ops' policy: which backend serves a call, which registered op design compiled graphs see, and whether plain
eager calls take the fast path. Imports no kernel module (the op module, ``layer_norm.py``, reads this one).

Backends:
- ``torch``: the plain PyTorch reference (``reference.py``); everywhere.
- ``cpp``: the C++ CPU kernels in ``csrc/cpu`` (extension ``mpvg_kernels.ops._C``); CPU tensors, when built.
- ``triton``: the Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before
  this package was imported (the Triton interpreter: for tests, slow).

``auto`` (the default) picks the fastest backend available for the tensor's device: ``cpp`` on CPU when
built, ``triton`` on CUDA, otherwise ``torch``. The choice comes from :func:`set_backend`, else from the
environment variable ``MPVG_BACKEND`` read at import.

Op design (:func:`set_op_design`, ``MPVG_OP_DESIGN``): ``opaque`` or ``triton_op``. Fast path
(:func:`set_eager_fast_path`, ``MPVG_EAGER_FAST_PATH=0`` to turn it off): plain eager calls launch the kernels from a
cached plan instead of through the registered ops. A bad value of either environment variable is reported when an op
first needs it, not at import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch

KNOWN_BACKENDS = ("auto", "torch", "cpp", "triton")

#: True when the Triton interpreter was requested before import: Triton kernels then run on CPU tensors.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: How the ops are registered with torch.library (:func:`set_op_design`).
OP_DESIGNS = ("opaque", "triton_op")

_state: dict[str, object] = {
    "backend": os.environ.get("MPVG_BACKEND", "auto").strip().lower() or "auto",
    "op_design": os.environ.get("MPVG_OP_DESIGN", "opaque").strip().lower() or "opaque",
    "fast_path": os.environ.get("MPVG_EAGER_FAST_PATH", "1").strip().lower() not in ("0", "false", "off", "no"),
    "cpp_loaded": False,
    "cpp_error": "not attempted",
}


class UnknownBackendError(ValueError):
    """A backend name that does not exist (from ``set_backend`` or ``MPVG_BACKEND``)."""


class UnknownOpDesignError(ValueError):
    """An op design name that does not exist (from ``MPVG_OP_DESIGN``)."""


class BackendUnavailableError(RuntimeError):
    """A known backend that cannot run here (not built, not installed, or the tensors' device it cannot serve)."""


# Looked up once at import: resolve_backend runs inside torch.compile'd code, where a find_spec call would be a
# graph break (an error under fullgraph=True).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_FOUND


def cpp_status() -> tuple[bool, str]:
    """(built and loaded, reason when not)."""
    return bool(_state["cpp_loaded"]), str(_state["cpp_error"])


def _unavailable_reason(name: str, device: torch.device | None) -> str | None:
    """Why backend ``name`` cannot serve tensors on ``device`` (any device when None); None if it can."""
    if name == "torch":
        return None
    if name == "cpp":
        if not _state["cpp_loaded"]:
            return f"the C++ extension mpvg_kernels.ops._C is not loaded ({_state['cpp_error']})"
        if device is not None and device.type != "cpu":
            return f"the cpp backend serves CPU tensors only, got a tensor on {device}"
        return None
    if name == "triton":
        if not _triton_installed():
            return "triton is not installed"
        if device is None:
            if torch.cuda.is_available() or TRITON_INTERPRET:
                return None
            return "no CUDA device is available and TRITON_INTERPRET=1 was not set before import"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and TRITON_INTERPRET:
            return None
        return (
            f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"import), got a tensor on {device}"
        )
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(KNOWN_BACKENDS)}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on this machine, fastest first: for tensors on ``device``, or (None) for at least one device."""
    dev = None if device is None else torch.device(device)
    return [n for n in ("cpp", "triton", "torch") if _unavailable_reason(n, dev) is None]


def set_backend(name: str) -> None:
    """Choose the backend for every op: ``auto``, ``torch``, ``cpp`` or ``triton``.

    Raises ValueError for an unknown name and RuntimeError for a backend not available on this machine.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    name = name.strip().lower()
    if name not in KNOWN_BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r}; choose one of {', '.join(KNOWN_BACKENDS)}")
    if name != "auto":
        why = _unavailable_reason(name, None)
        if why is not None:
            raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    _state["backend"] = name


def get_backend() -> str:
    """The configured backend name (``auto`` unless set)."""
    return str(_state["backend"])


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`, restoring the previous choice on exit."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = old


#: resolve_backend's answers, keyed by (configured name, device type, C++ loaded, Triton found); only answers,
#: never errors, are kept, and every input of the rule is part of the key.
_resolved: dict[tuple, str] = {}


def resolve_backend(device: torch.device) -> str:
    """The concrete backend that serves tensors on ``device`` under the current choice."""
    key = (_state["backend"], device.type, _state["cpp_loaded"], _TRITON_FOUND)
    name = _resolved.get(key)
    if name is None:
        name = _resolve(device)
        _resolved[key] = name
    return name


def _resolve(device: torch.device) -> str:
    name = str(_state["backend"])
    if name == "auto":
        if device.type == "cpu" and _state["cpp_loaded"]:
            return "cpp"
        if device.type == "cuda" and _unavailable_reason("triton", device) is None:
            return "triton"
        return "torch"
    if name not in KNOWN_BACKENDS:
        raise UnknownBackendError(
            f"unknown backend {name!r} (from MPVG_BACKEND or set_backend); choose one of "
            f"{', '.join(KNOWN_BACKENDS)}"
        )
    why = _unavailable_reason(name, device)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run this op: {why}")
    return name


# ----------------------------------------------------------------------------------------------- op design

#: Called with the design's name when one is chosen: the op module registers the ``mpvg_triton::`` ops this way
#: (this module imports no kernel module).
_design_hooks: list[Callable[[str], None]] = []


def set_op_design(name: str) -> None:
    """Choose which registered ops the fused ops use where they do not take the eager fast path (``torch.compile``,
    tracing, modes):

    - ``opaque`` (the default): the ``mpvg::`` custom ops, one opaque node per operation on every device;
    - ``triton_op``: the ``mpvg_triton::`` ops (``torch.library.triton_op`` over the same Triton launcher), which
      ``torch.compile`` decomposes into their Triton kernels on CUDA, so Inductor sees them; on other devices they
      call the ``mpvg::`` ops. Needs triton.

    ``torch.export`` always records the ``mpvg::`` ops. ``MPVG_OP_DESIGN`` sets the choice at import. Raises
    ValueError for an unknown name and RuntimeError when triton is not installed.
    """
    if not isinstance(name, str):
        raise TypeError(f"op design must be a str, got {type(name).__name__}")
    name = name.strip().lower()
    if name not in OP_DESIGNS:
        raise ValueError(f"unknown op design {name!r}; choose one of {', '.join(OP_DESIGNS)}")
    if name == "triton_op" and not _triton_installed():
        raise BackendUnavailableError("op design 'triton_op' needs triton, which is not installed")
    for hook in _design_hooks:
        hook(name)
    _state["op_design"] = name


def get_op_design() -> str:
    """The configured op design: ``opaque`` or ``triton_op`` (raises ValueError for a bad ``MPVG_OP_DESIGN``)."""
    name = str(_state["op_design"])
    if name not in OP_DESIGNS:
        raise UnknownOpDesignError(
            f"MPVG_OP_DESIGN={name!r} is not an op design; choose one of {', '.join(OP_DESIGNS)}"
        )
    return name


def check_environment() -> None:
    """Raise the error a bad ``MPVG_BACKEND`` or ``MPVG_OP_DESIGN`` would raise at the first op call, now (the CLI
    calls this before any work)."""
    if _state["backend"] not in KNOWN_BACKENDS:
        raise UnknownBackendError(
            f"MPVG_BACKEND={_state['backend']!r} is not a backend; choose one of {', '.join(KNOWN_BACKENDS)}"
        )
    get_op_design()


@contextlib.contextmanager
def use_op_design(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_op_design`, restoring the previous choice on exit."""
    old = _state["op_design"]
    set_op_design(name)
    try:
        yield
    finally:
        _state["op_design"] = old


# ----------------------------------------------------------------------------------------------- fast path


def set_eager_fast_path(enabled: bool) -> None:
    """Turn the eager fast path on (the default) or off (every call through the registered ``mpvg::`` ops)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _state["fast_path"] = enabled


def eager_fast_path_enabled() -> bool:
    """Whether the eager fast path is switched on (it still applies only to plain eager calls)."""
    return bool(_state["fast_path"])


@contextlib.contextmanager
def use_eager_fast_path(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_eager_fast_path`, restoring the previous setting on exit."""
    old = _state["fast_path"]
    set_eager_fast_path(enabled)
    try:
        yield
    finally:
        _state["fast_path"] = old
