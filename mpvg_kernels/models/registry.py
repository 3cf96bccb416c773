"""The model registry: each family module registers its own configurations beside its code
(:func:`register_models`, as timm's ``default_cfgs`` sit beside each model), and :func:`create_model`,
:func:`list_models` and :func:`param_groups` serve them."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, PEModel
from .pretrained import load_pretrained

__all__ = ["MODEL_CFGS", "cifar100_cfg", "create_model", "imagenet_cfg", "list_models", "param_groups",
           "register_models"]

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

#: name -> {"family": the model class (a :class:`~mpvg_kernels.models.base.PEModel`), "model": constructor kwargs,
#: "cfg": data config (mean, std, crop_pct, ...), "source": where it comes from, optionally "tiny": kwargs
#: overriding "model" for a small, fast variant of the same architecture (tests and smoke runs:
#: ``create_model(name, tiny=True)``), and "paper_counts_buffers": buffers that the original code held as frozen
#: parameters, which the papers' #Params count (the parameter table adds them when it compares with a paper).
#: Filled by the family modules through :func:`register_models`.
MODEL_CFGS: dict[str, dict[str, Any]] = {}


def imagenet_cfg(crop_pct: float = 0.875) -> dict[str, Any]:
    """The data config of an ImageNet-1K model: ImageNet mean/std, center crop ``crop_pct``."""
    return dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=crop_pct)


def cifar100_cfg() -> dict[str, Any]:
    """The data config of a CIFAR-100 model: CIFAR-100 mean/std, no crop."""
    return dict(mean=CIFAR100_MEAN, std=CIFAR100_STD, crop_pct=1.0)


def register_models(family: type[PEModel], cfgs: dict[str, dict[str, Any]]) -> None:
    """Add a family's configurations (``name -> {"model", "cfg", "source", "tiny"?, ...}``, see
    :data:`MODEL_CFGS`) to the registry; a name registered twice is a ValueError."""
    for name, entry in cfgs.items():
        if name in MODEL_CFGS:
            raise ValueError(f"model {name!r} is already registered (by {MODEL_CFGS[name]['family'].__name__})")
        MODEL_CFGS[name] = {"family": family, **entry}


def fit_channels(cfg: dict[str, Any], in_chans: int) -> dict[str, Any]:
    """``cfg`` with ``input_size`` for ``in_chans`` channels and, where the registered mean/std have another
    channel count (``in_chans`` overridden), their averages repeated per channel."""
    cfg = dict(cfg)
    cfg["input_size"] = (in_chans, *cfg["input_size"][1:])
    for key in ("mean", "std"):
        if len(cfg[key]) != in_chans:
            cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * in_chans
    return cfg


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names (sorted), optionally filtered by a glob ``pattern`` (e.g. ``"deit_*"``)."""
    names = sorted(MODEL_CFGS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def create_model(
    name: str,
    pe: str = "default",
    num_classes: int | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    tiny: bool = False,
    checkpoint_strict: bool = True,
    **kwargs: Any,
) -> PEModel:
    """Build the registered model ``name`` with position-embedding mode ``pe`` (default, lape, pvg, mpvg).

    ``tiny=True`` builds the registered small variant of the same architecture (few blocks, narrow, small input;
    for tests and smoke runs). ``num_classes`` and ``**kwargs`` override the registered constructor arguments (``pool``,
    ``img_size``, ``in_chans``, ``include_layer0``, ``hierarchical``, ``add_pos_to_input``, ``last_pos``,
    ``drop_path_rate``, ...). ``checkpoint_path``: a timm/DeiT-format or own checkpoint loaded with
    :func:`~mpvg_kernels.models.load_pretrained` (nothing is ever downloaded; ``checkpoint_strict``: its ``strict``, so
    by default every parameter must come from the checkpoint). The model's ``default_cfg`` holds
    ``input_size`` (C, H, W), ``mean``, ``std``, ``num_classes``, ``crop_pct``, ``interpolation``, ``pe``, ``pool``.
    """
    if name not in MODEL_CFGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    entry = MODEL_CFGS[name]
    args = dict(entry["model"])
    if tiny:
        if "tiny" not in entry:
            raise ValueError(f"model {name!r} has no registered tiny variant")
        args.update(entry["tiny"])
    args.update(kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    model = entry["family"](pe=pe, **args)
    cfg = dict(model.default_cfg)
    cfg.update(entry["cfg"])
    cfg["architecture"] = name
    cfg = fit_channels(cfg, model.default_cfg["input_size"][0])
    model.default_cfg = model.pretrained_cfg = cfg
    if checkpoint_path is not None:
        load_pretrained(model, checkpoint_path, strict=checkpoint_strict)
    return model


def param_groups(model: nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Optimizer parameter groups: ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": rest, "weight_decay": 0.0}]``.

    Excluded from weight decay (as in the DeiT/LaPE code): every parameter with fewer than 2 dims (biases,
    LayerNorm and PE-LayerNorm gammas/betas), ``pos_embed``, ``cls_token``, the names of the model's
    ``no_weight_decay()`` and ``no_weight_decay`` (exact names or a final name component). Parameters that do
    not require grad are left out. Each group also carries a ``"name"`` (``decay``/``no_decay``).
    """
    skip = set(no_weight_decay) | {"pos_embed", "cls_token"}
    nwd = getattr(model, "no_weight_decay", None)
    if callable(nwd):
        skip |= set(nwd())
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.rsplit(".", 1)[-1] in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
