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

import contextlib
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
    from .._install import install_advice

    raise ImportError(f"mpvg_kernels.models.timm_bridge needs timm: {install_advice('timm')}") from exc

from ..errors import UnsupportedPoolError
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
    return {"first_conv": cfg["first_conv"], "classifier": cfg["classifier"], "pool_size": cfg.get("pool_size")}


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
        pool_size=own["pool_size"],
        fixed_input_size=True,
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
    cfg.update(pe=model.pe, pool=model.pool, fixed_input_size=not model.dynamic_img_size,
               pool_size=model.default_cfg.get("pool_size"))
    model.pretrained_cfg = model.default_cfg = cfg


def _construct(
    family: type[PEModel], device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs: Any
) -> PEModel:
    """``family(**kwargs)`` built on ``device`` and cast to ``dtype`` (timm's factory keywords; None: the defaults)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = family(**kwargs)
    return model if dtype is None else model.to(dtype=dtype)


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    arch, pe = TIMM_MODELS[name]
    if kwargs.get("pe", pe) != pe:
        raise ValueError(f"{name} is the pe={pe!r} model; for pe={kwargs['pe']!r} use {timm_name(arch, kwargs['pe'])}")
    kwargs.pop("pe", None)
    gp = kwargs.pop("global_pool", None)
    if gp is not None:
        if gp not in POOL_ALIASES and gp != "":
            raise UnsupportedPoolError(
                f"global_pool must be 'token', 'avg' or '' (no pooling, Swin) for {name}, got {gp!r}"
            )
        kwargs.setdefault("pool", POOL_ALIASES.get(gp, gp))
    # timm's FeatureGetterNet over forward_intermediates; the caller's feature_cfg (e.g. norm=True) on top
    feature_cfg = {"out_indices": 3, "feature_cls": "getter", **(kwargs.pop("feature_cfg", None) or {})}
    args = dict(MODEL_CFGS[arch]["model"])
    args.update(kwargs)
    model = build_model_with_cfg(
        partial(_construct, MODEL_CFGS[arch]["family"], pe=pe),
        name,
        pretrained,
        pretrained_filter_fn=timm_checkpoint_filter_fn,
        feature_cfg=feature_cfg,
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


def _register_fx_leaves() -> None:
    """The modules torch.fx keeps whole (timm's ``register_notrace_module``): blocks, tokenizers and PE LayerNorms
    branch on their inputs' shapes and strides (which fx cannot trace) and run the fused ops."""
    from timm.models import register_notrace_module

    from ..layers.blocks import Block, PatchEmbed
    from ..layers.norms import DualLayerNorm, LastLayerNormPE
    from ..layers.t2t import T2TTokenizer
    from ..layers.tokenizers import ConvTokenizer
    from ..layers.window_attention import PatchMerging
    from .ceit import CeiTBlock, I2TEmbed, LCABlock
    from .swin import SwinBlock

    for cls in (
        Block,
        PatchEmbed,
        DualLayerNorm,
        LastLayerNormPE,
        T2TTokenizer,
        ConvTokenizer,
        PatchMerging,
        CeiTBlock,
        I2TEmbed,
        LCABlock,
        SwinBlock,
    ):
        register_notrace_module(cls)


_register_fx_leaves()


# ----------------------------------------------------------------------------- from_timm


def _drop_p(m: nn.Module) -> float:
    """The rate of a dropout / drop-path module (0 for an identity)."""
    return float(getattr(m, "drop_prob", getattr(m, "p", 0.0)))


def _layer_norm_problem(m: nn.Module) -> str | None:
    """Why ``m`` is not a LayerNorm this package computes identically (None: it is)."""
    from timm.layers import LayerNorm as TimmLayerNorm

    if type(m) not in (nn.LayerNorm, TimmLayerNorm):
        return f"{type(m).__name__} (norm_layer: only LayerNorm)"
    if m.weight is None or m.bias is None:
        return "LayerNorm without affine weight and bias"
    if getattr(m, "_fast_norm", False):
        return "timm's fast_norm LayerNorm (timm.layers.set_fast_norm(True))"
    return None


def _blocks_text(idx: list[int], depth: int) -> str:
    return "every block" if len(idx) == depth else "blocks " + ", ".join(map(str, idx))


def _check_blocks(model: nn.Module, eps: set[float]) -> list[str]:
    """What in ``model.blocks`` this package's Block cannot express; per problem, the blocks that have it."""
    from timm.layers import Attention, Mlp
    from timm.layers.activations import GELU as TimmGELU
    from timm.models.vision_transformer import Block

    found: dict[str, list[int]] = {}
    blocks = list(model.blocks)
    ref = blocks[0]
    for i, blk in enumerate(blocks):
        why: list[str] = []
        if type(blk) is not Block:
            found.setdefault(f"block_fn={type(blk).__name__} (only timm's Block)", []).append(i)
            continue
        if not (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)):
            why.append("init_values (LayerScale)")
        a = blk.attn
        if type(a) is not Attention:
            why.append(f"attn_layer={type(a).__name__} (only timm's Attention)")
        else:
            if not (isinstance(a.q_norm, nn.Identity) and isinstance(a.k_norm, nn.Identity)):
                why.append("qk_norm=True (q_norm/k_norm)")
            if not isinstance(a.norm, nn.Identity):
                why.append("scale_attn_norm=True (attn.norm)")
            if getattr(a, "gate", None) is not None:
                why.append("gated attention (attn.gate)")
            d = model.embed_dim
            if a.attn_dim != d or a.proj.out_features != d or a.scale != a.head_dim**-0.5:
                why.append("an attention width other than embed_dim or a non-standard scale")
            if a.proj.bias is None:
                why.append("proj_bias=False (attn.proj without bias)")
            if (a.qkv.bias is None) != (ref.attn.qkv.bias is None) or a.num_heads != ref.attn.num_heads:
                why.append("num_heads or qkv_bias differing between blocks")
        m = blk.mlp
        if type(m) is not Mlp or not (isinstance(m.fc1, nn.Linear) and isinstance(m.fc2, nn.Linear)):
            why.append(f"mlp_layer={type(m).__name__} (only timm's Mlp with linear layers)")
        else:
            act = m.act
            if not (type(act) is TimmGELU or (type(act) is nn.GELU and act.approximate == "none")):
                why.append(
                    f"act_layer={type(act).__name__}"
                    f"{'(approximate=' + repr(act.approximate) + ')' if isinstance(act, nn.GELU) else ''}"
                    " (only exact GELU)"
                )
            if not isinstance(m.norm, nn.Identity):
                why.append("scale_mlp_norm=True (mlp.norm)")
            if m.fc1.bias is None or m.fc2.bias is None:
                why.append("proj_bias=False (MLP without bias)")
            if isinstance(ref.mlp, Mlp) and m.fc1.out_features != ref.mlp.fc1.out_features:
                why.append("MLP widths differing between blocks")
        for n in ("norm1", "norm2"):
            problem = _layer_norm_problem(getattr(blk, n))
            if problem:
                why.append(f"{n} is {problem}")
            else:
                eps.add(getattr(blk, n).eps)
        for w in why:
            found.setdefault(w, []).append(i)
    return [f"{_blocks_text(idx, len(blocks))}: {w}" for w, idx in found.items()]


def _check_dropout(model: nn.Module, kwargs: Mapping[str, Any]) -> list[str]:
    """Dropout and stochastic depth this package's single ``drop_rate`` / ``attn_drop_rate`` / linear
    ``drop_path_rate`` cannot reproduce; a rate passed to :func:`from_timm` explicitly is the user's choice."""
    from timm.layers import DropPath

    bad: list[str] = []
    blocks = list(model.blocks)
    none = nn.Identity()
    proj = {
        _drop_p(getattr(sub, n, none))
        for b in blocks
        for sub, n in ((b.attn, "proj_drop"), (b.mlp, "drop1"), (b.mlp, "drop2"))
    }
    rates = {"drop_rate": _drop_p(model.head_drop), "pos_drop_rate": _drop_p(model.pos_drop)}
    if len(proj) == 1:
        rates["proj_drop_rate"] = proj.pop()
    if "drop_rate" not in kwargs and (len(set(rates.values())) > 1 or len(rates) < 3):
        shown = ", ".join(f"{k}={v:g}" for k, v in rates.items())
        bad.append(
            f"different dropout rates ({shown}{'' if len(rates) == 3 else ', proj_drop_rate varying'}): "
            "this model has one drop_rate for all three; pass drop_rate=... to choose it"
        )
    attn = {_drop_p(getattr(b.attn, "attn_drop", none)) for b in blocks}
    if "attn_drop_rate" not in kwargs and len(attn) > 1:
        bad.append(f"attention dropout differing between blocks ({sorted(attn)}); pass attn_drop_rate=... to choose")
    odd = {
        type(m).__name__
        for b in blocks
        for m in (b.drop_path1, b.drop_path2)
        if not isinstance(m, (nn.Identity, DropPath))
    }
    if odd:
        bad.append(f"drop path modules {sorted(odd)} (only timm's DropPath)")
    paths = [(_drop_p(b.drop_path1), _drop_p(b.drop_path2)) for b in blocks]
    top = paths[-1][0]
    linear = [float(v) for v in torch.linspace(0, top, len(blocks), device="cpu")]
    if "drop_path_rate" not in kwargs and any(p != (v, v) for p, v in zip(paths, linear, strict=True)):
        bad.append(
            "drop path rates that are not timm's linear rule 0..drop_path_rate over the blocks "
            f"({[p[0] for p in paths]}); pass drop_path_rate=... to choose"
        )
    return bad


def _check_timm_vit(model: nn.Module, kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """What in ``model`` this package's VisionTransformer cannot reproduce exactly (empty: convertible); each entry
    names the timm constructor option. The full table is in docs/timm.md."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Block
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(model, TimmViT):
        raise TypeError(
            f"from_timm converts timm.models.vision_transformer.VisionTransformer instances (ViT, DeiT, GAP "
            f"variants); got {type(model).__module__}.{type(model).__name__}"
        )
    kwargs = kwargs or {}
    bad: list[str] = []
    if type(model) is not TimmViT:
        bad.append(f"the subclass {type(model).__name__} (e.g. DeiT's distillation token)")
    npt = model.num_prefix_tokens
    if model.num_reg_tokens:
        bad.append(f"reg_tokens={model.num_reg_tokens} (register tokens)")
    if model.no_embed_class and npt:
        bad.append("no_embed_class=True with a class token (prefix tokens without PE rows)")
    if model.pos_embed is None:
        bad.append("pos_embed='none' (no learned absolute position embedding)")
    gp = model.global_pool
    if model.attn_pool is not None or gp not in ("token", "avg"):
        bad.append(f"global_pool={gp!r} (only 'token' and 'avg')")
    elif gp == "avg" and model.pool_include_prefix and npt:
        bad.append(
            "pool_include_prefix=True with global_pool='avg' and a class token (timm averages the class "
            "token too; this model leaves it out of the mean)"
        )
    if not isinstance(model.norm_pre, nn.Identity):
        bad.append("pre_norm=True (norm_pre)")
    if not isinstance(model.patch_drop, nn.Identity):
        bad.append("patch_drop_rate > 0 (PatchDropout)")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        bad.append(f"embed_layer={type(pe).__name__} (only timm's PatchEmbed with a Conv2d)")
    else:
        if not isinstance(pe.norm, nn.Identity):
            bad.append("embed_norm_layer (a norm in the patch embedding)")
        if pe.proj.bias is None:
            bad.append("a patch projection without bias (pre_norm=True)")
        if tuple(pe.proj.kernel_size) != tuple(pe.proj.stride) or tuple(pe.proj.padding) != (0, 0):
            bad.append("an overlapping or padded patch projection")
        if pe.dynamic_img_pad:
            bad.append("dynamic_img_pad=True")
    eps: set[float] = set()
    norms = {"norm": model.norm, "fc_norm": model.fc_norm}
    present = {n: m for n, m in norms.items() if not isinstance(m, nn.Identity)}
    if not present:
        bad.append("final_norm=False (no LayerNorm after the blocks)")
    elif len(present) > 1:
        bad.append("both norm and fc_norm are norms (only one LayerNorm after the blocks)")
    for n, m in present.items():
        problem = _layer_norm_problem(m)
        if problem:
            bad.append(f"{n} is {problem}")
        else:
            eps.add(m.eps)
    head = model.head
    if not (isinstance(head, nn.Identity) or (type(head) is nn.Linear and head.bias is not None)):
        bad.append(
            f"head is {type(head).__name__}{' without bias' if type(head) is nn.Linear else ''} "
            "(only nn.Linear with bias or nn.Identity)"
        )
    bad += _check_blocks(model, eps)
    if all(type(b) is Block for b in model.blocks):  # other blocks are refused above, their dropout aside
        bad += _check_dropout(model, kwargs)
    if len(eps) > 1:
        bad.append(f"LayerNorms with different eps {sorted(eps)}")
    return bad


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

    The result has the timm model's device, dtype, train/eval mode, gradient checkpointing, frozen parameters and
    ``pretrained_cfg`` (plus ``pe``/``pool``). Every timm constructor option is reproduced exactly or refused: a
    model with something this package cannot reproduce raises ``ValueError`` listing every such part by its timm
    option (the table is in docs/timm.md). Dropout rates this model cannot split (one ``drop_rate`` for the PE,
    projection and head dropout) are refused unless ``drop_rate=`` (or ``attn_drop_rate=``, ``drop_path_rate=``)
    is passed explicitly.
    """
    check_pe_mode(pe)
    bad = _check_timm_vit(model, kwargs)
    if bad:
        raise ValueError(f"from_timm cannot convert this {type(model).__name__}: unsupported " + "; ".join(bad))
    blk0 = model.blocks[0]
    pe_mod = model.patch_embed
    src_fc = isinstance(model.fc_norm, nn.LayerNorm)
    last_ln = model.fc_norm if src_fc else model.norm
    src_pool = "cls" if model.global_pool == "token" else "avg"
    hidden, dim = blk0.mlp.fc1.out_features, model.embed_dim
    mlp_ratio = hidden / dim if int(dim * (hidden / dim)) == hidden else (hidden + 0.5) / dim  # int(dim * r) == hidden
    args: dict[str, Any] = dict(
        img_size=tuple(pe_mod.img_size),
        patch_size=tuple(pe_mod.patch_size),
        in_chans=pe_mod.proj.in_channels,
        num_classes=model.num_classes,
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=blk0.attn.num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=blk0.attn.qkv.bias is not None,
        drop_rate=_drop_p(model.head_drop),
        attn_drop_rate=_drop_p(blk0.attn.attn_drop),
        drop_path_rate=_drop_p(model.blocks[-1].drop_path1),
        norm_eps=last_ln.eps,
        dynamic_img_size=bool(model.dynamic_img_size),
    )
    if pe == "default" or (pe == "lape" and "pool" not in kwargs):
        args.update(pool=src_pool, class_token=model.has_class_token)
    pool = kwargs.get("pool", args.get("pool", default_pool(pe)))
    args["fc_norm"] = src_fc and pool == "avg"
    args.update(kwargs)
    ours = VisionTransformer(pe=pe, **args)
    ref = next(model.parameters())
    ours.to(device=ref.device, dtype=ref.dtype)

    src, dst = ("fc_norm.", "norm.") if src_fc else ("norm.", "fc_norm.")

    def rename(k: str) -> str:  # the last norm's weights go to the placement the new model uses
        return dst + k[len(src) :] if src_fc != ours.use_fc_norm and k.startswith(src) else k

    sd = {rename(k): v for k, v in model.state_dict().items()}
    filtered = checkpoint_filter_fn(sd, ours, src_grid=tuple(pe_mod.grid_size))
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
    ours.set_grad_checkpointing(bool(model.grad_checkpointing))
    frozen = {rename(n) for n, p in model.named_parameters() if not p.requires_grad}
    for n, p in ours.named_parameters():  # frozen parameters stay frozen
        if n in frozen:
            p.requires_grad_(False)
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
