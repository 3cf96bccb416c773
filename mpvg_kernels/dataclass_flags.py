"""Command-line flags generated from a configuration dataclass: one flag per field, the same way for every command.

A field documents itself through its metadata (see :func:`option`): ``help`` (required), and optionally
``choices``, its valid range (``ge``/``gt``/``le``/``lt``: bounds of a number, or of every number of a list; a bound
may be a :class:`Bound` computed when checked, e.g. the CPU count), ``length`` (a list of exactly that many values),
``ordered`` (a list whose values do not decrease, e.g. ``[min, max]``), ``flags`` (the option strings, default
``--field-name``), ``sep`` (a list given as one ``sep``-separated word, e.g. ``--models a,b``), ``item`` (a dict
field filled by a repeatable flag whose every value ``item(text)`` turns into a ``(key, value)`` pair), ``metavar``
and ``default_help`` (what the help shows as the default instead of the field's own default).

Every float must be finite. :func:`check_field` applies all of these; :func:`coerce_value` calls it, so a value from
any source (recipe, ``--set``, flag) is checked where it is read, and a caller may re-check a whole instance.
:func:`load_yaml` is the one YAML reader: no anchors or aliases (an alias bomb cannot expand), errors in one line.

Every generated flag defaults to ``None``, meaning "not given", so that a caller can layer explicit flags over other
sources (a recipe, ``--set``, a preset such as ``mpvg bench --smoke``). :func:`explicit_values` reads them back,
type-coerced. ``mpvg train`` (``TrainConfig``) and ``mpvg bench`` (``BenchConfig``) both use it.

Imports nothing of the package but :mod:`mpvg_kernels.errors`, so every layer may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Union

import yaml

from .errors import UserError

__all__ = [
    "Bound",
    "add_dataclass_flags",
    "check_field",
    "coerce_type",
    "coerce_value",
    "explicit_values",
    "field_flags",
    "flag_name",
    "load_yaml",
    "option",
    "range_text",
    "show",
    "unwrap_optional",
]


def option(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - "help" mirrors argparse
    """A dataclass field with ``help`` (and other flag) metadata; list and dict defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


class Bound:
    """A range bound computed when a value is checked (e.g. the number of CPUs of this machine)."""

    def __init__(self, compute: Callable[[], float], text: str) -> None:
        self.compute, self.text = compute, text

    def value(self) -> float:
        """The bound on this machine."""
        return self.compute()

    def __str__(self) -> str:
        return f"{self.text} = {show(self.value())}"


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases, so a document cannot expand beyond its own size."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "YAML anchors and aliases (&name, *name) are not supported",
                                              event.start_mark)
        return super().compose_node(parent, index)


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) folded into one space."""
    return " ".join(str(text).split())


def load_yaml(text: str, what: str) -> Any:
    """Parse YAML ``text`` (safe types only, no anchors or aliases); a :class:`UserError` starting with ``what``
    and in one line when it cannot be parsed."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise UserError(f"{what}: cannot parse {one_line(text)[:80]!r}: {one_line(e)}") from None
    except RecursionError:
        raise UserError(f"{what}: cannot parse {one_line(text)[:80]!r}: nested too deeply") from None


def _bound(meta: Any, key: str) -> float | None:
    b = meta.get(key)
    return b.value() if isinstance(b, Bound) else b


def range_text(meta: Any) -> str:
    """The valid range declared in a field's metadata, as the help shows it (``"[0, 1)"``, ``">= 1"``; ``""``
    when none)."""
    lo_key = "ge" if "ge" in meta else "gt" if "gt" in meta else None
    hi_key = "le" if "le" in meta else "lt" if "lt" in meta else None
    lo = show(meta[lo_key]) if lo_key else None
    hi = str(meta[hi_key]) if hi_key and isinstance(meta[hi_key], Bound) else show(meta[hi_key]) if hi_key else None
    if lo is not None and hi is not None:
        return f"{'[' if lo_key == 'ge' else '('}{lo}, {hi}{']' if hi_key == 'le' else ')'}"
    if lo is not None:
        return f"{'>=' if lo_key == 'ge' else '>'} {lo}"
    if hi is not None:
        return f"{'<=' if hi_key == 'le' else '<'} {hi}"
    return ""


def check_field(cls: type, name: str, value: Any, what: str | None = None) -> None:
    """Check an already coerced ``value`` of field ``name`` of ``cls`` against the field's metadata: ``choices``,
    finite floats, the range (``ge``/``gt``/``le``/``lt``, per number of a list), ``length`` and ``ordered``.
    A :class:`UserError` starting with ``what`` (default: ``config key 'NAME'``) names the rule broken."""
    what = what or f"config key {name!r}"
    meta = {f.name: f for f in dataclasses.fields(cls)}[name].metadata
    if value is None:
        return
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    choices = meta.get("choices")
    for v in items:
        if choices and v not in choices:
            raise UserError(f"{what}: {v!r} is not one of {', '.join(choices)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{what} must be finite, got {value}")
    if "length" in meta and len(items) != meta["length"]:
        raise UserError(f"{what}: {value} must have {meta['length']} values, got {len(items)}")
    if meta.get("ordered") and any(a > b for a, b in zip(items, items[1:], strict=False)):
        raise UserError(f"{what}: {value} must be [min, max] with min <= max")
    rules = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b,
             "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        for key, ok in rules.items():
            b = _bound(meta, key)
            if b is not None and not ok(v, b):
                raise UserError(f"{what} {v} is out of range (valid: {range_text(meta)})" if len(items) == 1 else
                                f"{what} {value}: {v} is out of range (valid for every value: {range_text(meta)})")


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; any other type -> ``(type, False)``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce_type(tp: Any, value: Any) -> Any:
    """Convert an already parsed value (YAML scalar, list, mapping) to ``tp``; ``ValueError`` when it does not fit."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError("expected a string")
        return str(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list")
        return [coerce_type(item, v) for v in value]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(items) != len(value):
            raise ValueError(f"expected {len(items)} values")
        return tuple(coerce_type(i, v) for i, v in zip(items, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError("expected a mapping")
        (_, vt) = typing.get_args(tp) or (str, Any)
        return {str(k): v if vt is Any else coerce_type(vt, v) for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp}")


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce_value(cls: type, name: str, value: Any, what: str | None = None) -> Any:
    """Convert ``value`` (YAML, or a command-line string parsed as YAML) to the type of field ``name`` of ``cls``.

    Strings are parsed as YAML first, so ``betas=[0.9,0.95]`` and ``clip_grad=none`` work and ``5e-4`` (a string to
    YAML 1.1) becomes a float. A wrong type, or a value that breaks a rule of :func:`check_field` (choices, range),
    is a :class:`UserError` whose message starts with ``what`` (default: ``config key 'NAME'``).
    """
    what = what or f"config key {name!r}"
    tp, optional = unwrap_optional(typing.get_type_hints(cls)[name])
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        if text.lower() in ("none", "null", "~", ""):
            value = None
        else:
            value = load_yaml(text, what)
    if value is None:
        if optional:
            return None
        raise UserError(f"{what} cannot be None")
    try:
        out = coerce_type(tp, value)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what}: {value!r} is not a valid {type_name(tp)} ({e})") from None
    check_field(cls, name, out, what)
    return out


def flag_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def field_flags(f: dataclasses.Field) -> list[str]:
    """The option strings of a field: its ``flags`` metadata, else ``--field-name``."""
    return list(f.metadata.get("flags") or [flag_name(f.name)])


def show(v: Any, sep: str | None = None) -> str:
    """A default as the help text shows it."""
    if isinstance(v, float):
        return f"{v:g}"
    if v is None:
        return "None"
    if sep and isinstance(v, (list, tuple)):
        return sep.join(map(str, v)) if v else "none"
    return str(v)


def _split(sep: str) -> Callable[[str], list[str]]:
    def split(text: str) -> list[str]:
        return [v.strip() for v in text.split(sep) if v.strip()]

    split.__name__ = f"{sep!r}-separated list"
    return split


def add_dataclass_flags(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    shown: dict[str, Any] | None = None,
    shown_note: str = "",
    skip: Iterable[str] = (),
) -> None:
    """Add one flag per field of dataclass ``cls`` to ``parser`` (a parser or an argument group).

    Every flag defaults to ``None`` (not given), ``dest`` is the field name. The help ends with
    ``(default: ...)``: ``shown[name]`` when given (e.g. a recipe's value; then ``shown_note`` and the built-in
    value follow when they differ), else the field's ``default_help`` or default. ``skip``: fields whose flag the
    caller adds itself (a shared flag such as ``--device``).
    """
    shown = shown or {}
    skipped = set(skip)
    base = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skipped:
            continue
        meta = f.metadata
        tp, optional = unwrap_optional(hints[f.name])
        sep = meta.get("sep")
        if f.name in shown:
            default_text = show(shown[f.name], sep)
            if shown[f.name] != base[f.name]:
                default_text += f"{shown_note}; built-in {show(base[f.name], sep)}"
        else:
            default_text = meta.get("default_help") or show(base[f.name], sep)
        help_text = meta["help"]
        if meta.get("choices") and typing.get_origin(tp) is list:
            help_text += f", from {', '.join(meta['choices'])}"
        rng = range_text(meta)
        help_text += f" (default: {default_text}" + (f"; range: {rng})" if rng else ")")
        kwargs: dict[str, Any] = {"default": None, "dest": f.name}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            if sep:
                kwargs["type"] = _split(sep)
                kwargs["metavar"] = meta.get("metavar", f"V{sep}V")
            else:
                kwargs["nargs"] = "+"
                kwargs["metavar"] = meta.get("metavar", "V")
            if optional:
                help_text += "; 'none' turns it off"
        elif typing.get_origin(tp) is dict:
            if "item" in meta:
                kwargs["action"] = "append"
                kwargs["type"] = meta["item"]
            kwargs["metavar"] = meta.get("metavar", "YAML")
        elif "choices" in meta:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = meta.get("metavar", tp.__name__.upper())
        kwargs["help"] = help_text.replace("%", "%%")
        parser.add_argument(*field_flags(f), **kwargs)


def explicit_values(args: argparse.Namespace, cls: type, *, skip: Iterable[str] = (), coerce: bool = True) -> dict:
    """The generated flags of ``cls`` read back from ``args``: ``{field: value}``, ``None`` when not given.

    A list flag given as the single word ``none`` gives ``"none"`` for an optional field (turned into ``None`` by
    coercion). Values of repeatable ``item`` flags are gathered into a dict. With ``coerce``, given values are
    converted to the field's type (:func:`coerce_value`, errors name the flag).
    """
    hints = typing.get_type_hints(cls)
    skipped = set(skip)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skipped:
            continue
        v = getattr(args, f.name, None)
        _, optional = unwrap_optional(hints[f.name])
        if isinstance(v, list) and len(v) == 1 and str(v[0]).lower() in ("none", "null") and optional:
            v = "none"
        elif v is not None and "item" in f.metadata:
            v = dict(v)
        if v is not None and coerce:
            v = coerce_value(cls, f.name, v, what=field_flags(f)[0])
        out[f.name] = v
    return out
