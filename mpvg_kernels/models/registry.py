"""Named model configurations, :func:`create_model`, :func:`list_models` and :func:`param_groups`."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .base import PEModel
from .ceit import CeiT
from .swin import SwinTransformer
from .vision_transformer import PE_MODES, VisionTransformer

__all__ = ["MODEL_CFGS", "create_model", "list_models", "param_groups"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
# sklearn's load_digits() pixels / 16 (0..16 -> 0..1): mean and std over all 1,797 8x8 images.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)

#: name -> {"model": constructor kwargs, "cfg": data config (mean, std, crop_pct, ...), "source": where it comes
#: from, optionally "family": the model class (default :class:`VisionTransformer`; every family subclasses
#: :class:`~mpvg_kernels.models.base.PEModel`), "tiny": kwargs overriding "model" for a small, fast variant of
#: the same architecture (tests and smoke runs: ``create_model(name, tiny=True)``), and "paper_counts_buffers":
#: buffers that the original code held as frozen parameters, which the papers' #Params count (the parameter
#: table adds them when it compares with a paper).
MODEL_CFGS: dict[str, dict[str, Any]] = {
    "deit_tiny_patch16_224": {
        "model": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000),
        "cfg": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875),
        "source": "DeiT-Ti (Touvron et al. 2021); MPVG Table 1",
        "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    },
    "deit_small_patch16_224": {
        "model": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=1000),
        "cfg": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875),
        "source": "DeiT-S (Touvron et al. 2021); MPVG Table 1",
        "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    },
    "deit_base_patch16_224": {
        "model": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000),
        "cfg": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875),
        "source": "DeiT-B (Touvron et al. 2021); MPVG Table 1",
        "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    },
    "vit_lite_7_4_32": {
        # Compact-Transformers vit_7_4_32: conv tokenizer 4x4/stride 4 with bias (kaiming_normal init), class
        # token (seq_pool=False), learnable PE (trunc_normal std 0.2), 7 blocks, dim 256, 4 heads, MLP ratio 2,
        # qkv without bias, LN2 applied to the residual stream, LayerNorm eps 1e-5, attention dropout 0.1,
        # stochastic depth 0.1, dropout 0 (as cvt_7_4_32 and cct_7_3x1_32, the official values).
        "model": dict(
            img_size=32,
            patch_size=4,
            embed_dim=256,
            depth=7,
            num_heads=4,
            mlp_ratio=2.0,
            qkv_bias=False,
            block_style="cct",
            attn_drop_rate=0.1,
            drop_path_rate=0.1,
            patch_init="kaiming_normal",
            pos_init_std=0.2,
            norm_eps=1e-5,
            num_classes=100,
        ),
        "cfg": dict(mean=CIFAR100_MEAN, std=CIFAR100_STD, crop_pct=1.0),
        "source": "ViT-Lite-7/4 (Hassani et al. 2022) on CIFAR-100; MPVG Table 2",
        "tiny": dict(img_size=16, embed_dim=32, depth=2, num_heads=2),
    },
    "vit_digits": {
        # Sized for sklearn's 8x8 digits upsampled to 16x16: 16 tokens of 4x4 pixels, dim 64, 4 blocks.
        "model": dict(
            img_size=16, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10
        ),
        "cfg": dict(mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=1.0),
        "source": "this project: the bundled digits data (8x8, 10 classes, 1,797 images)",
        "tiny": dict(embed_dim=32, depth=2, num_heads=2),
    },
    "t2t_vit_7": {
        # Official T2T-ViT (yitu-opensource/T2T-ViT, models/t2t_vit.py: t2t_vit_7): T2T module with Performer token
        # layers (token_dim 64, random features m = 32, dropout 0.1), fixed 1-D sinusoid PE (a buffer), class
        # token, 7 blocks of dim 256, 4 heads, MLP ratio 2, qkv without bias, attention scale head_dim^-0.5,
        # LayerNorm eps 1e-5, stochastic depth 0.1 (the default of the official train script), crop_pct 0.9.
        "model": dict(
            img_size=224,
            patch_size=16,
            tokenizer="t2t",
            tokenizer_args=dict(token_type="performer", token_dim=64),
            pos_embed="sincos1d",
            embed_dim=256,
            depth=7,
            num_heads=4,
            mlp_ratio=2.0,
            qkv_bias=False,
            norm_eps=1e-5,
            drop_path_rate=0.1,
            num_classes=1000,
        ),
        "cfg": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9),
        "source": "T2T-ViT-7 (Yuan et al. 2021); MPVG Tables 1-2, LaPE Table 1",
        # The official code holds the sinusoid table and the Performer random features as frozen nn.Parameters, and
        # the papers' #Params count them (4,310,222 = 4,255,694 trainable + 50,432 + 2 x 2,048); here they are
        # buffers, added back only where the parameter table compares with the papers.
        "paper_counts_buffers": ("pos_embed", "patch_embed.attention1.w", "patch_embed.attention2.w"),
        # 64 x 64 pixels -> 16 x 16, 8 x 8, then 4 x 4 tokens
        "tiny": dict(
            img_size=64, tokenizer_args=dict(token_type="performer", token_dim=16), embed_dim=32, depth=2, num_heads=2
        ),
    },
    # CeiT (Yuan et al. 2021): I2T tokenizer (conv 7x7/2 + BN + max-pool 3x3/2, then a 4x4/4 conv: 224 -> 14x14
    # tokens), LeFF instead of the MLP, layer-wise class-token attention (LCA); official parameter names.
    "ceit_tiny_patch16_224": {
        "family": CeiT,
        "model": dict(img_size=224, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=1000),
        "cfg": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875),
        "source": "CeiT-T (Yuan et al. 2021); MPVG Table 1, LaPE Table 1",
        "tiny": dict(img_size=32, patch_size=2, stem_chans=16, embed_dim=32, depth=2, num_heads=2),
    },
    "ceit_small_patch16_224": {
        "family": CeiT,
        "model": dict(img_size=224, patch_size=4, embed_dim=384, depth=12, num_heads=6, num_classes=1000),
        "cfg": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875),
        "source": "CeiT-S (Yuan et al. 2021); LaPE Table 1",
        "tiny": dict(img_size=32, patch_size=2, stem_chans=16, embed_dim=32, depth=2, num_heads=2),
    },
    # ---- VisionTransformer variants: DeiT distilled, CVT, CCT
    "deit_tiny_distilled_patch16_224": {
        # DeiT's distillation token and second head; pool="cls" in every mode (the heads read the two tokens).
        "model": dict(
            img_size=224,
            patch_size=16,
            embed_dim=192,
            depth=12,
            num_heads=3,
            num_classes=1000,
            distilled=True,
            pool="cls",
        ),
        "cfg": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875),
        "source": "DeiT-Ti distilled (Touvron et al. 2021, 5.91 M params); LaPE Table 1",
        "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    },
    "deit_small_distilled_patch16_224": {
        "model": dict(
            img_size=224,
            patch_size=16,
            embed_dim=384,
            depth=12,
            num_heads=6,
            num_classes=1000,
            distilled=True,
            pool="cls",
        ),
        "cfg": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875),
        "source": "DeiT-S distilled (Touvron et al. 2021, 22.4 M params); LaPE Table 1",
        "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    },
    "cvt_7_4_32": {
        # Compact-Transformers cvt_7_4_32: ViT-Lite's tokenizer (conv 4x4 / stride 4 with bias, kaiming_normal
        # init), sequence pooling (no class token) in every mode, learnable PE (trunc_normal std 0.2), 7 blocks,
        # dim 256, 4 heads, MLP ratio 2, qkv without bias, LN2 on the residual stream, LayerNorm eps 1e-5,
        # attention dropout 0.1, stochastic depth 0.1, dropout 0.
        "model": dict(
            img_size=32,
            patch_size=4,
            embed_dim=256,
            depth=7,
            num_heads=4,
            mlp_ratio=2.0,
            qkv_bias=False,
            block_style="cct",
            attn_drop_rate=0.1,
            drop_path_rate=0.1,
            patch_init="kaiming_normal",
            pos_init_std=0.2,
            norm_eps=1e-5,
            pool="seq",
            num_classes=100,
        ),
        "cfg": dict(mean=CIFAR100_MEAN, std=CIFAR100_STD, crop_pct=1.0),
        "source": "CVT-7/4 (Hassani et al. 2021, Compact-Transformers) on CIFAR-100; LaPE Table 2",
        "tiny": dict(img_size=16, embed_dim=32, depth=2, num_heads=2),
    },
    "cct_7_3x1_32": {
        # Compact-Transformers cct_7_3x1_32: conv tokenizer of one layer (conv 3x3 / stride 1 / padding 1 without
        # bias, ReLU, max-pool 3 / 2 / 1: 32x32 -> 16x16 = 256 tokens), otherwise as cvt_7_4_32.
        "model": dict(
            img_size=32,
            patch_size=3,
            tokenizer="conv",
            tokenizer_args=dict(n_conv_layers=1),
            embed_dim=256,
            depth=7,
            num_heads=4,
            mlp_ratio=2.0,
            qkv_bias=False,
            block_style="cct",
            attn_drop_rate=0.1,
            drop_path_rate=0.1,
            patch_init="kaiming_normal",
            pos_init_std=0.2,
            norm_eps=1e-5,
            pool="seq",
            num_classes=100,
        ),
        "cfg": dict(mean=CIFAR100_MEAN, std=CIFAR100_STD, crop_pct=1.0),
        "source": "CCT-7/3x1 (Hassani et al. 2021, Compact-Transformers) on CIFAR-100; LaPE Table 2",
        "tiny": dict(img_size=16, embed_dim=32, depth=2, num_heads=2),
    },
    "swin_tiny_patch4_window7_224": {
        # timm's swin_tiny_patch4_window7_224 plus MPVG's absolute PE (pos_embed="learn"; "rpe": Swin's own
        # relative bias only); stochastic depth 0.2 as in the Swin paper's Swin-T recipe.
        "family": SwinTransformer,
        "model": dict(
            img_size=224, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
            drop_path_rate=0.2, num_classes=1000,
        ),
        "cfg": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9),
        "source": "Swin-T (Liu et al. 2021); MPVG Table 1 (absolute PE), LaPE Table 1 (pos_embed='rpe')",
        "tiny": dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                     drop_path_rate=0.0),
    },
    "swin_small_patch4_window7_224": {
        "family": SwinTransformer,
        "model": dict(
            img_size=224, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
            drop_path_rate=0.3, num_classes=1000,
        ),
        "cfg": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9),
        "source": "Swin-S (Liu et al. 2021); LaPE Table 1 (pos_embed='rpe')",
        "tiny": dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                     drop_path_rate=0.0),
    },
}


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
    **kwargs: Any,
) -> PEModel:
    """Build the registered model ``name`` with position-embedding mode ``pe`` (default, lape, pvg, mpvg).

    ``tiny=True`` builds the registered small variant of the same architecture (few blocks, narrow, small input;
    for tests and smoke runs). ``num_classes`` and ``**kwargs`` override the registered constructor arguments (``pool``,
    ``img_size``, ``in_chans``, ``include_layer0``, ``hierarchical``, ``add_pos_to_input``, ``last_pos``,
    ``drop_path_rate``, ...). ``checkpoint_path``: a timm/DeiT-format or own checkpoint loaded with
    :func:`~mpvg_kernels.models.load_pretrained` (nothing is ever downloaded). The model's ``default_cfg`` holds
    ``input_size`` (C, H, W), ``mean``, ``std``, ``num_classes``, ``crop_pct``, ``interpolation``, ``pe``, ``pool``.
    """
    if name not in MODEL_CFGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if pe not in PE_MODES:
        raise ValueError(f"pe must be one of {PE_MODES}, got {pe!r}")
    entry = MODEL_CFGS[name]
    args = dict(entry["model"])
    if tiny:
        if "tiny" not in entry:
            raise ValueError(f"model {name!r} has no registered tiny variant")
        args.update(entry["tiny"])
    args.update(kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    model = entry.get("family", VisionTransformer)(pe=pe, **args)
    cfg = dict(model.default_cfg)
    cfg.update(entry["cfg"])
    cfg["architecture"] = name
    cfg = fit_channels(cfg, model.default_cfg["input_size"][0])
    model.default_cfg = model.pretrained_cfg = cfg
    if checkpoint_path is not None:
        from .pretrained import load_pretrained

        load_pretrained(model, checkpoint_path)
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
