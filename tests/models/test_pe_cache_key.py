"""The inference PE cache keys on everything the PE terms are computed from.

For every family and mode: record every attribute that ``compute_pe_terms`` reads, of every module (and of the
walk), by swapping their classes for recording subclasses while it runs; then, after a cached eval call, change
each one at a time (parameters and buffers in place and replaced, floats such as ``eps``, bools, ints, strings,
tuples, swapped submodules) and compare the next cached eval output with the same model's uncached output. The
set of attributes comes from the code as it runs, not from a list, so a new attribute the walk reads is covered
without editing this test.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from mpvg_kernels.layers.pe_walk import PE_MODES, POOLS
from mpvg_kernels.models import create_model

# (registered name, extra constructor arguments, input size or None for the model's own)
CASES: list[tuple[str, dict[str, Any], tuple[int, int] | None]] = [
    ("deit_tiny_patch16_224", {}, None),
    # fc_norm after the pooling, and a PE resampled to another input size (dynamic_img_size)
    ("deit_tiny_patch16_224", dict(pool="avg", class_token=True, fc_norm=True, dynamic_img_size=True), (40, 40)),
    ("deit_tiny_distilled_patch16_224", {}, None),
    ("t2t_vit_7", {}, None),  # a fixed sin-cos PE (a buffer)
    ("cct_7_3x1_32", {}, None),  # conv tokenizer, sequence pooling
    ("ceit_tiny_patch16_224", {}, None),
    ("swin_tiny_patch4_window7_224", {}, None),  # the PE passes the PatchMerging layers
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_STRINGS = [tuple(POOLS) + ("seq",), tuple(PE_MODES), ("learn", "sincos1d", "sincos2d")]


@contextlib.contextmanager
def _record_reads(objs: list[Any]) -> Iterator[list[tuple[Any, str]]]:
    """Record every ``(object, attribute name)`` read on ``objs`` while the block runs."""
    reads: list[tuple[Any, str]] = []

    def getattribute(self: Any, name: str) -> Any:
        reads.append((self, name))
        return object.__getattribute__(self, name)

    swapped = []
    try:
        for o in objs:
            cls = type(o)
            new = type(cls.__name__, (cls,), {"__getattribute__": getattribute, "__module__": cls.__module__})
            object.__setattr__(o, "__class__", new)  # (frozen dataclasses too)
            swapped.append((o, cls))
        yield reads
    finally:
        for o, cls in swapped:
            object.__setattr__(o, "__class__", cls)


def _walk_objects(model: nn.Module) -> list[Any]:
    """Every module of the model and every object of this package one of them holds (the PE walk)."""
    objs: list[Any] = list(model.modules())
    for m in list(objs):
        for v in vars(m).values():
            if type(v).__module__.startswith("mpvg_kernels") and hasattr(v, "__dict__") and not callable(v):
                objs.append(v)
    return objs


def _perturbed_copy(m: nn.Module) -> nn.Module:
    new = copy.deepcopy(m)
    with torch.no_grad():
        for t in [*new.parameters(), *new.buffers()]:
            if t.is_floating_point():
                t.add_(0.1)
    return new


def _plain_change(v: Any) -> Any:
    """Another value of the same kind (a sentinel ``_SKIP`` where there is none)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v + 0.25
    if isinstance(v, str):
        for group in _STRINGS:
            if v in group:
                return next(s for s in group if s != v)
        return v + "_changed"
    if v is None:
        return 0
    if isinstance(v, tuple) and v and all(isinstance(e, bool) for e in v):
        return (not v[0], *v[1:])
    if isinstance(v, tuple) and v and all(isinstance(e, int) for e in v):
        return (v[0] + 1, *v[1:])
    return _SKIP


_SKIP = object()


def _mutations(o: Any, name: str, model: nn.Module) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """(what, change, undo) for the attribute ``name`` of ``o`` (an immutable object, such as the frozen PE knobs,
    is changed the only way a user can: by replacing it where the model holds it)."""
    if isinstance(o, nn.Module) and (name in o._parameters or name in o._buffers):
        t = getattr(o, name)
        if t is None or not t.is_floating_point():
            return
        saved = t.detach().clone()

        def in_place() -> None:
            with torch.no_grad():
                t.add_(0.5)

        def undo_in_place() -> None:
            with torch.no_grad():
                t.copy_(saved)

        yield "edited in place", in_place, undo_in_place
        new = saved + 0.5
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        yield "replaced", lambda: setattr(o, name, new), lambda: setattr(o, name, t)
        return
    if isinstance(o, nn.Module) and name == "_modules":  # a container indexed or iterated: swap each child
        for key, sub in list(o._modules.items()):
            if sub is not None:
                yield from _swap(o, key, sub)
        return
    if isinstance(o, nn.Module) and name in o._modules:
        if o._modules[name] is not None:
            yield from _swap(o, name, o._modules[name])
        return
    if isinstance(o, nn.Module) and name == "_forward_hooks":  # the module is called: a hook changes its output
        holder: list[Any] = []
        yield (
            "given a forward hook",
            lambda: holder.append(o.register_forward_hook(lambda m, args, out: out + 0.1)),
            lambda: holder.pop().remove(),
        )
        return
    if isinstance(o, nn.Module) and name == "_forward_pre_hooks":
        holder = []
        yield (
            "given a forward pre-hook",
            lambda: holder.append(o.register_forward_pre_hook(lambda m, args: (args[0] * 1.5, *args[1:]))),
            lambda: holder.pop().remove(),
        )
        return
    if name.startswith("__"):
        return
    in_dict = name in vars(o)
    if not in_dict:
        static = inspect.getattr_static(type(o), name, None)
        if callable(static) or isinstance(static, (property, classmethod, staticmethod)):
            return  # a method or property: what it reads is recorded separately
    old = getattr(o, name)
    new = _plain_change(old)
    if new is _SKIP:
        return

    if dataclasses.is_dataclass(o) and type(o).__dataclass_params__.frozen:
        holders = [(m, k) for m in model.modules() for k, v in vars(m).items() if v is o]
        try:
            replaced = dataclasses.replace(o, **{name: new})
        except (TypeError, ValueError):
            return  # not a value the object accepts
        yield (
            f"= {new!r} (was {old!r}), the object replaced where the model holds it",
            lambda: [setattr(m, k, replaced) for m, k in holders],
            lambda: [setattr(m, k, o) for m, k in holders],
        )
        return

    def undo() -> None:
        if in_dict:
            setattr(o, name, old)
        else:
            delattr(o, name)  # back to the class attribute

    yield f"= {new!r} (was {old!r})", lambda: setattr(o, name, new), undo


def _swap(o: nn.Module, key: str, sub: nn.Module) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    new = _perturbed_copy(sub)
    yield "swapped for a perturbed copy", lambda: setattr(o, key, new), lambda: setattr(o, key, sub)


def _outcome(fn: Callable[[], torch.Tensor]) -> torch.Tensor | type:
    try:
        return fn()
    except Exception as e:  # the model refuses the changed attribute: both paths must refuse it alike
        return type(e)


@pytest.mark.parametrize("pe", PE_MODES)
@pytest.mark.parametrize(
    ("name", "kwargs", "size"), CASES, ids=[f"{c[0]}{'-' + '-'.join(c[1]) if c[1] else ''}" for c in CASES]
)
def test_every_attribute_the_pe_terms_read_invalidates_the_cache(
    name: str, kwargs: dict[str, Any], size: tuple[int, int] | None, pe: str
) -> None:
    torch.manual_seed(0)
    model = create_model(name, pe=pe, tiny=True, **kwargs).eval()
    if not model._pe_tensors():
        pytest.skip(reason=f"{name} in mode {pe!r} has no absolute PE: the model caches no PE terms to go stale")
    c, h, w = model.default_cfg["input_size"]
    x = torch.randn(1, c, *(size or (h, w)), generator=torch.Generator().manual_seed(1))

    def cached() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def fresh() -> torch.Tensor:  # the same forward, with the PE terms computed now from the current model
        with torch.no_grad():
            own = not hasattr(model.patch_embed, "grid_for")  # Swin: its own grid only
            return model(x, pe_terms=model.compute_pe_terms(None if own else model._grid(x)))

    def live() -> torch.Tensor:  # the cache switched off: the terms computed along the walk by the fused ops
        model.pe_cache_enabled = False
        try:
            with torch.no_grad():
                return model(x)
        finally:
            model.pe_cache_enabled = True

    baseline = cached()
    hits = model.pe_cache.hits
    torch.testing.assert_close(cached(), baseline, rtol=0, atol=0)
    assert model.pe_cache.hits == hits + 1, "the cache is not used in eval"

    objs = _walk_objects(model)
    labels = {id(m): n or "model" for n, m in model.named_modules()}
    labels.update(
        {
            id(v): f"{labels[id(m)]}.{k}"
            for m in model.modules()
            for k, v in vars(m).items()
            if any(v is o for o in objs)
        }
    )
    grid = model._default_grid() if size is None else model._grid(x)
    with torch.no_grad(), _record_reads(objs) as reads:
        model.compute_pe_terms(grid)
    seen: set[tuple[int, str]] = set()
    sites = [(o, n) for o, n in reads if (id(o), n) not in seen and not seen.add((id(o), n))]
    assert pe == "default" or any(n == "eps" for _, n in sites), "the recording missed the LayerNorms' eps"
    # the key covers every module whose own attributes the PE terms read (a container whose children alone are
    # read is covered by the children's identities), and every tensor the family lists as a PE tensor
    keyed = [model, *model._pe_modules()]
    for o, attr in sites:
        if (
            isinstance(o, nn.Module)
            and attr not in o._modules
            and attr != "_modules"
            and attr in vars(o) | o._parameters | o._buffers
        ):
            assert any(o is m for m in keyed), f"{labels[id(o)]}.{attr} is read but {labels[id(o)]} is not keyed"
    key_tensors = model._pe_key()[0]
    assert all(any(t is k for k in key_tensors) for t in model._pe_tensors())

    checked = changed = 0
    stale: list[str] = []
    for o, attr in sites:
        for what, change, undo in _mutations(o, attr, model):
            with torch.no_grad():
                model.pe_terms(grid)  # the cache holds the terms of the unchanged model
            change()
            try:
                got = _outcome(cached)
                want = _outcome(fresh) if isinstance(got, torch.Tensor) else None
                other = _outcome(live) if isinstance(got, torch.Tensor) else None
            finally:
                undo()
            checked += 1
            if not isinstance(got, torch.Tensor):
                continue  # the cached call refused the change: loud, not stale
            where = f"{labels.get(id(o), type(o).__name__)}.{attr} {what}"
            if not isinstance(want, torch.Tensor):
                stale.append(f"{where}: the cached call answered, computing the terms now raised {want.__name__}")
            elif not torch.equal(got, want):
                stale.append(
                    f"{where}: cached output off the output with fresh terms by {(got - want).abs().max():.3g}"
                )
            elif isinstance(other, torch.Tensor) and not torch.allclose(got, other, rtol=1e-3, atol=1e-4):
                stale.append(f"{where}: cached output off the uncached one by {(got - other).abs().max():.3g}")
            else:
                changed += not torch.allclose(want, baseline, rtol=1e-4, atol=1e-5)
    assert not stale, "stale PE terms after:\n" + "\n".join(stale)
    assert checked >= 3 and changed >= 1, (checked, changed)
    torch.testing.assert_close(cached(), baseline, rtol=0, atol=0)  # every change was undone
