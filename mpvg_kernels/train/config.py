"""The training configuration: one flat dataclass, YAML recipes, ``--set key=value`` and explicit flags.

Precedence (later wins): the :class:`TrainConfig` defaults < the recipe file < ``--set key=value`` < explicit
flags such as ``--epochs 10``. Every field is also a flag of ``mpvg train`` (``--field-name``), generated from
this dataclass, so the help text below is the documentation of both the recipe keys and the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..dataclass_flags import Bound, add_dataclass_flags, check_field, coerce_value, explicit_values, load_yaml, option
from ..dataclass_flags import flag_name as flag_name  # re-exported: ``--field-name`` of a config field
from ..errors import UserError
from ..models import PE_MODES

RECIPE_PACKAGE, RECIPE_FOLDER = "mpvg_kernels.train", "recipes"
DEFAULT_RECIPE = "digits"


_f = option  # a TrainConfig field with its flag's help and its valid range

#: Range bound: the CPUs of this machine (more intra-op threads or loader workers per process only oversubscribe).
CPUS = Bound(lambda: os.cpu_count() or 1, "os.cpu_count()")
#: kornia's RandAugment policy has this many operations; n must not exceed it.
RANDAUG_OPS = 15
#: Largest seed: torch takes 64-bit seeds and every rank adds a small offset (``trainer._rank_seed``).
MAX_SEED = 2**63 - 1
#: A recipe file larger than this is refused unread (the bundled ones are under 2 KiB).
MAX_RECIPE_BYTES = 1 << 20


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
    num_workers: int | None = _f(None, "DataLoader workers per process (None: 0 for in-memory data, else up to 8)",
                                 ge=0, le=CPUS)
    # schedule and optimizer
    epochs: int = _f(30, "total training epochs (warmup and cooldown included; both shrink to fit short runs)",
                     ge=1, le=100_000)
    batch_size: int = _f(64, "batch size PER PROCESS; the global batch is batch_size x world_size", ge=1, le=1_000_000)
    lr: float = _f(1e-3, "peak learning rate (before lr_base_batch scaling)", gt=0)
    lr_base_batch: int | None = _f(
        None, "if set, the peak lr is lr * global_batch / lr_base_batch (DeiT: 5e-4 * global_batch / 512)", ge=1)
    min_lr: float = _f(1e-5, "final learning rate of the cosine schedule (and during cooldown)", ge=0)
    warmup_lr: float = _f(1e-6, "learning rate at the first step of the linear warmup", ge=0)
    warmup_epochs: float = _f(3.0, "linear warmup length in epochs (per-step schedule)", ge=0, le=100_000)
    cooldown_epochs: float = _f(0.0, "epochs at min_lr after the cosine decay (part of epochs)", ge=0, le=100_000)
    opt: str = _f("adamw", "optimizer: adamw, or sgd with momentum (T2T-ViT's CIFAR fine-tuning)",
                  choices=("adamw", "sgd"))
    momentum: float = _f(0.9, "SGD momentum (opt=sgd only)", ge=0, lt=1)
    weight_decay: float = _f(0.05, "weight decay (pos_embed and 1-D parameters are excluded)", ge=0)
    betas: list[float] = _f([0.9, 0.999], "AdamW betas", ge=0, lt=1, length=2)
    opt_eps: float = _f(1e-8, "AdamW epsilon", gt=0)
    clip_grad: float | None = _f(None, "clip the global gradient norm to this value (None: no clipping)", gt=0)
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy targets", ge=0, lt=1)
    # augmentation (on batched tensors, kornia)
    augment: bool = _f(True, "master switch for every train-time augmentation below (mixup/cutmix included)")
    rrc_scale: list[float] | None = _f(None, "random resized crop area range, e.g. [0.08, 1.0] (None: off)",
                                       gt=0, le=1, length=2, ordered=True)
    rrc_ratio: list[float] = _f([0.75, 1.3333333], "random resized crop aspect-ratio range",
                                gt=0, length=2, ordered=True)
    hflip: float = _f(0.0, "horizontal flip probability (0 for digits: a flipped digit is another glyph)", ge=0, le=1)
    affine_degrees: float = _f(0.0, "random affine: max rotation in degrees (0 and no translate/scale: off)",
                               ge=0, le=180)
    affine_translate: float = _f(0.0, "random affine: max translation as a fraction of the image size", ge=0, le=1)
    affine_scale: list[float] | None = _f(None, "random affine: scale range, e.g. [0.9, 1.1]",
                                          gt=0, length=2, ordered=True)
    randaug_n: int = _f(0, "RandAugment: operations per image (0: off; 3-channel models only)", ge=0, le=RANDAUG_OPS)
    randaug_m: float = _f(9.0, "RandAugment magnitude on timm's 0..10 scale (kornia's m = 3 x this)", ge=0, le=10)
    randaug_chunk: int = _f(8, "kornia draws one op sequence per call: apply RandAugment per chunk of this many", ge=1)
    reprob: float = _f(0.0, "random erasing probability (erased area filled with the mean, i.e. 0 after norm)",
                       ge=0, le=1)
    mixup: float = _f(0.0, "mixup Beta(alpha, alpha) alpha (0: off)", ge=0)
    cutmix: float = _f(0.0, "cutmix Beta(alpha, alpha) alpha (0: off)", ge=0)
    mixup_prob: float = _f(1.0, "probability of applying mixup or cutmix to a batch", ge=0, le=1)
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on", ge=0, le=1)
    repeated_aug: int = _f(1, "repeated augmentation: each image appears this many times per epoch (DeiT: 3)",
                           ge=1, le=64)
    # preprocessing
    crop_pct: float | None = _f(None, "eval center-crop fraction for folder data (None: model default or 0.875)",
                                gt=0, le=1)
    mean: list[float] | None = _f(None, "normalisation mean per channel (None: the model's default_cfg)",
                                  ge=-1000, le=1000)
    std: list[float] | None = _f(None, "normalisation std per channel (None: the model's default_cfg)", gt=0, le=1000)
    # training machinery
    ema: bool = _f(False, "keep an EMA of the weights and evaluate it (summary top1 is the EMA's)")
    ema_decay: float = _f(0.999, "EMA decay per optimizer step", gt=0, lt=1)
    ema_warmup: bool = _f(True, "EMA decay ramps up as min(decay, (1 + step) / (10 + step))")
    amp: str = _f("none", "mixed precision autocast dtype", choices=("none", "bf16", "fp16"))
    compile: bool = _f(False, "torch.compile the model for training")
    seed: int = _f(0, "random seed (model init, data order, augmentation)", ge=0, le=MAX_SEED)
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (auto: cuda:LOCAL_RANK when CUDA is available)")
    threads: int | None = _f(
        None, "intra-op CPU threads per process (None: torch's default; under torchrun on CPU: cores / processes)",
        ge=1, le=CPUS)
    eval_every: int = _f(1, "evaluate on the held-out split every this many epochs (and after the last)", ge=1)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce(name: str, value: Any, what: str | None = None) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the type of config field ``name`` and check its
    range (:func:`mpvg_kernels.dataclass_flags.check_field`).

    Strings are parsed as YAML first, so ``--set betas=[0.9,0.95]`` and ``--set clip_grad=none`` work, and
    ``5e-4`` (a string to YAML 1.1) becomes a float. Raises :class:`UserError` naming ``what`` (default: the
    config key) on failure.
    """
    if name not in FIELDS:
        raise UserError(_unknown_key_message(name))
    return coerce_value(TrainConfig, name, value, what)


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


def read_recipe_text(path: Path) -> str:
    """The text of a recipe file: at most :data:`MAX_RECIPE_BYTES`, UTF-8; else a one-line :class:`UserError`."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read recipe {path}: {e.strerror or e}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise UserError(f"recipe {path} is larger than {MAX_RECIPE_BYTES} bytes: not a recipe")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"recipe {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def load_recipe(recipe: str) -> dict[str, Any]:
    """The validated, type-coerced fields of a recipe (bundled name or YAML path). YAML anchors and aliases are
    refused (:func:`mpvg_kernels.dataclass_flags.load_yaml`) and the file size is limited."""
    path = recipe_path(recipe)
    raw = load_yaml(read_recipe_text(path), f"recipe {path}")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of config keys, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if k not in FIELDS:
            raise UserError(f"recipe {path}: {_unknown_key_message(str(k))}")
        out[k] = coerce(k, v, f"recipe {path}: {k}")
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
            updates.setdefault("model_kwargs.", {})[sub] = load_yaml(value, f"--set {key}") if value.strip() else None
            continue
        updates[key] = coerce(key, value, f"--set {key}")
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
            values[k] = coerce(k, v, flag_name(k))
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Check every field of ``cfg`` against the range declared next to it (a config built in Python, not only one
    read from a recipe, ``--set`` or a flag); a :class:`UserError` names the field."""
    if not isinstance(cfg.model_kwargs, dict):
        raise UserError(f"invalid config: model_kwargs must be a mapping, got {type(cfg.model_kwargs).__name__}")
    for name in FIELDS:
        check_field(TrainConfig, name, getattr(cfg, name), f"invalid config: {name}")


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

