"""The inference PE cache: tensors that depend on parameters alone (the PE chain pos_1..pos_L, the last PE term
and the pooled last-LN bias), served only while no tracked parameter changed and no gradient is needed."""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = [
    "PECache",
    "cache_bypassed",
    "module_state",
    "no_autocast",
    "optimizer_step_count",
    "watch_optimizer_steps",
]

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
    """True while tracing or compiling (torch.compile, torch.export, jit, torch.fx): a cache must then be recomputed
    in the graph instead of read from Python state."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        if compiler.is_compiling():
            return True
        is_exporting = getattr(compiler, "is_exporting", None)
        if is_exporting is not None and is_exporting():
            return True
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting() or is_fx_symbolic_tracing())


# values compared as they are (immutable); everything else is snapshot by _freeze
_ATOMS = frozenset(
    {
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        type(None),
        torch.dtype,
        torch.device,
        torch.layout,
        torch.memory_format,
        torch.Size,
    }
)
_TENSOR = "<tensor>"  # where a tensor held as a plain attribute was (the tensor itself is keyed by its signature)


def _ident(obj: Any) -> Any:
    """``obj`` compared by identity without keeping it alive: a weak reference where it takes one (two live
    references to one object compare equal; a dead one equals nothing new, so a reused address cannot match)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return obj


def _freeze(v: Any, tensors: list[torch.Tensor], depth: int = 0) -> Any:
    """A comparable snapshot of the attribute value ``v`` (containers copied, so later in-place edits show)."""
    if type(v) in _ATOMS:
        return v
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return _TENSOR
    if isinstance(v, nn.Module):
        return _ident(v)  # its own attributes are part of the key when it is in the module list
    if type(v) is tuple and all(map(_ATOMS.__contains__, map(type, v))):
        return v  # e.g. normalized_shape, grid_size
    if isinstance(v, (tuple, list)):
        return type(v), tuple(_freeze(e, tensors, depth) for e in v)
    if isinstance(v, dict):  # includes the hook dicts: adding or removing a hook changes the key
        return type(v), tuple((k, _freeze(e, tensors, depth)) for k, e in v.items())
    if isinstance(v, (set, frozenset)):
        return frozenset(v)
    if isinstance(v, types.MethodType):  # e.g. a hook bound to a module: no strong reference to its owner
        return _ident(v.__self__), v.__func__
    if callable(v) or isinstance(v, type) or depth >= 2 or not hasattr(v, "__dict__"):
        return v if getattr(type(v), "__hash__", None) is not None else _ident(v)
    # a plain object (e.g. the model's PEWalk): itself and its attributes, one or two levels deep
    return _ident(v), _freeze(vars(v), tensors, depth + 1)


#: ``nn.Module`` internals that cannot change a forward's values (backward and state-dict hooks, the set of
#: non-persistent buffer names) and the kwargs/always-called twins of the forward hook dicts, whose keys are the
#: same hook handles as ``_forward_hooks`` / ``_forward_pre_hooks``: left out of :func:`module_state`.
_NOT_FORWARD_STATE = frozenset(
    {
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_non_persistent_buffers_set",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
    }
)
#: the ``nn.Module`` internals :func:`module_state` reads itself (every other attribute is keyed by name)
_HANDLED = frozenset({"training", "_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"})
_NOT_KEYED = _HANDLED | _NOT_FORWARD_STATE
_EMPTY: dict = {}


def module_state(modules: Iterable[nn.Module], skip: Collection[str] = ()) -> tuple[list[torch.Tensor], tuple]:
    """What ``modules`` hold, as a cache key: ``(tensors, snapshot)``.

    ``tensors``: every parameter and buffer of each module (its own, not its children's) and any tensor held as a
    plain attribute, to key on with :class:`PECache` (identity, storage, version, dtype, device, shape).
    ``snapshot``: everything else in each module's ``__dict__``, compared by value: floats such as ``eps``, bools
    (``training``, ``elementwise_affine``), ints, strings, tuples (``normalized_shape``, ``grid_size``), lists and
    dicts, the identity of each module and of each submodule (a swapped child changes it), the forward hooks,
    and other objects by identity plus their own attributes (the PE walk). Left out: the ``nn.Module`` internals
    that cannot change a forward's values (backward and state-dict hooks) and the names in ``skip``. Nothing is
    listed by hand: an attribute that a new version of the PE path reads is keyed on without a change here.
    """
    tensors: list[Any] = []
    parts: list[Any] = []
    append = parts.append
    not_keyed = _NOT_KEYED.union(skip) if skip else _NOT_KEYED
    atoms = _ATOMS
    for m in modules:
        d = m.__dict__
        params, buffers, children = d.get("_parameters", _EMPTY), d.get("_buffers", _EMPTY), d.get("_modules", _EMPTY)
        append(_ident(m))
        append(d.get("training"))
        append(tuple(params))  # the names; a None entry shows as a tensor missing from the list
        tensors.extend(params.values())
        append(tuple(buffers))
        tensors.extend(buffers.values())
        append(tuple(children))
        append(tuple(map(_ident, children.values())))
        append(tuple(d.get("_forward_hooks", _EMPTY)))  # the hook handles' ids: unique per registration
        append(tuple(d.get("_forward_pre_hooks", _EMPTY)))
        rest = d.keys() - not_keyed  # every other attribute: eps, normalized_shape, the knobs, the walk, ...
        for k in sorted(rest):
            v = d[k]
            append(k)
            append(v if type(v) in atoms else _freeze(v, tensors))
    return [t for t in tensors if t is not None], tuple(parts)


class PECache:
    """One memoised value computed from a set of tensors (parameters) and the non-tensor state in ``extra``.

    :meth:`get` returns the stored value while every tracked tensor is the same tensor (``data_ptr``, dtype,
    device, shape, strides) with the same autograd ``_version``, no ``optimizer.step()`` ran in between, the
    ``extra`` key (the models pass the token grid and the :func:`module_state` snapshot of their PE path: ``eps``,
    the knobs, the walk, which submodule sits where, ...) and the inference-mode flag are unchanged; otherwise it
    recomputes (under ``no_grad``) and stores. The stored entry keeps a reference to the tracked storages, so
    their addresses cannot be reused by new tensors while it lives.

    What invalidates it: ``load_state_dict`` (``copy_`` bumps versions), optimizer steps (versions, plus the
    global step counter for fused optimizers, counted by a global optimizer step post-hook that the first stored
    value registers), in-place edits under ``no_grad``, ``.to()``/``.half()``/``.cuda()`` (new storage, dtype or
    device), any change of ``extra``. What it cannot see: writes that bypass autograd's version counter, such as
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

    def _serves(self, key: tuple | None) -> bool:
        if key is None or self._key is None:
            return False
        try:
            return bool(key == self._key)
        except Exception:  # a value in ``extra`` that does not compare (e.g. a changed tensor attribute): stale
            return False

    def holds(self, tensors: Iterable[torch.Tensor], extra: Any = None) -> bool:
        """Whether :meth:`get` with these arguments would return the stored value (nothing changed since)."""
        return self._serves(self._signature(tuple(tensors), extra))

    def get(self, tensors: Iterable[torch.Tensor], compute: Callable[[], Any], extra: Any = None) -> Any:
        """The cached value for ``tensors`` (+ ``extra``), computing it with ``compute()`` under no_grad if stale."""
        tensors = tuple(tensors)
        key = self._signature(tensors, extra)
        if self._serves(key):
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
