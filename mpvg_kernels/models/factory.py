"""Models for the tools: build a registered model with user-facing errors, and read ``mpvg train`` checkpoints back
into the model they were trained with.

Training writes the checkpoints (:mod:`mpvg_kernels.train.checkpoint`, which re-exports these names); evaluation,
prediction, export and analysis read them through this module, so none of them needs the training package. A
checkpoint is a dict of tensors and primitive containers only (no pickled classes), read with
``torch.load(weights_only=True)``::

    format: "mpvg-kernels-checkpoint", version: 1
    model: {name, pe, kwargs, num_classes, params}      # enough for eval/predict to rebuild the model
    data: {spec, classes, in_chans, input_size, mean, std, crop_pct, eval_resize}
    config: the TrainConfig as a dict
    epoch: completed epochs; world_size
    state_dict, ema (None or {updates, state_dict}), optimizer, scheduler, scaler (None for bf16/fp32)
    rng: one entry per rank {torch, cuda, numpy, python}

A checkpoint file is untrusted input: :func:`validate_checkpoint` checks the type and range of every field above
that eval, predict and export read (the trainer's own state, optimizer to rng, is the trainer's), and
:func:`model_from_checkpoint` checks the model the metadata describes against the weights the file holds before
building it (on the ``meta`` device, which allocates nothing), so no field can make a command allocate more than
the file holds. Every failure is a :class:`~mpvg_kernels.errors.UserError` naming the field.

The same checkpoint can be shared as ``.safetensors`` (:func:`safetensors_checkpoint_bytes`, ``mpvg export
--format safetensors``): the state dict as tensors, the rest as JSON strings in the file's metadata
(``format``, ``version``, ``model``, ``data``, ``config``, ``epoch``, plus the deployment keys of ONNX exports).
:func:`read_torch_file` reads it back into the dict above without unpickling anything; a ``.safetensors`` file
without that metadata (e.g. timm's) is returned as its plain state dict.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import reprlib
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ..errors import UserError
from .pretrained import is_safetensors, read_safetensors
from .registry import create_model, list_models

FORMAT = "mpvg-kernels-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "model", "data", "config", "epoch", "state_dict")
#: The checkpoint file of an ``mpvg train`` run folder (the trainer writes it under this name); a folder given as a
#: checkpoint means this file in it.
CHECKPOINT_NAME = "checkpoint.pt"
#: The largest image side (pixels) a checkpoint may declare (``data.input_size``, the model's input size).
MAX_INPUT_SIDE = 4096
#: The most submodules a model built without a checkpoint to compare with may have (a guard against options such
#: as ``depth=10**7``; the largest registered models have a few thousand).
MAX_MODULES = 100_000
#: The largest integer a model option may be (a size, a depth, a count; the registered models' largest is 4096):
#: constructors loop over such values before any module exists.
MAX_OPTION_INT = 1 << 16
#: Data fields eval and predict need (:func:`validate_checkpoint` with ``require_data=True``).
DATA_KEYS = ("spec", "classes", "in_chans", "input_size", "mean", "std", "crop_pct")
EVAL_RESIZES = ("full", "center_crop")
#: Where :func:`build_model` records ``{name, pe, kwargs, num_classes}`` on the model (read by the exports).
MODEL_META_ATTR = "_mpvg_model_meta"
#: The checkpoint entries a ``.safetensors`` checkpoint holds as JSON metadata.
_JSON_ENTRIES = ("model", "data", "config", "epoch")


# ----------------------------------------------------------------------------------------------------------------
# models

def build_model(name: str, pe: str, num_classes: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``mpvg_kernels.models.create_model`` with clear errors for an unknown name or bad keyword arguments."""
    available = list(list_models())
    if name not in available:
        raise UserError(f"unknown model {name!r}; available models: {', '.join(available)}")
    try:
        model = create_model(name, pe=pe, num_classes=num_classes, **(kwargs or {}))
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError, ArithmeticError, IndexError,
            AttributeError) as e:  # what a constructor raises for options it cannot take
        raise UserError(f"cannot build model {name!r} (pe={pe!r}, num_classes={num_classes}, "
                        f"kwargs={_show(kwargs or {})}): {type(e).__name__}: {_first_line(e)}") from None
    classes = getattr(model, "num_classes", num_classes)
    model.__dict__[MODEL_META_ATTR] = {"name": name, "pe": pe, "kwargs": dict(kwargs or {}), "num_classes": classes}
    return model


class _TooManyModules(Exception):
    """Raised while building a model on the meta device once it has more submodules than allowed."""


@contextlib.contextmanager
def _module_budget(limit: int) -> Iterator[None]:
    """Raise :class:`_TooManyModules` as soon as more than ``limit`` submodules are registered (any module)."""
    from torch.nn.modules.module import register_module_module_registration_hook

    count = [0]

    def hook(module: nn.Module, name: str, sub: nn.Module | None) -> None:
        count[0] += 1
        if count[0] > limit:
            raise _TooManyModules(limit)

    handle = register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def build_meta_model(name: str, pe: str, num_classes: int | None, kwargs: dict[str, Any] | None,
                     max_modules: int = MAX_MODULES) -> nn.Module:
    """:func:`build_model` on the ``meta`` device: the model's shapes and ``default_cfg`` without allocating its
    weights. An integer option above :data:`MAX_OPTION_INT` and a model with more than ``max_modules`` submodules
    (found while building) are a :class:`UserError`."""
    for key, value in (kwargs or {}).items():
        if any(abs(v) > MAX_OPTION_INT for v in _ints(value)):
            raise UserError(f"model option {key}={_show(value)}: integers above {MAX_OPTION_INT} describe no model")
    try:
        with torch.device("meta"), _module_budget(max_modules):
            return build_model(name, pe, num_classes, kwargs)  # type: ignore[arg-type]
    except _TooManyModules:
        raise UserError(f"model {name!r} with options {_show(kwargs or {})} has more than {max_modules} "
                        "submodules") from None


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors (numel x element size, summed)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def available_memory() -> int:
    """Bytes this process can still allocate: the system's available memory (``MemAvailable``), less where the
    process has an address-space limit (``RLIMIT_AS``)."""
    import resource

    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            used = 0
        avail = min(avail, max(0, soft - used))
    return avail


def _oversized_input(model: nn.Module) -> str | None:
    """Why the model's input size (``default_cfg``) is refused (a side above :data:`MAX_INPUT_SIDE`), else None."""
    _, h, w = (int(v) for v in model.default_cfg["input_size"])
    if max(h, w) > MAX_INPUT_SIDE:
        return f"give the model an input size of {h} x {w}, beyond {MAX_INPUT_SIDE} pixels a side"
    return None


def check_model_fits(name: str, pe: str, num_classes: int | None, kwargs: dict[str, Any] | None) -> None:
    """A :class:`UserError` when the model's input size is beyond :data:`MAX_INPUT_SIDE` or its weights (measured
    on the meta device) would not fit in :func:`available_memory`; nothing is allocated."""
    meta = build_meta_model(name, pe, num_classes, kwargs)
    why = _oversized_input(meta)
    if why is not None:
        raise UserError(f"model {name!r}: the options {_show(kwargs or {})} {why}")
    need, avail = tensor_bytes(meta.state_dict()), available_memory()
    if need > avail:
        raise UserError(f"model {name!r} (num_classes={num_classes}, options {_show(kwargs or {})}) needs "
                        f"{need / 2**30:.1f} GiB for its weights; {avail / 2**30:.1f} GiB of memory is available")


def mismatch_parts(missing: list[str], unexpected: list[str], shapes: list[str],
                   missing_note: str = "keys", unexpected_word: str = "unexpected",
                   unexpected_note: str = "keys") -> list[str]:
    """The readable pieces of a state-dict mismatch, the first few names of each kind (empty: no mismatch)."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} {missing_note} (e.g. {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{unexpected_word} {len(unexpected)} {unexpected_note} (e.g. {', '.join(unexpected[:4])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
    return parts


def state_dict_mismatch(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """:func:`mismatch_parts` of loading ``state_dict`` into a model whose state dict is ``own`` (names and
    shapes only: ``own`` may be on the meta device)."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    return mismatch_parts(missing, unexpected, shapes)


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(strict=True)`` with a readable error listing what does not match."""
    parts = state_dict_mismatch(model.state_dict(), state_dict)
    if parts:
        raise UserError(f"{where} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The file a ``--checkpoint`` value names: the path itself, or a run folder's :data:`CHECKPOINT_NAME`; a
    :class:`UserError` when there is no such regular file."""
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise UserError(f"{path} is a folder without {CHECKPOINT_NAME}: give a checkpoint file or the folder of "
                            "an `mpvg train` run")
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a regular file")
    return path


def _exported_kind(path: Path) -> str | None:
    """``an ONNX file`` / ``a torch.export (.pt2) program`` when ``path`` is an exported model, else None."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            if any(n.endswith(("/archive_format", "/serialized_exported_program.json", "/models/model.json"))
                   for n in names):
                return "a torch.export (.pt2) program"
            return None
        with open(path, "rb") as f:
            head = f.read(1)
        if head == b"\x08":  # field 1 (ir_version) of an ONNX ModelProto
            import onnx

            m = onnx.load(str(path), load_external_data=False)
            if m.ir_version and len(m.graph.node):
                return "an ONNX file"
    except Exception:  # noqa: BLE001 - only a diagnosis: anything unreadable is "not an exported model"
        return None
    return None


def read_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a missing or unreadable file is a :class:`UserError`.

    ``path`` may be a run folder (its :data:`CHECKPOINT_NAME`); an exported model (ONNX, pt2) is named as such."""
    path = checkpoint_file(path)
    if is_safetensors(path):
        return read_safetensors_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt zip, truncated file, foreign pickle ...
        kind = _exported_kind(path)
        if kind is not None:
            raise UserError(f"{path} is {kind} (an exported model), not a checkpoint: give the checkpoint.pt of an "
                            "`mpvg train` run (or timm/DeiT-format weights)") from None
        raise UserError(f"cannot load checkpoint {path}: the file is corrupt, truncated or not a torch checkpoint "
                        f"({type(e).__name__}: {_first_line(e)})") from None


def read_safetensors_file(path: str | os.PathLike) -> dict[str, Any]:
    """A ``.safetensors`` file: the ``mpvg train`` checkpoint dict it holds (serialised by
    :func:`safetensors_checkpoint_bytes`), else its plain state dict. Nothing is unpickled."""
    try:
        tensors, meta = read_safetensors(path)
    except ImportError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - truncated header, not a safetensors file ...
        raise UserError(f"cannot load {path}: not a readable .safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        return tensors
    try:
        ckpt: dict[str, Any] = {"format": FORMAT, "version": int(meta["version"])}
        ckpt.update({k: json.loads(meta[k]) for k in _JSON_ENTRIES})
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: the mpvg-kernels metadata of this .safetensors file is incomplete ({e})") from None
    ckpt.update(state_dict=tensors, ema=None)
    return ckpt


def safetensors_checkpoint_bytes(
    state_dict: dict[str, torch.Tensor], entries: dict[str, Any], extra: dict[str, str]
) -> bytes:
    """``state_dict`` serialised as ``.safetensors`` with the checkpoint ``entries`` (model, data, config, epoch) as
    JSON metadata plus ``extra`` (str -> str), checked by reading the bytes back (every tensor and the metadata).
    Writing them is the caller's (``mpvg_kernels.export.write_file_atomically``)."""
    import safetensors.torch as st

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {**{k: str(v) for k, v in extra.items()}, "format": FORMAT, "version": str(VERSION)}
    meta.update({k: json.dumps(entries[k]) for k in _JSON_ENTRIES})
    data = st.save(tensors, metadata=meta)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    back = st.load(data)
    if (
        header.get("__metadata__") != meta
        or back.keys() != tensors.keys()
        or not all(torch.equal(back[k], t) for k, t in tensors.items())
    ):
        raise UserError("serialising the weights as safetensors: the bytes read back differ from the weights")
    return data


def is_train_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is an ``mpvg train`` checkpoint (as opposed to, e.g., a bare state dict)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


# ----------------------------------------------------------------------------------------------------------------
# validation of an untrusted checkpoint

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxlevel = 40, 40, 6, 6, 4, 3


def _show(value: Any) -> str:
    """A short one-line repr of an untrusted value."""
    return _REPR.repr(value).replace("\n", " ")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class _Fields:
    """Type and range checks of checkpoint fields; each failure is a :class:`UserError` naming the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, value: Any, what: str) -> NoReturn:
        raise UserError(f"{self.where}: {field} {_show(value)}: {what}")

    def missing(self, field: str, note: str = "") -> NoReturn:
        raise UserError(f"{self.where}: {field} is missing{note}")

    def mapping(self, field: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, value, "must be a dict")
        return value

    def integer(self, field: str, value: Any, lo: int, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            self.fail(field, value, f"must be an integer {'>= ' + str(lo) if hi is None else f'from {lo} to {hi}'}")
        return value

    def number(self, field: str, value: Any, lo: float, hi: float | None = None, lo_open: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
        if not ok:
            bounds = ([f"{'>' if lo_open else '>='} {lo}"] if lo > -math.inf else []) + ([f"<= {hi}"] if hi else [])
            self.fail(field, value, " ".join(["must be a finite number", " and ".join(bounds)]).strip())
        return float(value)

    def text(self, field: str, value: Any, choices: tuple[str, ...] | list[str] | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, value, "must be a non-empty string")
        if choices is not None and value not in choices:
            self.fail(field, value, f"must be one of {', '.join(choices)}")
        return value

    def numbers(self, field: str, value: Any, lengths: tuple[int, ...], lo: float, lo_open: bool) -> None:
        if not isinstance(value, (list, tuple)) or len(value) not in lengths:
            self.fail(field, value, f"must be a list of {' or '.join(str(n) for n in lengths)} numbers")
        for i, v in enumerate(value):
            self.number(f"{field}[{i}]", v, lo, lo_open=lo_open)

    def plain(self, field: str, value: Any, depth: int = 0) -> None:
        """A model option: None, bool, int, finite float, str, or a list/tuple/dict of those (small, shallow)."""
        if value is None or isinstance(value, (bool, int, str)):
            return
        if isinstance(value, float):
            if not math.isfinite(value):
                self.fail(field, value, "must be finite")
            return
        if isinstance(value, (list, tuple, dict)):
            if depth >= 3 or len(value) > 64:
                self.fail(field, value, "is nested or long beyond any model option")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(value, dict) and not isinstance(k, str):
                    self.fail(field, k, "keys must be strings")
                self.plain(f"{field}[{k!r}]" if isinstance(value, dict) else f"{field}[{k}]", v, depth + 1)
            return
        self.fail(field, value, f"a {type(value).__name__} is not a model option value")

    def tensors(self, field: str, value: Any) -> dict[str, torch.Tensor]:
        """A non-empty dict of names to dense CPU tensors, none claiming more bytes than its storage holds, the
        whole at most 4x the bytes stored (so a model that matches them is bounded by the file's size)."""
        if not isinstance(value, dict) or not value:
            self.fail(field, value, "must be a non-empty dict of tensors")
        stored: dict[int, int] = {}
        for k, t in value.items():
            if not isinstance(k, str) or not isinstance(t, torch.Tensor):
                self.fail(f"{field}[{_show(k)}]", t, "must map a name to a tensor")
            if t.layout != torch.strided or t.device.type != "cpu":
                self.fail(f"{field}[{k!r}]", t.layout, f"must be a dense CPU tensor (is {t.layout} on {t.device})")
            storage = t.untyped_storage()
            if t.numel() * t.element_size() > storage.nbytes():
                self.fail(f"{field}[{k!r}]", tuple(t.shape), f"claims more elements than the {storage.nbytes()} "
                          "bytes it holds")
            stored[storage.data_ptr()] = storage.nbytes()
        if tensor_bytes(value) > 4 * sum(stored.values()) + (1 << 20):
            self.fail(field, f"{len(value)} tensors", "views repeat the same data far beyond the bytes stored")
        return value


def _ints(value: Any) -> Iterator[int]:
    """The integers in a plain value (nested lists, tuples, dicts), booleans excluded."""
    if isinstance(value, int) and not isinstance(value, bool):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _ints(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _ints(v)


def _validate_model_meta(meta: Any, where: str) -> dict[str, Any]:
    """The ``model`` entry: name (registered), pe, num_classes >= 1, kwargs (model options), params."""
    from .. import models

    f = _Fields(where)
    meta = f.mapping("model", meta)
    for key in ("name", "pe", "num_classes"):
        if key not in meta:
            f.missing(f"model.{key}")
    name = f.text("model.name", meta["name"])
    if name not in models.list_models():
        f.fail("model.name", name, f"unknown model {name!r}")
    f.text("model.pe", meta["pe"], models.PE_MODES)
    f.integer("model.num_classes", meta["num_classes"], 1)
    kwargs = meta.get("kwargs")
    if kwargs is not None:
        f.mapping("model.kwargs", kwargs)
        for key, value in kwargs.items():
            if not isinstance(key, str) or not key.isidentifier():
                f.fail("model.kwargs", key, "option names must be identifiers")
            f.plain(f"model.kwargs.{key}", value)
        if kwargs.get("checkpoint_path") is not None and not isinstance(kwargs["checkpoint_path"], str):
            f.fail("model.kwargs.checkpoint_path", kwargs["checkpoint_path"], "must be a path (string) or None")
    if meta.get("params") is not None:
        f.integer("model.params", meta["params"], 0)
    return meta


def _validate_data(data: dict[str, Any], num_classes: int, f: _Fields, require: bool) -> None:
    """The ``data`` entry's fields that are present (all of :data:`DATA_KEYS` when ``require``)."""
    if require:
        for key in DATA_KEYS:
            if key not in data:
                f.missing(f"data.{key}", " (eval and predict need it)")
    if "spec" in data:
        f.text("data.spec", data["spec"])
    if "classes" in data:
        classes = data["classes"]
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            f.fail("data.classes", classes, "must be a list of class names (strings)")
        if len(classes) != num_classes:
            f.fail("data.classes", classes, f"has {len(classes)} names but model.num_classes is {num_classes} "
                   "(one name per output)")
        if len(set(classes)) != len(classes):
            f.fail("data.classes", classes, "names repeat")
    in_chans = f.integer("data.in_chans", data["in_chans"], 1, 3) if "in_chans" in data else None
    if in_chans == 2:
        f.fail("data.in_chans", 2, "must be 1 or 3")
    if "input_size" in data:
        size = data["input_size"]
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            f.fail("data.input_size", size, f"must be [height, width] (integers from 1 to {MAX_INPUT_SIDE})")
        for i, v in enumerate(size):
            f.integer(f"data.input_size[{i}]", v, 1, MAX_INPUT_SIDE)
    lengths = (1, 3) if in_chans is None else (1, in_chans) if in_chans > 1 else (1,)
    if "mean" in data:
        f.numbers("data.mean", data["mean"], lengths, -math.inf, lo_open=False)
    if "std" in data:
        f.numbers("data.std", data["std"], lengths, 0.0, lo_open=True)
    if "crop_pct" in data:
        f.number("data.crop_pct", data["crop_pct"], 0.0, 1.0, lo_open=True)
    if data.get("eval_resize") is not None:
        f.text("data.eval_resize", data["eval_resize"], EVAL_RESIZES)


def validate_checkpoint(ckpt: Any, path: str | os.PathLike, require_data: bool = False) -> dict[str, Any]:
    """Check that a loaded object is an ``mpvg train`` checkpoint this version reads, with every field eval,
    predict and export use of the right type and in range; else a :class:`UserError` naming the field.

    Checked: ``version`` (1 to :data:`VERSION`), ``epoch`` >= 0, ``world_size`` >= 1, ``config`` a dict, the
    ``model`` entry (registered name, PE mode, ``num_classes`` >= 1, ``kwargs`` plain option values), the weights
    (``state_dict`` and ``ema.state_dict``: names to dense tensors) and the ``data`` entry (``classes``: one
    distinct name per output; ``in_chans`` 1 or 3; ``input_size`` sides 1 to :data:`MAX_INPUT_SIDE`; ``mean``,
    ``std`` (> 0): finite, one value or one per channel; ``crop_pct`` in (0, 1]; ``eval_resize`` full or
    center_crop). ``require_data``: every field of :data:`DATA_KEYS` must be there (eval, predict). That the
    model fits its weights is :func:`model_from_checkpoint`'s check.
    """
    where = f"checkpoint {path}"
    if not is_train_checkpoint(ckpt):
        raise UserError(f"{path} is a torch file but not an mpvg-kernels checkpoint (written by `mpvg train`)")
    f = _Fields(where)
    version = ckpt.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise UserError(f"{path} has checkpoint version {version}; this mpvg-kernels reads up to {VERSION}")
    if "version" not in ckpt:
        f.missing("version")
    f.integer("version", version, 1, VERSION)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}")
    f.integer("epoch", ckpt["epoch"], 0)
    if "world_size" in ckpt:
        f.integer("world_size", ckpt["world_size"], 1)
    f.mapping("config", ckpt["config"])
    meta = _validate_model_meta(ckpt["model"], where)
    f.tensors("state_dict", ckpt["state_dict"])
    ema = ckpt.get("ema")
    if ema is not None:
        f.mapping("ema", ema)
        f.tensors("ema.state_dict", ema.get("state_dict"))
        if "updates" in ema:
            f.integer("ema.updates", ema["updates"], 0)
    _validate_data(f.mapping("data", ckpt["data"]), meta["num_classes"], f, require_data)
    return ckpt


def load_checkpoint(path: str | os.PathLike, require_data: bool = False) -> dict[str, Any]:
    """Load (``weights_only=True``) and validate (:func:`validate_checkpoint`) a checkpoint; ``path`` may be a
    run folder. Every failure is a :class:`UserError`."""
    file = checkpoint_file(path)
    return validate_checkpoint(read_torch_file(file), file, require_data)


def model_from_checkpoint(ckpt: dict[str, Any], weights: str = "auto", where: str = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights.

    ``weights``: ``auto`` (the EMA weights when the run kept an EMA, else the trained weights), ``ema`` or ``model``.

    Before anything is allocated, the model the metadata describes is built on the meta device (at most about as
    many submodules as the weights have tensors) and must match the weights' names and shapes, its input size the
    ``data`` entry's (when there): the model is never larger than the file. A ``checkpoint_path`` among the model
    options (the pretrained file the run started from) is not read: every weight comes from the checkpoint.
    """
    if weights not in ("auto", "ema", "model"):
        raise UserError(f"weights must be auto, ema or model, got {weights!r}")
    meta = _validate_model_meta(ckpt.get("model"), where)
    ema = ckpt.get("ema")
    if weights == "ema" and not ema:
        raise UserError(f"{where} has no EMA weights (the run was trained with ema: false)")
    use_ema = bool(ema) and weights in ("auto", "ema")
    field = "ema.state_dict" if use_ema else "state_dict"
    sd = _Fields(where).tensors(field, ema.get("state_dict") if use_ema else ckpt.get("state_dict"))
    kwargs = {k: v for k, v in dict(meta.get("kwargs") or {}).items() if k != "checkpoint_path"}
    name, pe, num_classes = meta["name"], meta["pe"], meta["num_classes"]
    elements = sum(t.numel() for t in sd.values())
    for key, value in kwargs.items():  # a size or count above the number of weights describes another model
        if any(v > elements for v in _ints(value)):
            _Fields(where).fail(f"model.kwargs.{key}", value, f"exceeds the {elements} weight elements of {field}")
    try:
        shape = build_meta_model(name, pe, num_classes, kwargs, max_modules=min(MAX_MODULES, 4 * len(sd) + 256))
    except UserError as e:
        raise UserError(f"{where}: model.name, model.pe, model.num_classes and model.kwargs do not describe a "
                        f"model for its {len(sd)} weight tensors: {e}") from None
    c, h, w = (int(v) for v in shape.default_cfg["input_size"])
    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    f = _Fields(where)
    why = _oversized_input(shape)
    if why is not None:
        f.fail("model.kwargs", meta.get("kwargs"), why)
    if "input_size" in data and [int(v) for v in data["input_size"]] != [h, w]:
        f.fail("data.input_size", data["input_size"], f"differs from the input size [{h}, {w}] of the model "
               "(model.name, model.kwargs)")
    if "in_chans" in data and data["in_chans"] != c:
        f.fail("data.in_chans", data["in_chans"], f"differs from the model's {c} input channels")
    parts = state_dict_mismatch(shape.state_dict(), sd)
    if parts:
        raise UserError(f"{where}: {field} ({'EMA' if use_ema else 'model'} weights) does not match the model: "
                        f"{'; '.join(parts)} (the model of model.name {name!r}, model.pe {pe!r}, model.num_classes "
                        f"{num_classes}, model.kwargs {_show(kwargs)})")
    model = build_model(name, pe, num_classes, kwargs)
    load_state_dict_checked(model, sd, f"{where} ({'EMA' if use_ema else 'model'} weights)")
    model.__dict__[MODEL_META_ATTR] = dict(meta)
    model.__dict__[MODEL_META_ATTR]["epoch"] = ckpt.get("epoch")
    model.eval()
    return model
