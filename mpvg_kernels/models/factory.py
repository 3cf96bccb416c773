"""Models for the tools: build a registered model with user-facing errors, and read ``mpvg train`` checkpoints
back into the model they were trained with.

Training writes the checkpoints (:mod:`mpvg_kernels.train.checkpoint`, which re-exports these names); evaluation,
prediction, export and analysis read them through this module, so none of them needs the training package. A
checkpoint is a dict of tensors and primitive containers only (no pickled classes), read with
``torch.load(weights_only=True)``::

    format: "mpvg-kernels-checkpoint", version: 1
    model: {name, pe, kwargs, num_classes, params}      # enough to rebuild the model
    data: {spec, classes, in_chans, input_size, mean, std, crop_pct, eval_resize}
    config, epoch, state_dict, ema (None or {updates, state_dict}), ...

The same checkpoint can be shared as ``.safetensors`` (:func:`write_safetensors_checkpoint`, ``mpvg export
--format safetensors``): the state dict as tensors, the rest as JSON strings in the file's metadata
(``format``, ``version``, ``model``, ``data``, ``config``, ``epoch``, plus the deployment keys of ONNX exports).
:func:`read_torch_file` reads it back into the dict above without unpickling anything; a ``.safetensors`` file
without that metadata (e.g. timm's) is returned as its plain state dict.

Every failure here is a :class:`~mpvg_kernels.errors.UserError`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .pretrained import is_safetensors, read_safetensors
from .registry import create_model, list_models

__all__ = [
    "FORMAT",
    "REQUIRED_KEYS",
    "VERSION",
    "build_model",
    "is_train_checkpoint",
    "load_checkpoint",
    "load_state_dict_checked",
    "mismatch_parts",
    "model_from_checkpoint",
    "read_torch_file",
    "validate_checkpoint",
    "write_safetensors_checkpoint",
]

FORMAT = "mpvg-kernels-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "model", "data", "config", "epoch", "state_dict")
#: Where :func:`build_model` records ``{name, pe, kwargs, num_classes}`` on the model (read by the exports).
MODEL_META_ATTR = "_mpvg_model_meta"
#: The checkpoint entries a ``.safetensors`` checkpoint holds as JSON metadata.
_JSON_ENTRIES = ("model", "data", "config", "epoch")


def build_model(name: str, pe: str, num_classes: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """:func:`~mpvg_kernels.models.create_model` with clear errors for an unknown name or bad keyword arguments."""
    available = list(list_models())
    if name not in available:
        raise UserError(f"unknown model {name!r}; available models: {', '.join(available)}")
    try:
        model = create_model(name, pe=pe, num_classes=num_classes, **(kwargs or {}))
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(
            f"cannot build model {name!r} (pe={pe!r}, num_classes={num_classes}, kwargs={kwargs or {}}): {e}"
        ) from None
    classes = getattr(model, "num_classes", num_classes)
    model.__dict__[MODEL_META_ATTR] = {"name": name, "pe": pe, "kwargs": dict(kwargs or {}), "num_classes": classes}
    return model


def mismatch_parts(
    missing: list[str],
    unexpected: list[str],
    shapes: list[str],
    missing_note: str = "keys",
    unexpected_word: str = "unexpected",
    unexpected_note: str = "keys",
) -> list[str]:
    """The readable pieces of a state-dict mismatch, the first few names of each kind (empty: no mismatch)."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} {missing_note} (e.g. {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{unexpected_word} {len(unexpected)} {unexpected_note} (e.g. {', '.join(unexpected[:4])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
    return parts


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(strict=True)`` with a readable error listing what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    parts = mismatch_parts(missing, unexpected, shapes)
    if parts:
        raise UserError(f"{where} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)


def read_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (a ``.safetensors`` file: :func:`read_safetensors_file`,
    no pickle); a missing or unreadable file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        return read_safetensors_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt zip, truncated file, foreign pickle ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load checkpoint {path}: the file is corrupt, truncated or not a torch checkpoint "
            f"({type(e).__name__}: {msg})"
        ) from None


def read_safetensors_file(path: str | os.PathLike) -> dict[str, Any]:
    """A ``.safetensors`` file: the ``mpvg train`` checkpoint dict it holds (written by
    :func:`write_safetensors_checkpoint`), else its plain state dict. Nothing is unpickled."""
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


def write_safetensors_checkpoint(
    path: str | os.PathLike, state_dict: dict[str, torch.Tensor], entries: dict[str, Any], extra: dict[str, str]
) -> Path:
    """Write ``state_dict`` as ``.safetensors`` with the checkpoint ``entries`` (model, data, config, epoch) as JSON
    metadata plus ``extra`` (str -> str); atomically: a temporary file beside ``path``, read back and compared
    (every tensor and the metadata), then renamed over ``path``. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {**{k: str(v) for k, v in extra.items()}, "format": FORMAT, "version": str(VERSION)}
    meta.update({k: json.dumps(entries[k]) for k in _JSON_ENTRIES})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        back, back_meta = read_safetensors(tmp)
        if (
            back_meta != meta
            or back.keys() != tensors.keys()
            or not all(torch.equal(back[k], t) for k, t in tensors.items())
        ):
            raise UserError(f"writing {path}: the file read back differs from what was written")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def is_train_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is an ``mpvg train`` checkpoint (as opposed to, e.g., a bare state dict)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def validate_checkpoint(ckpt: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Check that a loaded object is an ``mpvg train`` checkpoint this version reads; else a :class:`UserError`."""
    if not is_train_checkpoint(ckpt):
        raise UserError(f"{path} is a torch file but not an mpvg-kernels checkpoint (written by `mpvg train`)")
    if int(ckpt.get("version", 0)) > VERSION:
        raise UserError(f"{path} has checkpoint version {ckpt['version']}; this mpvg-kernels reads up to {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a checkpoint with ``weights_only=True``; every failure is a :class:`UserError`."""
    return validate_checkpoint(read_torch_file(path), path)


def model_from_checkpoint(ckpt: dict[str, Any], weights: str = "auto", where: str = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights.

    ``weights``: ``auto`` (the EMA weights when the run kept an EMA, else the trained weights), ``ema`` or ``model``.
    """
    meta = ckpt["model"]
    model = build_model(meta["name"], meta["pe"], int(meta["num_classes"]), dict(meta.get("kwargs") or {}))
    ema = ckpt.get("ema")
    if weights == "ema" and not ema:
        raise UserError(f"{where} has no EMA weights (the run was trained with ema: false)")
    if weights not in ("auto", "ema", "model"):
        raise UserError(f"weights must be auto, ema or model, got {weights!r}")
    use_ema = bool(ema) and weights in ("auto", "ema")
    sd = ema["state_dict"] if use_ema else ckpt["state_dict"]
    load_state_dict_checked(model, sd, f"{where} ({'EMA' if use_ema else 'model'} weights)")
    model.__dict__[MODEL_META_ATTR] = dict(meta)
    model.__dict__[MODEL_META_ATTR]["epoch"] = ckpt.get("epoch")
    model.eval()
    return model
