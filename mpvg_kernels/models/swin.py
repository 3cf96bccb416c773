"""Swin Transformer (Liu et al. 2021) with default, LaPE, PVG or MPVG position embeddings.

Parameter names follow timm 1.0's ``SwinTransformer`` (``patch_embed.proj/norm``, ``layers.i.downsample.norm/
reduction`` at the start of stages i > 0, ``layers.i.blocks.j.norm1/attn.qkv/attn.proj/
attn.relative_position_bias_table/norm2/mlp.fc1/mlp.fc2``, ``norm``, ``head.fc``), so a timm Swin state dict loads
into ``pe='default'`` with only the absolute PE (``pos_embed``) missing; with that PE zero the logits are timm's.

Position embeddings (``pos_embed=``):

- ``'learn'`` (default): an absolute PE ``pos_embed`` [1, H0 * W0, C0] on the stage-0 tokens (Swin's ``ape=True``;
  trunc_normal .02) on top of every block's relative position bias: MPVG's Swin (MPVG Table 1).
- ``'rpe'``: the relative position bias alone (Swin's own default; LaPE Table 1's Swin-Ti/Swin-S). Only
  ``pe='default'`` and ``pe='lape'`` exist here: PVG and MPVG deliver an absolute PE and have none to deliver.

LaPE's join of the relative PE (``rpe_norm``, default: on for ``pe='lape'``): each block adds LN(B) instead of B,
B = its relative position bias [nH, N, N] (N = window area), the LayerNorm over the key dimension with affine
parameters of shape [N] (``attn.rpe_norm.pos_weight/pos_bias``), as the official LaPE code's
``RPE_Attention(join_type='LN')`` does with ``nn.LayerNorm(num_patches)`` on the bias. With an absolute PE,
``pe='lape'`` joins both: the per-block LN' of the absolute PE and LN of the relative bias. This reading
reproduces MPVG Table 1's Swin-Ti LaPE count (the table truncates to 3 decimals, e.g. DeiT-S 22,050,664 ->
22.050): 28,589,410 + 8,832 (LN') + 12 * 2 * 49 (LN of the bias) = 28,599,418 -> 28.599; without the bias norm
it would be 28,598,242 -> 28.598 (the PVG count), with a LayerNorm over the heads instead (2 * 138 parameters)
28,598,518 -> 28.598. ``rpe_norm=False`` gives LaPE on the absolute PE alone.

The PE walk in the staged architecture. The papers leave the delivery open; here (``include_layer0`` is on by
default for every layer-wise mode: "for Swin, PVG and MPVG exceptionally include layer 0"):

- Block l of stage s adds LN'_l(p_l) to LN1_l(x_l) at its own width C_s, on the tokens [B, H_s * W_s, C_s] before
  the window partition (and the shift), so the PE term is shifted and partitioned with the tokens.
- Hierarchical chain: p_l is the previous PE block's term (``pos`` for the first), brought to block l's stage
  through the model's own patch-merging layers (the ``layers.k.downsample`` modules the tokens go through, same
  weights): a term of stage s' reaching a block of stage s > s' passes ``downsample`` of stages s'+1..s. One
  :class:`~mpvg_kernels.layers.PEWalk` is the rule; its ``norm_pos(i, p)`` first brings p to block i's stage.
- Non-hierarchical (``hierarchical=False``): p_l = ``pos`` brought to block l's stage the same way.
- MPVG's last step is LN(x_{L+1}) + LN'_last(pos) at the last width, pos brought to the last stage the same way
  (``last_pos=k``: the term of block k, brought there); the model always average-pools (``pool='avg'``).

Why: the counts leave no room for parameters that carry the PE between stages. Per-block LN' at the block's
width costs 2 * (2*96 + 2*192 + 6*384 + 2*768) = 8,832 (Swin-T), LN'_last at 768 1,536: 28,589,410 + 8,832 =
28,598,242 (PVG, 28.598 in MPVG Table 1) and + 1,536 = 28,599,778 (MPVG, 28.599 truncated). Swin-S (timm:
49,606,258 without the absolute PE): default 49,907,314, LN' 2 * (2*96 + 2*192 + 18*384 + 2*768) = 18,048, so
PVG 49,925,362, MPVG 49,926,898, LaPE 49,927,714 (+ 24 * 2 * 49). Rejected: (a) a separate merging layer
(LN(4C) + Linear(4C -> 2C), as ``downsample``) for the PE per stage: +74,496 + 296,448 + 1,182,720 = +1,553,664
for Swin-T, 30.15 M instead of 28.598; (b) a per-stage absolute PE (56^2*96 + 28^2*192 + 14^2*384 + 7^2*768 = 301,056 +
150,528 + 75,264 + 37,632): +263,424 over the one PE, default would read 28.852; (c) average-pooling the PE 2x2
between stages (no parameters, but the widths differ, so it needs a projection anyway, or zero-padding the
channels, which leaves half of every LN' input constant); (d) starting the chain anew at each stage from a
resampled ``pos`` (loses the hierarchy across stages and still needs a width change). Through the shared
downsample the PE is merged exactly as the tokens are, at no parameter cost.

Image-independent PE terms: :meth:`SwinTransformer.compute_pe_terms` (live), the inference cache
(:meth:`~mpvg_kernels.models.base.PEModel.pe_terms`) and ``forward(x, pe_terms=...)``; the terms depend on
``pos_embed``, the LN' parameters, the downsample layers and the last norm (:meth:`SwinTransformer._pe_tensors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UnsupportedPoolError
from ..layers.blocks import DropPath, Mlp, PEBlock, to_2tuple
from ..layers.norms import LastLayerNormPE
from ..layers.pe_cache import no_autocast
from ..layers.pe_walk import (
    AUTO,
    NO_ABSOLUTE_PE_PRESETS,
    POOL_ALIASES,
    SWIN_PRESETS,
    PETerms,
    check_pe_mode,
    resolve_pe_knobs,
)
from ..layers.window_attention import (
    PatchMerging,
    RelPosBiasNorm,
    WindowAttention,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from .base import PEModel, check_sizes
from .registry import imagenet_cfg, register_models
from .vision_transformer import feature_take_indices

__all__ = ["POS_EMBEDS", "SwinBlock", "SwinStage", "SwinTransformer"]

#: The position embeddings a Swin model can have: a learned absolute PE plus the relative bias, or the bias alone.
POS_EMBEDS: tuple[str, ...] = ("learn", "rpe")

_AUTO = AUTO


class SwinBlock(PEBlock):
    """A Swin block on tokens [B, H * W, C]: (shifted) window attention on ``LN1(x) [+ PE term]``, then the MLP.

    ``use_pos``: ``norm1`` is a :class:`DualLayerNorm` (LN1 + LN'), else a plain LayerNorm."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int],
        window: int,
        shift: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        eps: float = 1e-5,
        use_pos: bool = False,
        rpe_norm: bool = False,
    ) -> None:
        super().__init__()
        self.grid = grid
        # timm's rule: a window no larger than the map, and no shift where one window covers a dimension
        self.window = tuple(min(g, window) for g in grid)
        self.shift = tuple(0 if g <= window or not shift else window // 2 for g in grid)
        self._init_norm1(dim, eps, use_pos)
        self.attn = WindowAttention(dim, num_heads, self.window, qkv_bias, attn_drop, proj_drop, rpe_norm=rpe_norm)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        mask = shifted_window_mask(grid, self.window, self.shift) if any(self.shift) else None
        self.register_buffer("attn_mask", mask, persistent=False)

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Recompute ``attn_mask`` (not in the state dict) where it lives: timm's protocol
        (``reinit_non_persistent_buffers``, after ``to_empty``); the model's ``init_weights`` calls it too."""
        if self.attn_mask is not None:
            self.attn_mask.copy_(shifted_window_mask(self.grid, self.window, self.shift))

    def window_attention(self, a: torch.Tensor) -> torch.Tensor:
        """Shift, partition, attend, merge and shift back: [B, H * W, C] -> [B, H * W, C]."""
        B, _, C = a.shape
        H, W = self.grid
        a = a.view(B, H, W, C)
        if any(self.shift):
            a = torch.roll(a, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        y = self.attn(window_partition(a, self.window), mask=self.attn_mask)
        y = window_reverse(y, self.window, H, W)
        if any(self.shift):
            y = torch.roll(y, shifts=self.shift, dims=(1, 2))
        return y.reshape(B, H * W, C)

    def forward_rest(self, x: torch.Tensor, attn_in: torch.Tensor) -> torch.Tensor:
        """The block after its first norm."""
        x = x + self.drop_path1(self.window_attention(attn_in))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, pos_term: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, H * W, C], pos [1, H * W, C] -> (x_next, this block's PE term or None)."""
        a, term = self.attn_input(x, pos, pos_term)
        return self.forward_rest(x, a), term


class SwinStage(nn.Module):
    """One stage: ``downsample`` (PatchMerging at the start of stages > 0, else identity) and ``blocks``."""

    def __init__(self, downsample: PatchMerging | None, blocks: Sequence[SwinBlock], in_grid: tuple[int, int]) -> None:
        super().__init__()
        self.downsample: nn.Module = nn.Identity() if downsample is None else downsample
        self.blocks = nn.ModuleList(blocks)
        self.in_grid = in_grid

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (or a PE) of the previous stage -> this stage's grid and width."""
        if isinstance(self.downsample, PatchMerging):
            return self.downsample(x, self.in_grid)
        return x


class _PatchEmbed(nn.Module):
    """timm's Swin patch embedding: conv ``proj`` (stride = patch), then LayerNorm ``norm``; tokens [B, N, C]."""

    def __init__(
        self, img_size: tuple[int, int], patch_size: tuple[int, int], in_chans: int, dim: int, eps: float
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class _Head(nn.Module):
    """timm's ``head`` with its ``fc`` (pooling is done before): dropout then the linear classifier."""

    def __init__(self, dim: int, num_classes: int, drop: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc: nn.Module = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class SwinTransformer(PEModel):
    """Swin Transformer with default, LaPE, PVG or MPVG position embeddings (see the module docstring).

    Args beyond timm's: ``pe`` (mode), ``pos_embed`` (``'learn'``/``'rpe'``), ``rpe_norm`` (None: on for lape),
    ``include_layer0``/``hierarchical``/``add_pos_to_input`` (None: the mode's preset, with layer 0 included for
    every layer-wise mode), ``last_pos`` (``"auto"``: the mode's), ``pool`` (only ``avg``), ``pe_cache``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pe: str = "default",
        pool: str | None = None,
        pos_embed: str = "learn",
        rpe_norm: bool | None = None,
        include_layer0: bool | None = None,
        hierarchical: bool | None = None,
        add_pos_to_input: bool | None = None,
        last_pos: int | str | None = _AUTO,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        pos_init_std: float = 0.02,
        pe_cache: bool = True,
    ) -> None:
        super().__init__()
        check_pe_mode(pe)
        self._check_pool("pool", pool)
        if pos_embed in ("sincos1d", "sincos2d"):
            raise ValueError(
                f"pos_embed={pos_embed!r}: Swin's position embeddings are the learned absolute PE of its ape option "
                "(MPVG's Swin, 'learn') and the relative position bias ('rpe', LaPE's Swin); a fixed sin-cos table "
                f"is not part of either paper's Swin: choose one of {POS_EMBEDS}"
            )
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        depths, num_heads = tuple(depths), tuple(num_heads)
        img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        check_sizes(
            ("num_classes", num_classes, 0),
            ("embed_dim", embed_dim, 1),
            ("in_chans", in_chans, 1),
            ("window_size", window_size, 1),
            *(("patch_size", p, 1) for p in patch_size),
            *(("img_size", v, 1) for v in img_size),
            *(("depths", d, 1) for d in depths),
            *(("num_heads", h, 1) for h in num_heads),
        )
        if not depths or len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of the same length")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        num_stages = len(depths)
        if any(i % p for i, p in zip(img_size, patch_size, strict=True)):
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        grid0 = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        f = 2 ** (num_stages - 1)
        if any(g % f for g in grid0):
            raise ValueError(
                f"the patch grid {grid0} (img_size {img_size} / patch_size {patch_size}) must be divisible by "
                f"{f} to be merged 2x2 in each of the {num_stages - 1} downsampling stages"
            )
        dims = [embed_dim * 2**s for s in range(num_stages)]
        grids = [(grid0[0] // 2**s, grid0[1] // 2**s) for s in range(num_stages)]
        for s, (g, d, h) in enumerate(zip(grids, dims, num_heads, strict=True)):
            w = tuple(min(v, window_size) for v in g)
            if g[0] % w[0] or g[1] % w[1]:
                raise ValueError(
                    f"stage {s}: its {g[0]}x{g[1]} token grid is not divisible by the window "
                    f"{w[0]}x{w[1]} (window_size={window_size})"
                )
            if d % h:
                raise ValueError(f"stage {s}: width {d} is not divisible by num_heads {h}")

        #: ``avg`` (global average pooling, the papers' Swin) or ``""`` (no pooling: the head sees [B, H, W, C])
        self.pool = "" if pool == "" else "avg"
        self.pos_embed_type = pos_embed
        self.rpe_norm = (pe == "lape") if rpe_norm is None else bool(rpe_norm)
        depth = sum(depths)
        # the mode rules: SWIN_PRESETS (layer 0 in every layer-wise mode) with the absolute PE, else no absolute PE
        self._set_pe_knobs(resolve_pe_knobs(
            pe, depth, include_layer0=include_layer0, hierarchical=hierarchical, add_pos_to_input=add_pos_to_input,
            last_pos=last_pos, presets=SWIN_PRESETS if pos_embed == "learn" else NO_ABSOLUTE_PE_PRESETS,
            model=f"pos_embed={pos_embed!r}",
        ))
        if pe == "lape" and pos_embed == "rpe" and not self.rpe_norm:
            raise ValueError(
                "pe='lape' with pos_embed='rpe' joins the relative position bias through its "
                "LayerNorm; rpe_norm=False leaves it no position embedding to join"
            )

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_features = dims[-1]
        #: timm's layout of :meth:`forward_features` (and of the final features of :meth:`forward_intermediates`)
        self.output_fmt = "NHWC"
        self.depths = depths
        self.dims = tuple(dims)
        self.grids = tuple(grids)
        self.window_size = window_size
        self.norm_eps = norm_eps
        self.num_prefix_tokens = 0
        self.pe_cache_enabled = pe_cache
        self.grad_checkpointing = False

        self.patch_embed = _PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_eps)
        self._init_pos_embed()
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [float(v) for v in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        stages = []
        i = 0
        for s in range(num_stages):
            blocks = []
            for j in range(depths[s]):
                blocks.append(
                    SwinBlock(
                        dims[s],
                        num_heads[s],
                        grids[s],
                        window_size,
                        shift=j % 2 == 1,
                        mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias,
                        proj_drop=proj_drop_rate,
                        attn_drop=attn_drop_rate,
                        drop_path=dpr[i],
                        eps=norm_eps,
                        use_pos=self.block_uses_pos[i],
                        rpe_norm=self.rpe_norm,
                    )
                )
                i += 1
            down = PatchMerging(dims[s - 1], dims[s], eps=norm_eps) if s > 0 else None
            stages.append(SwinStage(down, blocks, grids[s - 1] if s > 0 else grids[0]))
        self.layers = nn.ModuleList(stages)
        #: block index (walk order) -> its stage
        self.block_stage = tuple(s for s in range(num_stages) for _ in range(depths[s]))
        self.norm = LastLayerNormPE(dims[-1], eps=norm_eps, use_pos=self.last_pos is not None)
        self.head = _Head(dims[-1], num_classes, drop_rate)

        self.pos_init_std = pos_init_std
        self.init_weights()
        self.feature_info = [
            dict(num_chs=dims[s], reduction=patch_size[0] * 2**s, module=f"layers.{s}") for s in range(num_stages)
        ]
        self.default_cfg: dict[str, Any] = self._make_default_cfg()
        self.pretrained_cfg = self.default_cfg

    # ------------------------------------------------------------------ configuration helpers

    def _make_default_cfg(self) -> dict[str, Any]:
        cfg = self._data_cfg("swin_transformer", "patch_embed.proj", "head.fc", crop_pct=0.9)
        cfg["pool_size"] = self.grids[-1]  # timm's: the spatial size of forward_features' output
        return cfg

    @property
    def blocks(self) -> tuple[SwinBlock, ...]:
        """Every block in walk order (stage 0 first); the modules live in ``layers.i.blocks``."""
        return tuple(b for stage in self.layers for b in stage.blocks)

    @property
    def global_pool(self) -> str:
        """timm's name for the pooling: ``avg``, or ``""`` for none."""
        return self.pool

    @staticmethod
    def _check_pool(name: str, pool: str | None) -> None:
        if pool is not None and pool != "" and POOL_ALIASES.get(pool) != "avg":
            raise UnsupportedPoolError(
                f"Swin average-pools its last stage: {name} must be 'avg', '' (no pooling) or None, got {pool!r}"
            )

    def _init_submodule(self, m: nn.Module) -> None:
        """timm's Swin init (:meth:`PEModel.init_weights <mpvg_kernels.models.base.PEModel.init_weights>`; the patch
        conv takes PyTorch's init), plus trunc_normal(.02) for the relative bias tables and LaPE's bias norms reset."""
        super()._init_submodule(m)
        if isinstance(m, RelPosBiasNorm):
            m.reset_parameters()
        elif isinstance(m, WindowAttention):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's Swin parameter groups (layer-wise LR decay); the absolute PE joins the stem."""
        return dict(
            stem=r"^patch_embed|pos_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+).downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    def no_weight_decay(self) -> set[str]:
        """The absolute PE and the relative position bias tables (besides every 1-D parameter)."""
        return {"pos_embed", "relative_position_bias_table"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def get_classifier(self) -> nn.Module:
        """The classifier (``head.fc``)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: identity, features out); ``global_pool``: None (keep),
        ``avg`` or ``""`` (no pooling: forward returns [B, H, W, num_classes or C])."""
        check_sizes(("num_classes", num_classes, 0))
        self._check_pool("global_pool", global_pool)
        if global_pool is not None:
            self.pool = "" if global_pool == "" else "avg"
            self.default_cfg["pool"] = self.pool
        self.num_classes = num_classes
        ref = self.patch_embed.proj.weight
        if num_classes > 0:
            fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
            self.head.fc = fc
        else:
            self.head.fc = nn.Identity()
        self.head.fc.train(self.training)
        self.default_cfg["num_classes"] = num_classes

    # ------------------------------------------------------------------ the PE walk across stages

    def _source_stage(self, i: int | None) -> int:
        """The stage of the PE that block ``i`` normalises (None: LN'_last's input), read from the walk: ``pos`` is
        at stage 0, block k's term at block k's stage. Known without looking at the tensor, so fx can trace it."""
        k = self.pe_walk.last_source_block if i is None else self.pe_walk.source_block(i)
        return 0 if k is None else self.block_stage[k]

    def _to_stage(self, p: torch.Tensor, i: int | None, stage: int) -> torch.Tensor:
        """The PE that block ``i`` (None: LN'_last) normalises, brought from its own stage to ``stage`` through the
        downsample layers of the stages between."""
        for s in range(self._source_stage(i) + 1, stage + 1):
            p = self.layers[s].down(p)
        return p

    def _norm_pos(self, i: int, p: torch.Tensor) -> torch.Tensor:
        """LN'_i of ``p`` brought to block i's stage (the walk's ``norm_pos``)."""
        return self.blocks[i].norm1.norm_pos(self._to_stage(p, i, self.block_stage[i]))

    def _last_pe(self, p: torch.Tensor) -> torch.Tensor:
        """LN'_last's input: ``p`` brought to the last stage."""
        return self._to_stage(p, None, len(self.layers) - 1)

    # ------------------------------------------------------------------ PE cache

    def _pe_tensors(self) -> list[torch.Tensor]:
        """The tensors the image-independent PE terms are computed from: the PE, every LN', the downsample layers
        the PE passes and the last norm's bias and LN'_last."""
        if self.pos_embed is None:
            return []
        ts: list[torch.Tensor] = [self.pos_embed]
        walks = any(self.block_uses_pos) or self.last_pos is not None
        for stage in self.layers:
            if walks and isinstance(stage.downsample, PatchMerging):
                ts += list(stage.downsample.parameters())
            for blk in stage.blocks:
                if blk.use_pos:
                    ts += [blk.norm1.pos_weight, blk.norm1.pos_bias]
        if self.has_last_pos:
            ts += [self.norm.bias, self.norm.pos_weight, self.norm.pos_bias]
        return ts

    def _default_grid(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def _pe_modules(self) -> list[nn.Module]:
        """The PE path (the cache keys on all their attributes): the tokenizer (its grid), the stages and the
        downsample layers the PE passes, every block's norm1 (LN'), the last norm."""
        downs = [m for stage in self.layers for m in stage.downsample.modules()]
        return [self.patch_embed, *self.layers, *downs, *(blk.norm1 for blk in self.blocks), self.norm]

    def compute_pe_terms(self, grid: tuple[int, int] | None = None) -> PETerms | None:
        """The PE, every block's PE term (at its stage), LN'_last's term (at the last stage) and the pooled bias,
        computed now from the parameters along :attr:`pe_walk` (differentiable; no cache). None without an
        absolute PE. Only the model's own grid exists (the attention masks are built for it)."""
        if grid is not None and tuple(grid) != self.patch_embed.grid_size:
            raise ValueError(f"Swin's PE terms exist for its own token grid {self.patch_embed.grid_size}, not {grid}")
        if self.pos_embed is None:
            return None
        pos = self.pos_embed
        last = self.norm
        with no_autocast(pos.device.type):
            return self.pe_walk.terms(
                pos,
                self._norm_pos,
                last_term=(lambda p: last.pos_term(self._last_pe(p))) if self.has_last_pos else None,
                pooled_bias=(lambda p: last.pooled_bias(self._last_pe(p))) if self.has_last_pos else None,
            )

    # ------------------------------------------------------------------ forward

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The token grid of images ``x``: the model's own (the attention masks are built for it); ValueError for
        another layout or size."""
        traced = self._traced_grid()
        if traced is not None:
            return traced
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.patch_embed.img_size:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} does not match the model's img_size "
                f"{self.patch_embed.img_size}; build the model with img_size=..."
            )
        return self.patch_embed.grid_size

    def _embed(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.add_pos_to_input:
            x = x + pos
        return self.pos_drop(x)

    def _run_block(
        self, blk: SwinBlock, x: torch.Tensor, pos: torch.Tensor | None, pos_term: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(blk, x, pos, pos_term, use_reentrant=False)
        return blk(x, pos, pos_term)

    def _forward_body(
        self,
        x: torch.Tensor,
        pe_terms: PETerms | None = None,
        take: Sequence[int] = (),
        stop_after: int | None = None,
    ) -> tuple[torch.Tensor, PETerms | None, torch.Tensor | None, list[torch.Tensor]]:
        """Images -> (x_{L+1} [B, N_last, C_last], the precomputed terms used or None, LN'_last's source (pos or a
        block term, not yet brought to the last stage) when computed live, the tokens after each stage in
        ``take``). ``stop_after``: run stages 0..stop_after only."""
        self._grid(x)
        pe_terms = self._given_terms(pe_terms)
        if pe_terms is None and self.pos_embed is not None:
            pe_terms = self.pe_terms()
        pos = None
        if self.pos_embed is not None:
            pos = pe_terms.pos if pe_terms is not None else self.pos_embed
        x = self._embed(x, pos)
        kept: list[torch.Tensor] = []
        step = self.pe_walk.start(pos) if pe_terms is None else None
        i = 0
        for s, stage in enumerate(self.layers):
            if stop_after is not None and s > stop_after:
                break
            x = stage.down(x)
            for blk in stage.blocks:
                if pe_terms is not None:
                    x, _ = self._run_block(blk, x, None, pe_terms.terms[i])
                else:
                    assert step is not None
                    src = step.source(i)
                    x, term = self._run_block(blk, x, None if src is None else self._to_stage(src, i, s))
                    step.record(i, term)
                i += 1
            if s in take:
                kept.append(x)
        return x, pe_terms, None if step is None else step.last_source, kept

    def _nhwc(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Tokens [B, H_s * W_s, C_s] of ``stage`` -> [B, H_s, W_s, C_s]."""
        h, w = self.grids[stage]
        return x.reshape(x.shape[0], h, w, x.shape[-1])

    def forward_features(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Features [B, H, W, C] of the last stage after the last norm: LN(x_{L+1}) (+ LN'_last(pos) for MPVG),
        NHWC as timm's Swin (:attr:`output_fmt`)."""
        x, terms, last_src, _ = self._forward_body(x, pe_terms)
        return self._nhwc(self._norm_tokens(x, self._last_term(terms, last_src)), len(self.layers) - 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features [B, H, W, C] (from :meth:`forward_features`) or tokens [B, N, C] -> average (unless the pooling
        is ``""``) -> logits (or the pooled features with ``pre_logits``)."""
        if self.pool:
            x = x.mean(dim=tuple(range(1, x.dim() - 1)))
        return self.head(x, pre_logits=pre_logits)

    def forward_pooled(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Images -> pooled features [B, C_last] with the fused last step: LN + GAP (+ the cached pooled PE bias,
        or LN'_last(pos) per token when computed live) in one pass."""
        x, terms, last_src, _ = self._forward_body(x, pe_terms)
        if self.last_norm is None:  # pruned away
            return x.mean(dim=1)
        if terms is not None and terms.pooled_bias is not None:
            return self.norm(x, pool=True, pooled_bias=terms.pooled_bias)
        return self.norm(x, pool=True, pos_term=self._last_term(terms, last_src))

    def forward(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> logits [B, num_classes] (``pe_terms``: precomputed :meth:`compute_pe_terms`;
        default: the cache where it may be used, else computed live). Without pooling (``global_pool=""``):
        [B, H, W, num_classes or C]."""
        if not self.pool:
            return self.head(self.forward_features(x, pe_terms))
        return self.head(self.forward_pooled(x, pe_terms))

    # ------------------------------------------------------------------ timm's feature contract

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates`` over the stages: the tokens after the stages named by ``indices`` (None:
        all; int n: the last n; a sequence: those), as [B, C_s, H_s, W_s] (``NCHW``) or [B, H_s, W_s, C_s]
        (``NHWC``). ``norm=True`` applies the last norm (with LN'_last(pos) for MPVG) to the last stage's output.
        Returns the list, or (final features [B, H, W, C], normalised when the last stage ran, list)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        num_stages = len(self.layers)
        take, max_index = feature_take_indices(num_stages, indices)
        feats, terms, last_src, kept = self._forward_body(x, take=take, stop_after=max_index if stop_early else None)
        term = None
        if (norm and num_stages - 1 in take) or not intermediates_only:
            term = self._last_term(terms, last_src)
        out = []
        for s, y in zip(take, kept, strict=True):
            if norm and s == num_stages - 1:
                y = self._norm_tokens(y, term)
            y = self._nhwc(y, s)
            out.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return out
        reached = num_stages - 1 if not stop_early else max_index
        if reached == num_stages - 1:  # the last norm is sized for (and applied to) the last stage only
            feats = self._norm_tokens(feats, term)
        return self._nhwc(feats, reached), out

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's pruning for feature extraction: keep the stages up to the last index taken. The last norm (with
        LN'_last, MPVG's last PE) goes with ``prune_norm`` or when the last stage goes (it is sized for that stage
        only); the classifier goes with ``prune_head`` or with the last stage (then ``num_features`` is the last
        kept stage's width, and pooling is off as in timm). Returns the absolute indices kept."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        drop_norm = prune_norm or prune_end
        depth = sum(len(stage.blocks) for stage in self.layers[: max_index + 1])
        knobs = self.pe_knobs.pruned(depth, last_norm=not drop_norm)
        self.layers = self.layers[: max_index + 1]
        self.depths = self.depths[: max_index + 1]
        self.block_stage = self.block_stage[:depth]
        self._set_pe_knobs(knobs)
        if drop_norm:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.dims[max_index]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        self.feature_info = self.feature_info[: max_index + 1]
        self.clear_pe_cache()
        return take

    # ------------------------------------------------------------------ analysis

    def forward_analysis(self, x: torch.Tensor) -> dict[str, Any]:
        """Every intermediate of ``mpvg analyze``, computed with unfused plain-PyTorch steps (no cache); the keys of
        :meth:`VisionTransformer.forward_analysis <mpvg_kernels.models.VisionTransformer.forward_analysis>`.
        Entries of block l have block l's stage shape ([B, H_s * W_s, C_s]); ``grid`` is the stage-0 grid, and
        ``grids`` (per block) and ``last_grid`` give each entry's own grid."""
        if self.last_norm is None:
            raise RuntimeError("forward_analysis needs the last norm, which prune_intermediate_layers removed")
        out, x, step = self._analysis_begin(x, grids=[self.grids[s] for s in self.block_stage],
                                            last_grid=self.grids[-1])
        i = 0
        for s, stage in enumerate(self.layers):
            x = stage.down(x)
            for blk in stage.blocks:
                a = self._analyse_block(out, step, i, blk, x, lambda p, i=i, s=s: self._to_stage(p, i, s))
                x = blk.forward_rest(x, a)
                i += 1
        last_term = self._last_term(None, step.last_source)
        pooled = self._analyse_last_norm(out, x, self.norm, last_term).mean(dim=1)
        out.update(pooled=pooled, logits=self.head(pooled))
        return out

    def extra_repr(self) -> str:
        return (
            f"pe={self.pe!r}, pos_embed={self.pos_embed_type!r}, rpe_norm={self.rpe_norm}, "
            f"add_pos_to_input={self.add_pos_to_input}, include_layer0={self.include_layer0}, "
            f"hierarchical={self.hierarchical}, last_pos={self.last_pos}"
        )


# ----------------------------------------------------------------------------- registered configurations

register_models(SwinTransformer, {
    "swin_tiny_patch4_window7_224": {
        # timm's swin_tiny_patch4_window7_224 plus MPVG's absolute PE (pos_embed="learn"; "rpe": Swin's own
        # relative bias only); stochastic depth 0.2 as in the Swin paper's Swin-T recipe.
        "model": dict(
            img_size=224, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
            drop_path_rate=0.2, num_classes=1000,
        ),
        "cfg": imagenet_cfg(crop_pct=0.9),
        "source": "Swin-T (Liu et al. 2021); MPVG Table 1 (absolute PE), LaPE Table 1 (pos_embed='rpe')",
        "tiny": dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                     drop_path_rate=0.0),
    },
    "swin_small_patch4_window7_224": {
        "model": dict(
            img_size=224, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
            drop_path_rate=0.3, num_classes=1000,
        ),
        "cfg": imagenet_cfg(crop_pct=0.9),
        "source": "Swin-S (Liu et al. 2021); LaPE Table 1 (pos_embed='rpe')",
        "tiny": dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                     drop_path_rate=0.0),
    },
})
