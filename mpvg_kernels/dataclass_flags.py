"""Command-line flags generated from a configuration dataclass: one flag per field, the same way for every command.

A field documents itself through its metadata (see :func:`option`): ``help`` (required), and optionally
``choices``, ``flags`` (the option strings, default ``--field-name``), ``sep`` (a list given as one
``sep``-separated word, e.g. ``--models a,b``), ``item`` (a dict field filled by a repeatable flag whose every value
``item(text)`` turns into a ``(key, value)`` pair), ``metavar`` and ``default_help`` (what the help shows as the
default instead of the field's own default).

Every generated flag defaults to ``None``, meaning "not given", so that a caller can layer explicit flags over other
sources (a recipe, ``--set``, a preset such as ``mpvg bench --smoke``). :func:`explicit_values` reads them back,
type-coerced. ``mpvg train`` (``TrainConfig``) and ``mpvg bench`` (``BenchConfig``) both use it.

Imports nothing of the package but :mod:`mpvg_kernels.errors`, so every layer may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Union

import yaml

from .errors import UserError

__all__ = [
    "add_dataclass_flags",
    "coerce_type",
    "coerce_value",
    "explicit_values",
    "field_flags",
    "flag_name",
    "option",
    "show",
    "unwrap_optional",
]


def option(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - "help" mirrors argparse
    """A dataclass field with ``help`` (and other flag) metadata; list and dict defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


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
    YAML 1.1) becomes a float. A wrong type, or a value outside the field's ``choices``, is a :class:`UserError`
    whose message starts with ``what`` (default: ``config key 'NAME'``).
    """
    what = what or f"config key {name!r}"
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    tp, optional = unwrap_optional(typing.get_type_hints(cls)[name])
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        if text.lower() in ("none", "null", "~", ""):
            value = None
        else:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise UserError(f"{what}: cannot parse {text!r} ({e})") from None
    if value is None:
        if optional:
            return None
        raise UserError(f"{what} cannot be None")
    try:
        out = coerce_type(tp, value)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what}: {value!r} is not a valid {type_name(tp)} ({e})") from None
    choices = f.metadata.get("choices")
    for v in out if isinstance(out, list) else [out]:
        if choices and v not in choices:
            raise UserError(f"{what}: {v!r} is not one of {', '.join(choices)}")
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
        help_text += f" (default: {default_text})"
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
