"""Loading timm/DeiT-format (and Compact-Transformers ViT-Lite/CVT/CCT) checkpoints into a model of any family.

A timm/DeiT checkpoint is a state dict (or one wrapped in ``{"model": ...}``, ``{"state_dict": ...}``) with keys
``cls_token`` [1, 1, D] (DeiT distilled: and ``dist_token``), ``pos_embed`` [1, 1 + N, D] (distilled: 2 + N rows),
``patch_embed.proj.weight/bias``, ``blocks.i.norm1.weight/bias``, ``blocks.i.attn.qkv.weight/bias``,
``blocks.i.attn.proj.weight/bias``, ``blocks.i.norm2.weight/bias``, ``blocks.i.mlp.fc1/fc2.weight/bias``,
``norm.weight/bias``, ``head.weight/bias`` (distilled: and ``head_dist``). :func:`checkpoint_filter_fn` adapts it
to a model: drops the class token and its PE row for GAP models (and DeiT's distillation token, PE row and head
for a model that is not distilled), resamples the PE grid (bicubic, like timm's ``resample_abs_pos_embed``),
drops a head of another class count, and sums RGB patch filters for a one-channel model. Loading then reports
only the new PE LayerNorms (``*.pos_weight``, ``*.pos_bias``) as missing.
Other published layouts are renamed first by the key map of the model's family (:data:`KEY_MAPS`, one table per
family): Compact-Transformers and T2T-ViT keys and the official LaPE checkpoints (``blocks.i.pe_norm.*``: the
PE LayerNorms, our ``blocks.i.norm1.pos_weight/pos_bias``) for the ViT family, the original Microsoft
Swin-Transformer layout (``layers.i.downsample`` at the end of stage i, ``head.weight``, the
``relative_position_index``/``attn_mask`` buffers) for Swin. ``.safetensors`` files are read without pickle.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..layers.pos_embed import infer_grid_size, resample_abs_pos_embed, sincos_pos_embed
from .base import PEModel

__all__ = [
    "KEY_MAPS",
    "KeyMap",
    "checkpoint_filter_fn",
    "load_pretrained",
    "map_checkpoint_keys",
    "read_safetensors",
    "unwrap_state_dict",
]

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")

# Compact-Transformers (SHI-Labs) ViT-Lite/CVT/CCT key layout -> timm layout. The tokenizer of ViT-Lite and CVT is
# one patch conv with a bias (``patch_embed.proj`` here); CCT's conv tokenizer has no conv bias (and may have more
# than one conv layer) and keeps its names under ``patch_embed`` (:class:`~mpvg_kernels.layers.ConvTokenizer`).
_CCT_PATCH_CONV = (r"^tokenizer\.conv_layers\.0\.0\.(weight|bias)$", r"patch_embed.proj.\1")
_CCT_RULES = [
    (r"^tokenizer\.", "patch_embed."),
    (r"^classifier\.attention_pool\.", "attention_pool."),
    (r"^classifier\.class_emb$", "cls_token"),
    (r"^classifier\.positional_emb$", "pos_embed"),
    (r"^classifier\.blocks\.(\d+)\.pre_norm\.", r"blocks.\1.norm1."),
    (r"^classifier\.blocks\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
    (r"^classifier\.blocks\.(\d+)\.linear1\.", r"blocks.\1.mlp.fc1."),
    (r"^classifier\.blocks\.(\d+)\.norm1\.", r"blocks.\1.norm2."),
    (r"^classifier\.blocks\.(\d+)\.linear2\.", r"blocks.\1.mlp.fc2."),
    (r"^classifier\.norm\.", "norm."),
    (r"^classifier\.fc\.", "head."),
]


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (``model``/``state_dict`` wrappers, ``module.`` prefixes of
    DDP and ``_orig_mod.`` of torch.compile removed)."""
    sd: Any = checkpoint
    for _ in range(3):
        if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
            if inner is None:
                break
            sd = inner
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    out = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise ValueError(f"no tensors found in the checkpoint (top-level keys: {sorted(checkpoint)[:10]})")
    for prefix in _STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


Rule = tuple[str, "str | Callable[[re.Match[str]], str] | None"]


class KeyMap(NamedTuple):
    """One published checkpoint layout of a family: it applies when a key matches ``detect`` (and none matches
    ``unless``); each key is then renamed by the first of ``rules`` (regex, replacement) that matches it, or
    dropped where the replacement is None (buffers the model recomputes)."""

    source: str
    detect: str
    rules: tuple[Rule, ...]
    unless: str | None = None


def _next_stage(m: re.Match[str]) -> str:
    return f"layers.{int(m.group(1)) + 1}.downsample."


_VIT_KEY_MAP = (
    KeyMap(  # ViT-Lite / CVT: one patch conv with a bias (patch_embed.proj)
        "Compact-Transformers (SHI-Labs) ViT-Lite/CVT",
        r"^tokenizer\.conv_layers\.0\.0\.bias$",
        (_CCT_PATCH_CONV, *_CCT_RULES),
        unless=r"^tokenizer\.conv_layers\.1\.",
    ),
    KeyMap("Compact-Transformers (SHI-Labs) CCT", r"^(classifier|tokenizer)\.", tuple(_CCT_RULES)),
    KeyMap("T2T-ViT (yitu-opensource)", r"^tokens_to_token\.", ((r"^tokens_to_token\.", "patch_embed."),)),
    # official LaPE code (DeiT code base): Block.pe_norm = LN' of the PE, before norm1's join
    KeyMap(
        "LaPE (Ingrid725/LaPE)", r"^blocks\.\d+\.pe_norm\.", ((r"^blocks\.(\d+)\.pe_norm\.", r"blocks.\1.norm1.pos_"),)
    ),
)

_SWIN_KEY_MAP = (
    KeyMap(  # microsoft/Swin-Transformer: PatchMerging at the END of stage i (timm: the start of stage i + 1)
        "Swin-Transformer (microsoft)",
        r"^layers\.0\.downsample\.",
        (
            (r"^layers\.(\d+)\.downsample\.", _next_stage),
            (r"^head\.(weight|bias)$", r"head.fc.\1"),
            (r"^absolute_pos_embed$", "pos_embed"),
            (r"(^|\.)(relative_position_index|attn_mask)$", None),
        ),
    ),
)

#: The published checkpoint layouts each model family reads, by family class name (one table per family).
KEY_MAPS: dict[str, tuple[KeyMap, ...]] = {
    "VisionTransformer": _VIT_KEY_MAP,
    "SwinTransformer": _SWIN_KEY_MAP,
}


def map_checkpoint_keys(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` with the keys of every published layout of ``model``'s family (:data:`KEY_MAPS`) renamed to ours."""
    family = next((KEY_MAPS[c.__name__] for c in type(model).__mro__ if c.__name__ in KEY_MAPS), ())
    out = dict(sd)
    for km in family:
        if not any(re.search(km.detect, k) for k in out):
            continue
        if km.unless is not None and any(re.search(km.unless, k) for k in out):
            continue
        renamed: dict[str, torch.Tensor] = {}
        for k, v in out.items():
            for pat, rep in km.rules:
                if re.search(pat, k):
                    k = None if rep is None else re.sub(pat, rep, k)  # type: ignore[arg-type]
                    break
            if k is not None:
                renamed[k] = v
        out = renamed
    return out


def _adapt_pos_embed(
    v: torch.Tensor, model: PEModel, src_prefix: int, src_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    if v.dim() == 2:
        v = v.unsqueeze(0)
    target = model.pos_embed
    assert target is not None
    if v.shape[-1] != target.shape[-1]:
        raise ValueError(f"pos_embed has embed dim {v.shape[-1]}, the model {target.shape[-1]}")
    grid = v[:, src_prefix:]
    old_size = infer_grid_size(grid.shape[1]) if src_grid is None else tuple(src_grid)
    grid = resample_abs_pos_embed(grid, model.patch_embed.grid_size, old_size, num_prefix_tokens=0)
    npt = model.num_prefix_tokens
    if npt == 0:
        return grid
    # prefix rows [class, distillation]: the checkpoint's where it has them, else the model's own (initialised) ones
    kept = min(src_prefix, npt)
    own = target[:, kept:npt].detach().to(device=v.device, dtype=v.dtype)
    return torch.cat([v[:, :kept], own, grid], dim=1)


def checkpoint_filter_fn(
    checkpoint: Mapping[str, Any], model: PEModel, src_grid: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """A timm/DeiT/CCT/own-format checkpoint adapted to ``model`` (see the module docstring). ``src_grid``: the
    checkpoint's token grid (h, w) where known (needed for a non-square one); None infers a square grid."""
    sd = map_checkpoint_keys(unwrap_state_dict(checkpoint), model)
    own = model.state_dict()
    first = "patch_embed." + getattr(model.patch_embed, "first_conv", "proj")
    src_prefix = int("cls_token" in sd) + int("dist_token" in sd)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if (k == "dist_token" or k.startswith("head_dist.")) and not getattr(model, "distilled", False):
            continue  # DeiT distillation token/head: not part of a model without them
        if k == "cls_token" and model.cls_token is None:
            continue  # GAP model: no class token
        if k == "pos_embed":
            if model.pos_embed is None:
                continue  # this configuration uses no position embedding
            kind = getattr(model, "pos_embed_type", "learn")
            if kind != "learn":
                _check_fixed_table(v, kind, src_prefix)
                v = own[k]  # the same fixed sin-cos table: the model's own, computed for its grid
            else:
                v = _adapt_pos_embed(v, model, src_prefix, src_grid)
        elif k == first + ".weight" and k in own and v.shape != own[k].shape:
            v = _adapt_patch_weight(v, own[k].shape, k)
        elif k.startswith(("head.", "head_dist.")) and (k not in own or v.shape != own[k].shape):
            continue  # another class count (or no head): the model's head stays as it is
        out[k] = v
    return out


def _check_fixed_table(v: torch.Tensor, kind: str, src_prefix: int) -> None:
    """A checkpoint's PE may load into a model with a fixed ``kind`` table only if it is that table (for the
    checkpoint's own grid and prefix rows): a learned PE is never replaced silently."""
    v = v.reshape(-1, v.shape[-1]).float()
    grid = infer_grid_size(v.shape[0] - src_prefix)
    table = sincos_pos_embed(kind, grid, v.shape[-1], src_prefix).reshape(v.shape)
    err = float((v - table).abs().max())
    if err > 1e-3:
        raise ValueError(
            f"the checkpoint's pos_embed is not the fixed {kind!r} table this model uses (max |diff| {err:.3g}): it "
            "holds another position embedding; build the model with pos_embed='learn' to load it"
        )


def _adapt_patch_weight(v: torch.Tensor, shape: torch.Size, name: str = "patch_embed.proj.weight") -> torch.Tensor:
    if v.shape[0] == shape[0] and v.shape[2:] == shape[2:] and shape[1] == 1 and v.shape[1] == 3:
        return v.sum(dim=1, keepdim=True)  # RGB filters -> one grey channel (as timm's adapt_input_conv)
    raise ValueError(
        f"{name} of the checkpoint has shape {tuple(v.shape)}, the model needs {tuple(shape)} "
        "(another patch size, embed dim or channel count that cannot be adapted)"
    )


def read_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the (str -> str) metadata of a ``.safetensors`` file; nothing is unpickled."""
    try:
        from safetensors import safe_open
    except ImportError:
        from .._install import install_advice

        raise ImportError(
            f"reading {os.fspath(path)!r} needs the safetensors package: {install_advice('export')}"
        ) from None
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a ``.safetensors`` file (by its suffix)."""
    return os.fspath(path).lower().endswith(".safetensors")


def load_pretrained(
    model: PEModel,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    weights_only: bool = True,
) -> _IncompatibleKeys:
    """Load a timm/DeiT-format (or a published layout of :data:`KEY_MAPS`, or this package's) checkpoint into
    ``model``.

    ``checkpoint``: a path (``.safetensors``: read without pickle; else ``torch.load``, ``weights_only`` by
    default) or a state dict, plain or wrapped in ``{"model": ...}``. The class token and its PE row are dropped
    for GAP models, the PE is resampled to the model's grid and a head of another size is skipped. Returns
    ``(missing_keys, unexpected_keys)``.

    ``strict=True`` (default): every parameter of the model must come from the checkpoint (the PE LayerNorms
    included) and every checkpoint tensor must be used, else a RuntimeError naming them. The one exception:
    ``pos_embed`` of a model that adds an absolute PE to an architecture without one (timm's or Microsoft's Swin
    into MPVG's Swin) is set to zero, so the model computes what the checkpoint's model computed.
    ``strict=False``: loads what fits and warns naming every missing and unexpected key; e.g. a plain DeiT
    checkpoint into ``pe='mpvg'`` leaves exactly ``model.pe_norm_parameter_names()`` at their initial values
    (identity). A checkpoint PE that is not the model's fixed sin-cos table (``pos_embed='sincos1d'``/
    ``'sincos2d'``) is a ValueError.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if is_safetensors(path):
            checkpoint = read_safetensors(path, map_location)[0]
        else:
            try:
                checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
            except Exception as exc:  # noqa: BLE001 - add the hint, keep the cause
                if weights_only:
                    raise RuntimeError(
                        f"could not load {path!r} with weights_only=True ({exc}); if the file is "
                        "trusted and holds non-tensor objects, pass weights_only=False"
                    ) from exc
                raise
    filtered = checkpoint_filter_fn(checkpoint, model)
    result = model.load_state_dict(filtered, strict=False)
    added_pe = "pos_embed" in result.missing_keys and isinstance(getattr(model, "pos_embed", None), nn.Parameter)
    if added_pe:  # an architecture without an absolute PE: zero keeps the checkpoint's function
        with torch.no_grad():
            model.pos_embed.zero_()
    missing = [k for k in result.missing_keys if not (added_pe and k == "pos_embed")]
    if missing or result.unexpected_keys:
        pe_norms = set(model.pe_norm_parameter_names())
        n_pe = sum(k in pe_norms for k in missing)
        msg = f"missing {missing}, unexpected {result.unexpected_keys}"
        if strict:
            hint = f"; {n_pe} of them are PE LayerNorms the checkpoint lacks (strict=False: identity)" if n_pe else ""
            raise RuntimeError(f"checkpoint does not match the model: {msg}{hint}")
        hint = f"; {n_pe} missing PE LayerNorms start at identity" if n_pe else ""
        warnings.warn(f"checkpoint loaded partly into the model (strict=False): {msg}{hint}", stacklevel=2)
    return result
