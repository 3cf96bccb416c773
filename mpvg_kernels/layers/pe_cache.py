"""The inference PE cache: tensors that depend on parameters alone (the PE chain pos_1..pos_L, the last PE term
and the pooled last-LN bias), served only while no tracked parameter changed and no gradient is needed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["PECache", "cache_bypassed", "no_autocast", "optimizer_step_count", "watch_optimizer_steps"]

_optimizer_steps = [0]
_step_hook: Any = None  # the handle once the hook is registered


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _optimizer_steps[0] += 1


def watch_optimizer_steps() -> None:
    """Register the global optimizer step post-hook that advances :func:`optimizer_step_count`, once.

    Fused optimizers (``torch.optim.AdamW(fused=True)`` and friends) update parameters without bumping their
    autograd version counters, so the step counter is part of every cache key. The hook is registered lazily, the
    first time any :class:`PECache` stores a value: importing the package or building and training a model
    registers nothing, and every step after a cache fill (the only steps a stored key can miss) is counted. The
    hook costs one integer increment per step.
    """
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_step_count() -> int:
    """How many ``optimizer.step()`` calls (any optimizer) this process has made since the first
    :class:`PECache` stored a value (0 before that; see :func:`watch_optimizer_steps`); part of every cache key."""
    return _optimizer_steps[0]


def cache_bypassed() -> bool:
    """True while tracing or compiling (torch.compile, torch.export, jit): a cache must then be recomputed in the
    graph instead of read from Python state."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        if compiler.is_compiling():
            return True
        is_exporting = getattr(compiler, "is_exporting", None)
        if is_exporting is not None and is_exporting():
            return True
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting())


class PECache:
    """One memoised value computed from a set of tensors (parameters) alone.

    :meth:`get` returns the stored value while every tracked tensor is the same tensor (``data_ptr``, dtype,
    device, shape, strides) with the same autograd ``_version``, no ``optimizer.step()`` ran in between, the
    ``extra`` key (e.g. the token grid) and the inference-mode flag are unchanged; otherwise it recomputes (under
    ``no_grad``) and stores. The stored entry keeps a reference to the tracked storages, so their addresses cannot
    be reused by new tensors while it lives.

    What invalidates it: ``load_state_dict`` (``copy_`` bumps versions), optimizer steps (versions, plus the
    global step counter for fused optimizers, counted by a global optimizer step post-hook that the first stored
    value registers), in-place edits under ``no_grad``, ``.to()``/``.half()``/``.cuda()``
    (new storage, dtype or device). What it cannot see: writes that bypass autograd's version counter, such as
    ``p.data.mul_(2)`` or in-place collectives (``dist.broadcast(p)``); call :meth:`clear` after those.

    :meth:`usable` says whether a cached value may be served at all: never while tracing/compiling
    (:func:`cache_bypassed`) and never when gradients are needed (grad mode on and any tracked tensor requires
    grad).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Any = None
        self._refs: tuple[torch.Tensor, ...] = ()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def usable(tensors: Iterable[torch.Tensor]) -> bool:
        """Whether a cached value may be used now for values computed from ``tensors``."""
        if cache_bypassed():
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False
        return True

    @staticmethod
    def _signature(tensors: tuple[torch.Tensor, ...], extra: Any) -> tuple | None:
        sig = []
        try:
            for t in tensors:
                sig.append((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), t.stride()))
        except (RuntimeError, NotImplementedError):  # tensors without storage (fake/functional): no caching
            return None
        return (tuple(sig), extra, optimizer_step_count(), torch.is_inference_mode_enabled())

    def get(self, tensors: Iterable[torch.Tensor], compute: Callable[[], Any], extra: Any = None) -> Any:
        """The cached value for ``tensors`` (+ ``extra``), computing it with ``compute()`` under no_grad if stale."""
        tensors = tuple(tensors)
        key = self._signature(tensors, extra)
        if key is not None and key == self._key:
            self.hits += 1
            return self._value
        self.misses += 1
        with torch.no_grad():
            value = compute()
        if key is None:
            self.clear()
        else:
            watch_optimizer_steps()  # before storing: every later step changes the counter in the key
            self._key, self._value, self._refs = key, value, tuple(t.detach() for t in tensors)
        return value

    def clear(self) -> None:
        """Drop the stored value (the next :meth:`get` recomputes)."""
        self._key, self._value, self._refs = None, None, ()

    @property
    def filled(self) -> bool:
        """Whether a value is stored."""
        return self._key is not None

    # A cache is process-local state: copies and pickles start empty.
    def __deepcopy__(self, memo: dict) -> PECache:
        return PECache()

    def __getstate__(self) -> dict:
        return {"hits": 0, "misses": 0}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __repr__(self) -> str:
        return f"PECache(filled={self.filled}, hits={self.hits}, misses={self.misses})"


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Compute cached PE terms in the parameters' own dtype, whatever autocast is active."""
    try:
        ctx = torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # device type without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield
