"""timm integration: every project model and PE mode in timm's registry, and :func:`from_timm`.

Importing this module (it needs timm; ``import mpvg_kernels`` never imports it) registers, for every model of
:func:`mpvg_kernels.models.list_models` and every mode of ``PE_MODES``, the timm architecture ``{pe}_{model}``::

    import timm
    import mpvg_kernels.models.timm_bridge  # noqa: F401  (registers the models with timm)

    timm.list_models("mpvg_*")            # ['mpvg_deit_base_patch16_224', ..., 'mpvg_vit_lite_7_4_32']
    model = timm.create_model("mpvg_deit_tiny_patch16_224", num_classes=10, drop_path_rate=0.1)
    model = timm.create_model("lape_deit_small_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file="deit_small_patch16_224.pth"))

Names: ``default_*`` (a plain ViT/DeiT with this package's fused kernels), ``lape_*``, ``pvg_*``, ``mpvg_*``. No
weights are hosted; ``pretrained=True`` loads a local timm/DeiT or project checkpoint given as
``pretrained_cfg_overlay=dict(file=...)`` (the new PE LayerNorms start as identity affine). Keyword arguments go
to :class:`~mpvg_kernels.models.VisionTransformer` (``pool``, ``last_pos``, ``include_layer0``, ``fc_norm``, ...;
timm's ``global_pool='token'|'avg'`` is accepted for ``pool``). ``features_only=True`` gives timm's
``FeatureGetterNet`` over :meth:`~mpvg_kernels.models.VisionTransformer.forward_intermediates`.

:func:`from_timm` turns a timm ``VisionTransformer`` instance (ViT, DeiT, GAP variants with or without
``fc_norm``) into this package's model with the same weights.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

try:
    import timm  # noqa: F401
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
except ImportError as exc:  # pragma: no cover - exercised only without timm
    raise ImportError(
        "mpvg_kernels.models.timm_bridge needs timm: pip install 'mpvg-kernels[timm]' (or pip install timm)"
    ) from exc

from ..layers.pe_walk import POOL_ALIASES, check_pe_mode, default_pool
from .base import PEModel
from .pretrained import checkpoint_filter_fn
from .registry import MODEL_CFGS, create_model, fit_channels
from .vision_transformer import PE_MODES, VisionTransformer

__all__ = ["TIMM_MODELS", "attach_pe", "from_timm", "timm_checkpoint_filter_fn", "timm_name"]


def timm_name(model: str, pe: str) -> str:
    """The timm architecture name of a project model in a PE mode: ``f"{pe}_{model}"``."""
    return f"{pe}_{model}"


#: timm name -> (project model name, PE mode)
TIMM_MODELS: dict[str, tuple[str, str]] = {timm_name(m, pe): (m, pe) for m in MODEL_CFGS for pe in PE_MODES}


@functools.cache
def _family_names(model: str) -> dict[str, Any]:
    """The family's own names of its first conv and classifier (one model built on the meta device: nothing is
    allocated or initialised)."""
    with torch.device("meta"):
        cfg = create_model(model).default_cfg
    return {"first_conv": cfg["first_conv"], "classifier": cfg["classifier"]}


def _pretrained_cfg(model: str, pe: str) -> dict[str, Any]:
    entry = MODEL_CFGS[model]
    args, data = entry["model"], entry["cfg"]
    img = args["img_size"]
    own = _family_names(model)
    return dict(
        input_size=(args.get("in_chans", 3), img, img),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        crop_pct=data["crop_pct"],
        interpolation="bicubic",
        num_classes=args["num_classes"],
        first_conv=own["first_conv"],
        classifier=own["classifier"],
        license="apache-2.0",
        description=f"{model} with pe={pe!r} (mpvg-kernels); {entry['source']}",
    )


#: timm reads a module's ``default_cfgs`` when its entrypoints are registered.
default_cfgs = generate_default_cfgs({name: _pretrained_cfg(m, pe) for name, (m, pe) in TIMM_MODELS.items()})


def timm_checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: :func:`~mpvg_kernels.models.checkpoint_filter_fn` (class token and PE row
    dropped for GAP, PE resampled, head of another size dropped, wrappers unwrapped), plus the model's own
    (identity-affine) PE LayerNorms for keys a timm checkpoint lacks, so timm's strict load succeeds."""
    out = checkpoint_filter_fn(state_dict, model)  # type: ignore[arg-type]
    own = model.state_dict()
    for k in model.pe_norm_parameter_names():  # type: ignore[operator]
        out.setdefault(k, own[k])
    return out


def _finish_cfg(model: PEModel) -> None:
    """The data config timm's helpers read, made to describe this model (input size, channels, pe, pool)."""
    cfg = fit_channels(dict(model.pretrained_cfg), model.in_chans)
    cfg["input_size"] = (cfg["input_size"][0], *model.patch_embed.img_size)
    cfg.update(pe=model.pe, pool=model.pool)
    model.pretrained_cfg = model.default_cfg = cfg


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    arch, pe = TIMM_MODELS[name]
    if kwargs.get("pe", pe) != pe:
        raise ValueError(f"{name} is the pe={pe!r} model; for pe={kwargs['pe']!r} use {timm_name(arch, kwargs['pe'])}")
    kwargs.pop("pe", None)
    gp = kwargs.pop("global_pool", None)
    if gp is not None:
        if gp not in POOL_ALIASES:
            raise ValueError(f"global_pool must be 'token' or 'avg' for {name}, got {gp!r}")
        kwargs.setdefault("pool", POOL_ALIASES[gp])
    args = dict(MODEL_CFGS[arch]["model"])
    args.update(kwargs)
    model = build_model_with_cfg(
        partial(MODEL_CFGS[arch]["family"], pe=pe),
        name,
        pretrained,
        pretrained_filter_fn=timm_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **args,
    )
    if isinstance(model, PEModel):
        _finish_cfg(model)
    return model


def _register(name: str) -> None:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(name, pretrained=pretrained, **kwargs)

    arch, pe = TIMM_MODELS[name]
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    family = MODEL_CFGS[arch]["family"].__name__
    entry.__doc__ = f"{arch} with pe={pe!r} (mpvg-kernels {family})."
    globals()[name] = register_model(entry)


for _name in TIMM_MODELS:
    _register(_name)


# ----------------------------------------------------------------------------- from_timm


def _is(m: nn.Module, cls_name: str) -> bool:
    return type(m).__name__ == cls_name


def _check_timm_vit(model: nn.Module) -> list[str]:
    """What in ``model`` this package's VisionTransformer cannot express (empty: convertible)."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(model, TimmViT):
        raise TypeError(
            f"from_timm converts timm.models.vision_transformer.VisionTransformer instances (ViT, DeiT, GAP "
            f"variants); got {type(model).__module__}.{type(model).__name__}"
        )
    bad: list[str] = []
    if type(model) is not TimmViT:
        bad.append(f"the subclass {type(model).__name__} (e.g. DeiT's distillation token)")
    if getattr(model, "num_reg_tokens", 0):
        bad.append(f"{model.num_reg_tokens} register tokens")
    if getattr(model, "no_embed_class", False):
        bad.append("no_embed_class=True (prefix tokens without PE rows)")
    if model.pos_embed is None:
        bad.append("no learned absolute position embedding (pos_embed is None)")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        bad.append(f"global_pool={model.global_pool!r} (only 'token' and 'avg')")
    for attr, what in (("norm_pre", "pre_norm (norm_pre)"), ("patch_drop", "patch_drop_rate > 0")):
        if not isinstance(getattr(model, attr, nn.Identity()), nn.Identity):
            bad.append(what)
    pe = model.patch_embed
    proj = getattr(pe, "proj", None)
    if not _is(pe, "PatchEmbed") or not isinstance(proj, nn.Conv2d):
        bad.append(f"patch embedding {type(pe).__name__} (only timm's PatchEmbed with a Conv2d)")
    else:
        if not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity):
            bad.append("a norm in the patch embedding (embed_norm)")
        if proj.bias is None:
            bad.append("a patch projection without bias")
        if tuple(proj.kernel_size) != tuple(proj.stride) or tuple(proj.padding) != (0, 0):
            bad.append("an overlapping or padded patch projection")
        if getattr(pe, "dynamic_img_pad", False):
            bad.append("dynamic_img_pad=True")
    norms = {"norm": model.norm, "fc_norm": model.fc_norm}
    lns = [n for n, m in norms.items() if isinstance(m, nn.LayerNorm)]
    for n, m in norms.items():
        if not isinstance(m, (nn.Identity, nn.LayerNorm)):
            bad.append(f"{n} is {type(m).__name__} (only LayerNorm)")
    if len(lns) != 1:
        bad.append(f"{len(lns)} final LayerNorms among norm/fc_norm (exactly one expected)")
    eps = set()
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            bad.append(f"blocks.{i} is {type(blk).__name__} (only timm's Block)")
            continue
        if not (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)):
            bad.append(f"blocks.{i}: LayerScale (init_values)")
        a = blk.attn
        if not _is(a, "Attention") or not hasattr(a, "qkv"):
            bad.append(f"blocks.{i}.attn is {type(a).__name__}")
        else:
            for n in ("q_norm", "k_norm", "norm"):
                if not isinstance(getattr(a, n, nn.Identity()), nn.Identity):
                    bad.append(f"blocks.{i}.attn.{n} (qk_norm / scale_attn_norm)")
            if getattr(a, "gate", None) is not None:
                bad.append(f"blocks.{i}.attn.gate (gated attention)")
            d = a.proj.out_features
            if a.proj.bias is None or a.qkv.out_features != 3 * d or a.proj.in_features != d:
                bad.append(f"blocks.{i}.attn: proj without bias or attn_dim != dim")
        m = blk.mlp
        if type(m) is not Mlp or not isinstance(m.act, nn.GELU) or m.act.approximate != "none":
            bad.append(f"blocks.{i}.mlp is not timm's Mlp with exact GELU")
        elif not isinstance(m.norm, nn.Identity) or m.fc1.bias is None or m.fc2.bias is None:
            bad.append(f"blocks.{i}.mlp: scale_mlp_norm or bias-free linears")
        for n in ("norm1", "norm2"):
            ln = getattr(blk, n)
            if not isinstance(ln, nn.LayerNorm) or ln.weight is None or ln.bias is None:
                bad.append(f"blocks.{i}.{n} is {type(ln).__name__} (only LayerNorm with affine)")
            else:
                eps.add(ln.eps)
    for n in lns:
        eps.add(norms[n].eps)
    if len(eps) > 1:
        bad.append(f"LayerNorms with different eps {sorted(eps)}")
    return bad


def _drop_p(m: nn.Module) -> float:
    return float(getattr(m, "drop_prob", getattr(m, "p", 0.0)))


def from_timm(model: nn.Module, pe: str = "default", **kwargs: Any) -> VisionTransformer:
    """Convert a timm ``VisionTransformer`` (ViT, DeiT, GAP variants with or without ``fc_norm``) into this package's
    :class:`~mpvg_kernels.models.VisionTransformer` with position-embedding mode ``pe`` and the same weights.

    - ``pe='default'`` keeps the architecture: pooling (``token`` -> ``cls``; ``avg`` keeps a class token if the
      timm model has one, left out of the mean as in timm) and the last norm's placement (``norm`` before pooling,
      or ``fc_norm`` after it); outputs and gradients match timm's (fp32, same inputs and mode).
    - ``lape`` keeps the pooling; ``pvg``/``mpvg`` pool by average without a class token: the class token and
      its PE row are dropped. The new PE LayerNorms (LN'_l, LN'_last) start as identity affine (weight 1, bias 0),
      as in the papers. ``fc_norm`` follows the timm model (pass ``fc_norm=False`` to put the norm before pooling).
    - ``**kwargs`` override the derived :class:`VisionTransformer` arguments (``pool``, ``class_token``,
      ``fc_norm``, ``num_classes``, ``img_size``, ``last_pos``, ...); the PE is resampled and the head dropped
      (left as initialised) where they change shapes.

    The result has the timm model's device, dtype, train/eval mode and ``pretrained_cfg`` (plus ``pe``/``pool``).
    A model with something this package cannot express raises ``ValueError`` listing every such part.
    """
    check_pe_mode(pe)
    bad = _check_timm_vit(model)
    if bad:
        raise ValueError(f"from_timm cannot convert this {type(model).__name__}: unsupported " + "; ".join(bad))
    blk0 = model.blocks[0]
    pe_mod = model.patch_embed
    src_fc = isinstance(model.fc_norm, nn.LayerNorm)
    last_ln = model.fc_norm if src_fc else model.norm
    src_pool = "cls" if model.global_pool == "token" else "avg"
    args: dict[str, Any] = dict(
        img_size=tuple(pe_mod.img_size),
        patch_size=tuple(pe_mod.patch_size),
        in_chans=pe_mod.proj.in_channels,
        num_classes=model.num_classes,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=blk0.attn.num_heads,
        mlp_ratio=blk0.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=blk0.attn.qkv.bias is not None,
        drop_rate=_drop_p(model.pos_drop),
        attn_drop_rate=_drop_p(blk0.attn.attn_drop),
        drop_path_rate=_drop_p(model.blocks[-1].drop_path1),
        norm_eps=last_ln.eps,
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
    )
    if pe == "default" or (pe == "lape" and "pool" not in kwargs):
        args.update(pool=src_pool, class_token=model.has_class_token)
    pool = kwargs.get("pool", args.get("pool", default_pool(pe)))
    args["fc_norm"] = src_fc and pool == "avg"
    args.update(kwargs)
    ours = VisionTransformer(pe=pe, **args)
    ref = next(model.parameters())
    ours.to(device=ref.device, dtype=ref.dtype)

    sd = dict(model.state_dict())
    if src_fc != ours.use_fc_norm:  # move the last norm's weights to the placement the new model uses
        src, dst = ("fc_norm.", "norm.") if src_fc else ("norm.", "fc_norm.")
        sd = {(dst + k[len(src) :] if k.startswith(src) else k): v for k, v in sd.items()}
    filtered = checkpoint_filter_fn(sd, ours)
    result = ours.load_state_dict(filtered, strict=False)
    allowed = set(ours.pe_norm_parameter_names())
    if ours.num_classes != model.num_classes:
        allowed |= {k for k in ours.state_dict() if k.startswith("head.")}
    missing = [k for k in result.missing_keys if k not in allowed]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"from_timm: weights do not map onto the converted model: missing {missing}, unexpected "
            f"{result.unexpected_keys}"
        )
    ours.train(model.training)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update({k: v for k, v in ours.default_cfg.items() if k not in cfg or k in ("pe", "pool", "input_size")})
    cfg["num_classes"] = ours.num_classes
    ours.default_cfg = ours.pretrained_cfg = cfg
    return ours


# ----------------------------------------------------------------------------- attach_pe: timm's own Block


def attach_pe(model: nn.Module, pe: str = "mpvg", hierarchical: bool = True, include_layer0: bool = False) -> nn.Module:
    """Give a timm ``VisionTransformer`` PVG/MPVG position embeddings in place, keeping timm's ``Block`` and forward.

    Each PE block's ``norm1`` becomes a :class:`~mpvg_kernels.layers.blocks.StreamDualLayerNorm` (same LN1 weights,
    LN' identity affine) that timm's ``Block.forward`` calls as ``norm1(x)`` and that computes LN1(x) + LN'_l(p_l)
    with the fused ``dual_layer_norm``; for ``mpvg`` the final ``norm`` becomes LN(x) + LN'_last(pos)
    (:class:`~mpvg_kernels.layers.blocks.StreamLastNorm`). Blocks 1..L take a PE term (``include_layer0=True``:
    block 0 as well), chained when ``hierarchical``. timm still adds ``pos`` to the input (PVG/MPVG do), so
    ``lape`` (no input PE) is refused: use :func:`from_timm` or ``timm.create_model("lape_...")``. Pool by average
    without a class token (``global_pool='avg', class_token=False, fc_norm=False``) for the papers' setting; MPVG
    needs the norm before pooling (``fc_norm=False``). Returns ``model``; its new keys are ``*.pos_weight/pos_bias``.
    """
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from ..layers.blocks import PEStream, StreamDualLayerNorm, StreamLastNorm

    if pe not in ("pvg", "mpvg"):
        raise ValueError(
            f"attach_pe supports pe='pvg' or 'mpvg' (timm adds the PE to the input), got {pe!r}; for 'lape' use "
            "from_timm(model, pe='lape') or timm.create_model('lape_...')"
        )
    if not isinstance(model, TimmViT):
        raise TypeError(f"attach_pe expects a timm VisionTransformer, got {type(model).__name__}")
    bad = []
    pos = model.pos_embed
    n_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    if pos is None or getattr(model, "no_embed_class", False) or pos.shape[1] != n_tokens:
        bad.append("a pos_embed with one row per token (prefix tokens included; no no_embed_class, no pos_embed=None)")
    if pe == "mpvg" and not isinstance(model.norm, nn.LayerNorm):
        bad.append("MPVG's last PE needs the LayerNorm before pooling (fc_norm=False)")
    for i, blk in enumerate(model.blocks):
        if not isinstance(getattr(blk, "norm1", None), nn.LayerNorm):
            bad.append(f"blocks.{i}.norm1 is not a LayerNorm")
    if bad:
        raise ValueError("attach_pe cannot use this model: " + "; ".join(bad))
    stream = PEStream(model, hierarchical=hierarchical)
    for i, blk in enumerate(model.blocks):
        if i == 0 and not include_layer0:
            continue
        norm = StreamDualLayerNorm.from_layer_norm(blk.norm1)
        norm.stream = stream
        stream.norms.append(norm)
        blk.norm1 = norm
    if pe == "mpvg":
        last = StreamLastNorm.from_layer_norm(model.norm, use_pos=True)
        last.stream = stream
        model.norm = last
    model.pe = pe
    return model
