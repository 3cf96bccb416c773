"""The training configuration: one flat dataclass, YAML recipes, ``--set key=value`` and explicit flags.

Precedence (later wins): the :class:`TrainConfig` defaults < the recipe file < ``--set key=value`` < explicit
flags such as ``--epochs 10``. Every field is also a flag of ``mpvg train`` (``--field-name``), generated from
this dataclass, so the help text below is the documentation of both the recipe keys and the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..dataclass_flags import add_dataclass_flags, coerce_value, explicit_values, option
from ..dataclass_flags import flag_name as flag_name  # re-exported: ``--field-name`` of a config field
from ..errors import UserError
from ..models import PE_MODES

RECIPE_PACKAGE, RECIPE_FOLDER = "mpvg_kernels.train", "recipes"
DEFAULT_RECIPE = "digits"


_f = option  # a TrainConfig field with its flag's help


@dataclass
class TrainConfig:
    """Every setting of a training run. Field docs are in each field's ``help`` metadata."""

    # model
    model: str = _f("vit_digits", "model name (see mpvg_kernels.models.list_models())")
    pe: str = _f("mpvg", "position-embedding mode", choices=PE_MODES)
    model_kwargs: dict[str, Any] = _f(
        {}, "extra keyword arguments for create_model, e.g. drop_path_rate (YAML/JSON mapping)"
    )
    # data
    data: str = _f("digits", "data set: digits | cifar10:PATH | cifar100:PATH | folder:PATH")
    num_workers: int | None = _f(None, "DataLoader workers per process (None: 0 for in-memory data, else up to 8)")
    # schedule and optimizer
    epochs: int = _f(30, "total training epochs (warmup and cooldown included; both shrink to fit short runs)")
    batch_size: int = _f(64, "batch size PER PROCESS; the global batch is batch_size x world_size")
    lr: float = _f(1e-3, "peak learning rate (before lr_base_batch scaling)")
    lr_base_batch: int | None = _f(
        None, "if set, the peak lr is lr * global_batch / lr_base_batch (DeiT: 5e-4 * global_batch / 512)"
    )
    min_lr: float = _f(1e-5, "final learning rate of the cosine schedule (and during cooldown)")
    warmup_lr: float = _f(1e-6, "learning rate at the first step of the linear warmup")
    warmup_epochs: float = _f(3.0, "linear warmup length in epochs (per-step schedule)")
    cooldown_epochs: float = _f(0.0, "epochs at min_lr after the cosine decay (part of epochs)")
    opt: str = _f("adamw", "optimizer: adamw, or sgd with momentum (T2T-ViT's CIFAR fine-tuning)",
                  choices=("adamw", "sgd"))
    momentum: float = _f(0.9, "SGD momentum (opt=sgd only)")
    weight_decay: float = _f(0.05, "weight decay (pos_embed and 1-D parameters are excluded)")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    opt_eps: float = _f(1e-8, "AdamW epsilon")
    clip_grad: float | None = _f(None, "clip the global gradient norm to this value (None: no clipping)")
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy targets")
    # augmentation (on batched tensors, kornia)
    augment: bool = _f(True, "master switch for every train-time augmentation below (mixup/cutmix included)")
    rrc_scale: list[float] | None = _f(None, "random resized crop area range, e.g. [0.08, 1.0] (None: off)")
    rrc_ratio: list[float] = _f([0.75, 1.3333333], "random resized crop aspect-ratio range")
    hflip: float = _f(0.0, "horizontal flip probability (0 for digits: a flipped digit is another glyph)")
    affine_degrees: float = _f(0.0, "random affine: max rotation in degrees (0 and no translate/scale: off)")
    affine_translate: float = _f(0.0, "random affine: max translation as a fraction of the image size")
    affine_scale: list[float] | None = _f(None, "random affine: scale range, e.g. [0.9, 1.1]")
    randaug_n: int = _f(0, "RandAugment: operations per image (0: off)")
    randaug_m: float = _f(9.0, "RandAugment magnitude on timm's 0..10 scale (kornia's m = 3 x this)")
    randaug_chunk: int = _f(8, "kornia draws one op sequence per call: apply RandAugment per chunk of this many")
    reprob: float = _f(0.0, "random erasing probability (erased area filled with the mean, i.e. 0 after norm)")
    mixup: float = _f(0.0, "mixup Beta(alpha, alpha) alpha (0: off)")
    cutmix: float = _f(0.0, "cutmix Beta(alpha, alpha) alpha (0: off)")
    mixup_prob: float = _f(1.0, "probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on")
    repeated_aug: int = _f(1, "repeated augmentation: each image appears this many times per epoch (DeiT: 3)")
    # preprocessing
    crop_pct: float | None = _f(None, "eval center-crop fraction for folder data (None: model default or 0.875)")
    mean: list[float] | None = _f(None, "normalisation mean per channel (None: the model's default_cfg)")
    std: list[float] | None = _f(None, "normalisation std per channel (None: the model's default_cfg)")
    # training machinery
    ema: bool = _f(False, "keep an EMA of the weights and evaluate it (summary top1 is the EMA's)")
    ema_decay: float = _f(0.999, "EMA decay per optimizer step")
    ema_warmup: bool = _f(True, "EMA decay ramps up as min(decay, (1 + step) / (10 + step))")
    amp: str = _f("none", "mixed precision autocast dtype", choices=("none", "bf16", "fp16"))
    compile: bool = _f(False, "torch.compile the model for training")
    seed: int = _f(0, "random seed (model init, data order, augmentation)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (auto: cuda:LOCAL_RANK when CUDA is available)")
    threads: int | None = _f(
        None, "intra-op CPU threads per process (None: torch's default; under torchrun on CPU: cores / processes)"
    )
    eval_every: int = _f(1, "evaluate on the held-out split every this many epochs (and after the last)")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce(name: str, value: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the type of config field ``name``.

    Strings are parsed as YAML first, so ``--set betas=[0.9,0.95]`` and ``--set clip_grad=none`` work, and
    ``5e-4`` (a string to YAML 1.1) becomes a float. Raises :class:`UserError` with the field name on failure.
    """
    if name not in FIELDS:
        raise UserError(_unknown_key_message(name))
    return coerce_value(TrainConfig, name, value)


def _unknown_key_message(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {name!r}{hint} (keys: {', '.join(FIELDS)})"


def list_recipes() -> list[str]:
    """Names of the recipes bundled in ``mpvg_kernels/train/recipes``."""
    root = resources.files(RECIPE_PACKAGE) / RECIPE_FOLDER
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def recipe_path(recipe: str) -> Path:
    """The YAML file of a bundled recipe name, or ``recipe`` itself when it is a path to a file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"recipe file {p} does not exist")
        return p
    candidate = resources.files(RECIPE_PACKAGE) / RECIPE_FOLDER / f"{recipe}.yaml"
    if not candidate.is_file():
        raise UserError(f"unknown recipe {recipe!r}: bundled recipes are {', '.join(list_recipes())}, or pass a path")
    return Path(str(candidate))


def load_recipe(recipe: str) -> dict[str, Any]:
    """The validated, type-coerced fields of a recipe (bundled name or YAML path)."""
    path = recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read recipe {path}: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of config keys, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if k not in FIELDS:
            raise UserError(f"recipe {path}: {_unknown_key_message(str(k))}")
        out[k] = coerce(k, v)
    return out


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", "model_kwargs.k=v"]`` -> coerced updates. ``model_kwargs.k`` merges into the mapping."""
    updates: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key.startswith("model_kwargs."):
            sub = key.split(".", 1)[1]
            updates.setdefault("model_kwargs.", {})[sub] = yaml.safe_load(value) if value.strip() else None
            continue
        updates[key] = coerce(key, value)
    return updates


def build_config(recipe: str, sets: list[str] | None = None, flags: dict[str, Any] | None = None) -> TrainConfig:
    """Recipe, then ``--set`` items, then explicit flags (None means "not given") -> a :class:`TrainConfig`."""
    values = dataclasses.asdict(TrainConfig())
    values.update(load_recipe(recipe))
    set_updates = parse_set(sets)
    kw_updates = set_updates.pop("model_kwargs.", {})
    values.update(set_updates)
    values["model_kwargs"] = {**values["model_kwargs"], **kw_updates}
    for k, v in (flags or {}).items():
        if v is not None:
            values[k] = coerce(k, v)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Range checks that catch a wrong value before any data is read."""
    checks = [
        (cfg.epochs >= 1, "epochs must be >= 1"),
        (cfg.batch_size >= 1, "batch_size must be >= 1"),
        (cfg.lr > 0, "lr must be > 0"),
        (cfg.warmup_epochs >= 0 and cfg.cooldown_epochs >= 0, "warmup_epochs and cooldown_epochs must be >= 0"),
        (0 <= cfg.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
        (0 <= cfg.hflip <= 1 and 0 <= cfg.reprob <= 1, "hflip and reprob are probabilities in [0, 1]"),
        (cfg.mixup >= 0 and cfg.cutmix >= 0, "mixup and cutmix alphas must be >= 0"),
        (cfg.repeated_aug >= 1, "repeated_aug must be >= 1"),
        (cfg.eval_every >= 1, "eval_every must be >= 1"),
        (0 <= cfg.randaug_m <= 10, "randaug_m is on timm's 0..10 scale"),
        (cfg.randaug_chunk >= 1, "randaug_chunk must be >= 1"),
        (len(cfg.betas) == 2, "betas must have two values"),
        (0 <= cfg.momentum < 1, "momentum must be in [0, 1)"),
        (cfg.rrc_scale is None or len(cfg.rrc_scale) == 2, "rrc_scale must be [min, max]"),
        (cfg.affine_scale is None or len(cfg.affine_scale) == 2, "affine_scale must be [min, max]"),
        (cfg.crop_pct is None or 0 < cfg.crop_pct <= 1, "crop_pct must be in (0, 1]"),
        (0 < cfg.ema_decay < 1, "ema_decay must be in (0, 1)"),
        (cfg.threads is None or cfg.threads >= 1, "threads must be >= 1"),
    ]
    for f in dataclasses.fields(cfg):  # inf/nan anywhere (lr, weight_decay, betas, ...) is never meant
        value = getattr(cfg, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UserError(f"invalid config: {f.name} must be finite, got {value}")
    for ok, msg in checks:
        if not ok:
            raise UserError(f"invalid config: {msg}")


def add_config_flags(parser: argparse.ArgumentParser, recipe_defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per :class:`TrainConfig` field; its help shows the built-in and the default recipe's value.

    The flags are generated by :func:`mpvg_kernels.dataclass_flags.add_dataclass_flags`, as ``mpvg bench``'s are.
    """
    group = parser.add_argument_group(
        "config fields (each overrides the recipe; the value used is: flag > --set > recipe > built-in default)"
    )
    add_dataclass_flags(group, TrainConfig, shown=recipe_defaults, shown_note=f" from the {DEFAULT_RECIPE} recipe")


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The explicit config flags from a parsed namespace (None when not given). Lists 'none' -> None.

    Values stay as given: :func:`build_config` coerces them after the recipe and ``--set``.
    """
    return explicit_values(args, TrainConfig, coerce=False)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """A plain dict (JSON/YAML and ``torch.load(weights_only=True)`` safe)."""
    return dataclasses.asdict(cfg)

