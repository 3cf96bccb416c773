"""CeiT (Yuan et al. 2021, "Incorporating Convolution Designs into Visual Transformers") with default, LaPE, PVG
or MPVG position embeddings.

The architecture and its parameter names follow the official CeiT code:

- **I2T** (``i2t``): ``i2t.backbone.conv`` (7x7, stride 2, no bias) -> ``i2t.backbone.bn`` (BatchNorm) ->
  ``i2t.backbone.maxpool`` (3x3, stride 2) -> ``i2t.proj`` (``patch_size`` x ``patch_size`` conv, stride
  ``patch_size``, 4 for the ImageNet models): 224 px -> 56 x 56 feature map -> 14 x 14 tokens (a reduction of 16).
- a class token ``cls_token`` and a learnable absolute PE ``pos_embed`` [1, N + 1, D].
- **encoder blocks** ``blocks.i``: x = x + MSA(LN1(x) [+ PE term]); x = x + LeFF(LN2(x)). **LeFF**
  (``blocks.i.leff``): the patch tokens go back to the 2-D grid; 1x1 conv up (``conv1``, the paper's linear
  projection) + BN (``bn1``) + GELU; depthwise k x k conv (``conv2``) + BN (``bn2``) + GELU; 1x1 conv down
  (``conv3``) + BN (``bn3``), back to tokens. The class token bypasses the convolutions: as in the official code,
  LeFF returns its input row for it, so the class token's residual gains LN2(x)_cls. The paper's equation also
  puts a GELU after ``bn3``; the official code (and its checkpoints) do not: ``leff_out_act=True`` adds it.
- **LCA** (``lca``, layer-wise class-token attention): the per-layer readouts r_0..r_{L-1} (one per encoder block,
  taken after the block) plus a learnable layer embedding ``pos_layer_embed`` [1, L, D] form a sequence; one more
  pre-norm block (``lca.norm1``, ``lca.attn``, ``lca.norm2``, ``lca.feedforward.fc1/fc2``, no stochastic depth)
  in which only the last token is the query: z = r_{L-1} + MSA_last(LN(r)); z = z + MLP(LN(z)).
- the last LayerNorm ``norm`` on z, then the classifier ``head``.

CeiT-T: dim 192, depth 12, 3 heads; CeiT-S: dim 384, depth 12, 6 heads (MLP ratio 4, qkv bias, LayerNorm eps 1e-6).

**Position-embedding modes** (the knobs ``add_pos_to_input``, ``include_layer0``, ``hierarchical`` and ``last_pos``
as in :mod:`mpvg_kernels.layers.pe_walk`, walked by ``self.pe_walk``): the PE term enters each encoder block's
attention input through ``blocks.i.norm1`` (a :class:`~mpvg_kernels.layers.DualLayerNorm`); LeFF, the residual
stream and the LCA never see it. The LCA block takes no PE term: its tokens index layers, not image positions, and
they carry their own layer embedding. LaPE adds LN' to all 12 encoder blocks (+12 x 2D parameters), PVG to blocks
1..11 (+11 x 2D), MPVG also LN'_last (+2D).

**Pooling** (``pool``): what each layer contributes to the LCA. ``cls`` (the official CeiT): the block's class
token. ``avg``: the mean of the block's patch tokens (global average pooling per layer), which the LCA then
attends over. The MPVG paper replaces the class token by GAP, so ``avg`` is the default of ``pvg``/``mpvg``
(:func:`~mpvg_kernels.layers.default_pool`) and ``cls`` that of ``default``/``lape``. The class token stays in the
sequence with ``avg`` (``class_token=None`` -> True; attention still sees it, the readout leaves it out).
The parameter counts of MPVG Table 1 decide this: the paper truncates to three decimals (CeiT-Ti default,
6,356,904 here and in the official code, is printed 6.356, and DeiT-B MPVG, 86,584,552, 86.584). CeiT-Ti PVG is
printed 6.361: CeiT-Ti + 11 LN' (4,224) = 6,361,128 with the class token and its PE row kept, whereas without
them (``class_token=False``) it would be 6,360,744 (6.360). MPVG: 6,361,512 (6.361) with either pooling; LaPE:
6,361,512 (6.361). The counts cannot tell ``avg`` from ``cls`` (the readout has no parameters); ``avg`` follows
the paper's GAP. Dropping the LCA instead (plain GAP of the last block's tokens) would remove 447,168 parameters
(the LCA block and ``pos_layer_embed``), far from the paper's counts.
``pool="cls"`` needs the class token (``class_token=False`` with it is a ValueError).

**Where LN'_last enters (MPVG)**: MPVG's last step is y = LN(x_{L+1}) + LN'_last(pos) at the last LayerNorm before
the head. CeiT's last LayerNorm is ``norm`` on the LCA output z (one vector per image), so MPVG's step is
y = LN(z) + R(LN'_last(p)), with R the readout that turned a block's tokens into the LCA's tokens: the class row
(``cls``) or the mean over the patch rows (``avg``, the same pooled bias c = mean_n LN'_last(pos)_n as MPVG's GAP
formula mean_n(LN(x_n) + LN'_last(pos)_n) = mean_n LN(x_n) + c). p = ``pos`` (``last_pos=0``) or the PE term
of block k (``last_pos=k``). Adding LN'_last inside the LCA (its tokens are layers) or a new per-token norm before
the readout (a LayerNorm CeiT does not have) were the alternatives; both would change the architecture rather
than its last LayerNorm.

The image-independent PE terms (the chain, LN'_last(p) [1, T, D] and, for ``avg``, the pooled bias
``norm.bias + c``) come from :meth:`CeiT.compute_pe_terms` / the inference cache / ``forward(x, pe_terms=...)``.

**timm's feature contract** (as :class:`~mpvg_kernels.models.VisionTransformer`'s): the intermediates are the
encoder blocks' token streams, and ``norm=True`` normalises them per token with ``norm`` including LN'_last(p)
(LN(x_l) + LN'_last(p), as MPVG's ViT); the final features stay the LCA output after ``norm`` [B, D]. The LCA reads
every block, so stopping early (with final features) or pruning blocks while keeping the head is refused; pruning
with ``prune_head=True`` removes the LCA and ``pos_layer_embed`` with the classifier, after which
``forward_features`` gives the last kept block's tokens after ``norm`` [B, T, D] and ``forward_head`` pools them with
the readout R.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UnsupportedPoolError
from ..layers.blocks import Attention, DropPath, Mlp, PEBlock, to_2tuple
from ..layers.norms import LastLayerNormPE
from ..layers.pe_cache import no_autocast
from ..layers.pe_walk import AUTO, POOL_ALIASES, POOLS, PETerms, check_pe_mode, default_pool, resolve_pe_knobs
from .base import PEModel, check_pos_embed, check_sizes, format_intermediates
from .registry import imagenet_cfg, register_models
from .vision_transformer import feature_take_indices

__all__ = ["CeiT", "CeiTBlock", "I2TEmbed", "Image2Tokens", "LCABlock", "LocallyEnhancedFeedForward"]

_AUTO = AUTO


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# ----------------------------------------------------------------------------- modules


class Image2Tokens(nn.Module):
    """The I2T stem: conv k x k (stride ``stride``, padding k // 2, no bias) -> BatchNorm -> max-pool 3x3 stride 2."""

    def __init__(self, in_chans: int = 3, out_chans: int = 64, kernel_size: int = 7, stride: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the stem's output for an input of height x width pixels."""
        k, s, p = self.conv.kernel_size[0], self.conv.stride[0], self.conv.padding[0]
        h, w = _conv_out(height, k, s, p), _conv_out(width, k, s, p)
        return _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, out_chans, H', W']."""
        return self.maxpool(self.bn(self.conv(x)))


class I2TEmbed(nn.Module):
    """Images -> patch tokens: the :class:`Image2Tokens` stem (``backbone``), then a ``patch_size`` x ``patch_size``
    conv with the same stride (``proj``), flattened to [B, N, D]."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 192,
        stem_chans: int = 64,
        stem_kernel: int = 7,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        self.backbone = Image2Tokens(in_chans, stem_chans, stem_kernel, stem_stride)
        self.proj = nn.Conv2d(stem_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_size = to_2tuple(patch_size)
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.grid_for(*self.img_size)
        if self.grid_size[0] < 1 or self.grid_size[1] < 1:
            raise ValueError(
                f"img_size {self.img_size} gives no token: the I2T stem reduces it to "
                f"{self.backbone.out_size(*self.img_size)}, smaller than patch_size {patch_size}"
            )
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an input of height x width pixels."""
        h, w = self.backbone.out_size(height, width)
        return h // self.patch_size[0], w // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, h * w, D] (contiguous)."""
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2).contiguous()


class LocallyEnhancedFeedForward(nn.Module):
    """LeFF: patch tokens -> 2-D grid -> 1x1 conv up + BN + GELU -> depthwise conv + BN + GELU -> 1x1 conv down +
    BN (+ GELU with ``out_act``) -> tokens. The first ``num_prefix_tokens`` rows (the class token) are returned as
    given."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3, out_act: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, hidden, kernel_size=1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size, padding=(kernel_size - 1) // 2, groups=hidden)
        self.conv3 = nn.Conv2d(hidden, dim, kernel_size=1)
        self.act = nn.GELU()
        self.bn1 = nn.BatchNorm2d(hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.bn3 = nn.BatchNorm2d(dim)
        self.out_act = out_act

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
        """x [B, P + h*w, D] -> [B, P + h*w, D]."""
        B, T, D = x.shape
        h, w = grid
        if T - num_prefix_tokens != h * w:
            raise ValueError(f"LeFF got {T} tokens, expected {num_prefix_tokens} + {h}x{w} for the grid {grid}")
        prefix, t = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        t = t.transpose(1, 2).reshape(B, D, h, w)
        t = self.act(self.bn1(self.conv1(t)))
        t = self.act(self.bn2(self.conv2(t)))
        t = self.bn3(self.conv3(t))
        if self.out_act:
            t = self.act(t)
        t = t.flatten(2).transpose(1, 2)
        return torch.cat([prefix, t], dim=1) if num_prefix_tokens else t.contiguous()


class CeiTBlock(PEBlock):
    """Encoder block: x = x + MSA(LN1(x) [+ PE term]); x = x + LeFF(LN2(x)).

    ``use_pos``: ``norm1`` is a :class:`~mpvg_kernels.layers.DualLayerNorm` (LN1 + LN'), else a LayerNorm.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        use_pos: bool = False,
        kernel_size: int = 3,
        leff_out_act: bool = False,
    ) -> None:
        super().__init__()
        self._init_norm1(dim, eps, use_pos)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.leff = LocallyEnhancedFeedForward(dim, int(dim * mlp_ratio), kernel_size, leff_out_act)

    def forward_rest(
        self, x: torch.Tensor, attn_in: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int
    ) -> torch.Tensor:
        """The block after its first norm: attention on ``attn_in``, residual, then the LeFF half."""
        x = x + self.drop_path(self.attn(attn_in))
        return x + self.drop_path(self.leff(self.norm2(x), grid, num_prefix_tokens))

    def forward(
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        num_prefix_tokens: int,
        pos: torch.Tensor | None = None,
        pos_term: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D] -> (x_next, this block's PE term or None)."""
        a, term = self.attn_input(x, pos, pos_term)
        return self.forward_rest(x, a, grid, num_prefix_tokens), term


class LCAAttention(Attention):
    """Multi-head attention in which only the last token is the query (keys and values: every token)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, 1, D]."""
        B, L, C = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, -1:], w[:C], None if b is None else b[:C])
        kv = F.linear(x, w[C:], None if b is None else b[C:])
        q = q.reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv.reshape(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_drop.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, 1, C)))


class LCABlock(nn.Module):
    """Layer-wise class-token attention: z = r_last + MSA_last(LN1(r)); z = z + MLP(LN2(z)), r [B, L, D] ->
    z [B, 1, D]."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = LCAAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.feedforward = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, 1, D]."""
        z = x[:, -1:] + self.attn(self.norm1(x))
        return z + self.feedforward(self.norm2(z))


# ----------------------------------------------------------------------------- the model


class CeiT(PEModel):
    """CeiT with default, LaPE, PVG or MPVG position embeddings (the module docstring has the architecture, the
    pooling and where MPVG's LN'_last enters).

    Args: ``img_size``, ``patch_size`` (the I2T projection's kernel and stride), ``in_chans``, ``num_classes``,
    ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio`` (LeFF and LCA hidden ratio), ``qkv_bias``, ``pe``
    (mode), ``pool`` (``cls``/``avg``; None = the mode's default), ``class_token`` (None = True; False only with
    ``pool="avg"``), the knobs ``include_layer0``, ``hierarchical``, ``add_pos_to_input`` (None = the mode's
    default) and ``last_pos`` (``"auto"`` = the mode's default, None, or a block index k; negative from the end),
    ``stem_chans``/``stem_kernel``/``stem_stride`` (the I2T conv), ``leff_kernel_size``, ``leff_out_act``,
    ``drop_rate``, ``attn_drop_rate``, ``drop_path_rate``, ``norm_eps``, ``pos_init_std``, ``pos_embed``
    (``learn``, the CeiT and LaPE setting, or a fixed ``sincos1d``/``sincos2d`` table: a buffer, recomputed for
    another grid, normalised by LN' like a learned PE), ``dynamic_img_size`` (resample the PE for other input
    sizes), ``pe_cache`` (the inference PE cache).

    timm's feature contract: ``feature_info`` (one entry per encoder block, the I2T reduction),
    :meth:`forward_intermediates` (the blocks' token streams; its final features are :meth:`forward_features`' LCA
    output) and :meth:`prune_intermediate_layers` (``prune_head`` removes the LCA, which reads every block: the
    features are then per token), hence ``features_only=True`` through timm.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pe: str = "default",
        pool: str | None = None,
        class_token: bool | None = None,
        include_layer0: bool | None = None,
        hierarchical: bool | None = None,
        add_pos_to_input: bool | None = None,
        last_pos: int | str | None = _AUTO,
        stem_chans: int = 64,
        stem_kernel: int = 7,
        stem_stride: int = 2,
        leff_kernel_size: int = 3,
        leff_out_act: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        pos_init_std: float = 0.02,
        pos_embed: str = "learn",
        dynamic_img_size: bool = False,
        pe_cache: bool = True,
    ) -> None:
        super().__init__()
        check_pe_mode(pe)
        pool = default_pool(pe) if pool is None else pool
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        check_sizes(
            ("depth", depth, 1),
            ("num_classes", num_classes, 0),
            ("embed_dim", embed_dim, 1),
            ("num_heads", num_heads, 1),
            ("in_chans", in_chans, 1),
            ("patch_size", patch_size, 1),
            ("stem_chans", stem_chans, 1),
            ("stem_kernel", stem_kernel, 1),
            ("stem_stride", stem_stride, 1),
            ("leff_kernel_size", leff_kernel_size, 1),
            *(("img_size", v, 1) for v in to_2tuple(img_size)),
        )
        if leff_kernel_size % 2 == 0:
            raise ValueError(
                f"leff_kernel_size must be odd (the depthwise conv keeps the grid), got {leff_kernel_size}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        check_pos_embed(pos_embed, embed_dim)
        has_cls = True if class_token is None else bool(class_token)
        if pool == "cls" and not has_cls:
            raise ValueError(
                "pool='cls' feeds the class token of every layer to the LCA and needs it; class_token=False goes "
                "with pool='avg' (the LCA then attends over the per-layer averages of the patch tokens)"
            )
        self._set_pe_knobs(resolve_pe_knobs(
            pe, depth, include_layer0=include_layer0, hierarchical=hierarchical, add_pos_to_input=add_pos_to_input,
            last_pos=last_pos,
        ))
        self.pool = pool

        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.depth = depth
        self.norm_eps = norm_eps
        self.dynamic_img_size = dynamic_img_size
        self.pe_cache_enabled = pe_cache
        self.grad_checkpointing = False
        self.has_class_token = has_cls
        self.num_prefix_tokens = 1 if has_cls else 0
        self.pos_embed_type = pos_embed

        self.i2t = I2TEmbed(img_size, patch_size, in_chans, embed_dim, stem_chans, stem_kernel, stem_stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if has_cls else None
        self._init_pos_embed()
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [float(v) for v in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            CeiTBlock(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                eps=norm_eps,
                use_pos=self.block_uses_pos[i],
                kernel_size=leff_kernel_size,
                leff_out_act=leff_out_act,
            )
            for i in range(depth)
        )
        self.lca = LCABlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, norm_eps)
        self.pos_layer_embed = nn.Parameter(torch.zeros(1, depth, embed_dim))
        self.norm = LastLayerNormPE(embed_dim, eps=norm_eps, use_pos=self.last_pos is not None)
        self.head: nn.Module = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.pos_init_std = pos_init_std
        self.init_weights()
        self.feature_info = self._make_feature_info()
        self.default_cfg: dict[str, Any] = self._make_default_cfg()
        self.pretrained_cfg = self.default_cfg

    # ------------------------------------------------------------------ configuration helpers

    def _make_default_cfg(self) -> dict[str, Any]:
        return self._data_cfg("ceit", "i2t.backbone.conv", "head")

    def _make_feature_info(self) -> list[dict[str, Any]]:
        """timm's ``feature_info``: one entry per encoder block, reduction = image height / token-grid height of
        the I2T stem at the model's ``img_size``."""
        r = self.i2t.img_size[0] // self.i2t.grid_size[0]
        return [dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=r) for i in range(len(self.blocks))]

    @property
    def in_chans(self) -> int:
        """Input channels (of the I2T stem's first convolution)."""
        return self.i2t.backbone.conv.in_channels

    @property
    def patch_embed(self) -> I2TEmbed:
        """The tokenizer (``i2t``), under the name the tools read ``grid_size`` from."""
        return self.i2t

    @property
    def global_pool(self) -> str:
        """timm's name for the pooling: ``token`` (class token) or ``avg``."""
        return "token" if self.pool == "cls" else "avg"

    def init_weights(self) -> None:
        """The official init (:meth:`PEModel.init_weights <mpvg_kernels.models.base.PEModel.init_weights>`: convs
        and BatchNorms take PyTorch's defaults), ``pos_layer_embed`` zeros."""
        super().init_weights()
        if self.pos_layer_embed is not None:
            nn.init.zeros_(self.pos_layer_embed)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise LR decay): stem (class token, PE, I2T), one group per encoder block,
        then the LCA, the layer embedding, the last norm and the head."""
        return dict(
            stem=r"^cls_token|pos_embed|i2t",
            blocks=[(r"^blocks\.(\d+)", None), (r"^lca|^pos_layer_embed|^norm", (99999,))],
        )

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay besides every 1-D parameter (the official CeiT's set)."""
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in backward instead of storing its activations. (In training mode the
        recomputation updates the BatchNorm running statistics a second time.)"""
        self.grad_checkpointing = bool(enable)

    def get_classifier(self) -> nn.Module:
        """The classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: identity). ``global_pool`` (timm's name):
        None keeps the pooling; ``token`` or ``avg`` switch what each layer gives the LCA."""
        check_sizes(("num_classes", num_classes, 0))
        if global_pool is not None:
            if global_pool not in POOL_ALIASES:
                raise UnsupportedPoolError(f"global_pool must be None, 'token' or 'avg', got {global_pool!r}")
            pool = POOL_ALIASES[global_pool]
            if pool == "cls" and not self.has_class_token:
                raise UnsupportedPoolError("global_pool='token' needs a class token; this model has none")
            self.pool = pool
            self.default_cfg["pool"] = pool
            self.clear_pe_cache()
        self.num_classes = num_classes
        ref = self.i2t.proj.weight
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)
        self.default_cfg["num_classes"] = num_classes

    # ------------------------------------------------------------------ PE terms and cache

    def _pe_tensors(self) -> list[torch.Tensor]:
        """The tensors the image-independent PE terms are computed from."""
        ts: list[torch.Tensor] = [] if self.pos_embed is None else [self.pos_embed]
        for blk in self.blocks:
            if blk.use_pos:
                ts += [blk.norm1.pos_weight, blk.norm1.pos_bias]
        if self.has_last_pos:
            ts += [self.norm.bias, self.norm.pos_weight, self.norm.pos_bias]
        return ts

    def _default_grid(self) -> tuple[int, int]:
        return self.i2t.grid_size

    def _pe_modules(self) -> list[nn.Module]:
        """The PE path (the cache keys on all their attributes): the tokenizer (its grid), every block's norm1
        (LN'), the last norm."""
        return [self.i2t, *(blk.norm1 for blk in self.blocks), self.norm]

    def compute_pe_terms(self, grid: tuple[int, int] | None = None) -> PETerms | None:
        """The PE, every block's PE term, LN'_last(p) ([1, T, D], every row) and, for ``pool="avg"``, the pooled
        bias ``norm.bias + mean over the patch rows of LN'_last(p)`` for ``grid`` (default: the model's grid),
        computed now along :attr:`pe_walk` (differentiable; no cache). None for a model without PE."""
        if self.pos_embed is None:
            return None
        pos = self._pos_for_grid(self.i2t.grid_size if grid is None else tuple(grid))
        last = self.norm
        npt = self.num_prefix_tokens
        with no_autocast(pos.device.type):
            return self.pe_walk.terms(
                pos,
                lambda i, p: self.blocks[i].norm1.norm_pos(p),
                last_term=last.pos_term if self.has_last_pos else None,
                pooled_bias=(lambda p: last.pooled_bias(p[:, npt:]))
                if self.has_last_pos and self.pool == "avg"
                else None,
            )

    # ------------------------------------------------------------------ forward

    def _embed(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """Images -> the tokens entering block 0 (I2T tokens, class token, the PE added where the mode does)."""
        x = self.i2t(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.add_pos_to_input:
            x = x + pos
        return self.pos_drop(x)

    def _readout(self, x: torch.Tensor) -> torch.Tensor:
        """A block's contribution to the LCA: its class token (``cls``) or the mean of its patch tokens (``avg``),
        [B, D]. Also the readout of LN'_last(p) ([1, T, D] -> [1, D])."""
        if self.pool == "cls":
            return x[:, 0]
        return x[:, self.num_prefix_tokens :].mean(dim=1)

    def _run_block(
        self, blk: CeiTBlock, x: torch.Tensor, grid: tuple[int, int], pos: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        npt = self.num_prefix_tokens
        if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(blk, x, grid, npt, pos, use_reentrant=False)
        return blk(x, grid, npt, pos)

    def _forward_body(
        self,
        x: torch.Tensor,
        pe_terms: PETerms | None = None,
        take: Collection[int] = (),
        stop_after: int | None = None,
        read: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor], PETerms | None, torch.Tensor | None, list[torch.Tensor]]:
        """Images -> (the tokens after the last block run [B, T, D], the per-layer readouts [B, D] each when
        ``read`` (else empty), the precomputed PE terms used or None, the LN'_last source when computed live, the
        tokens after each block in ``take``). ``stop_after``: run blocks 0..stop_after only. The terms come from
        ``pe_terms``, else the cache where it may be used, else the fused per-block ops compute them along the walk
        (with gradients)."""
        grid = self._grid(x)
        pe_terms = self._given_terms(pe_terms)
        if pe_terms is not None and len(pe_terms.terms) != len(self.blocks):
            raise ValueError(
                f"pe_terms holds terms for {len(pe_terms.terms)} blocks, this model has {len(self.blocks)} (compute "
                "them with this model's compute_pe_terms, e.g. again after prune_intermediate_layers)"
            )
        if pe_terms is None and self.pos_embed is not None:
            pe_terms = self.pe_terms(grid)
        pos = None
        if self.pos_embed is not None:
            pos = pe_terms.pos if pe_terms is not None else self._pos_for_grid(grid)
        x = self._embed(x, pos)
        npt = self.num_prefix_tokens
        last = len(self.blocks) - 1 if stop_after is None else stop_after
        reads: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []
        step = None if pe_terms is not None else self.pe_walk.start(pos)
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            if step is None:
                x, _ = blk(x, grid, npt, pos_term=pe_terms.terms[i])
            else:
                x, term = self._run_block(blk, x, grid, step.source(i))
                step.record(i, term)
            if read:
                reads.append(self._readout(x))
            if i in take:
                kept.append(x)
        return x, reads, pe_terms, None if step is None else step.last_source, kept

    def _lca(self, reads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-layer readouts -> the LCA output z [B, 1, D]."""
        return self.lca(torch.stack(list(reads), dim=1) + self.pos_layer_embed)

    def _last_step(self, z: torch.Tensor, terms: PETerms | None, last_src: torch.Tensor | None) -> torch.Tensor:
        """z [B, 1, D] -> LN(z) (+ the readout of LN'_last(p) for MPVG), [B, D]."""
        if not self.has_last_pos:
            return self.norm(z).squeeze(1)
        if terms is not None and terms.pooled_bias is not None:  # avg: norm.bias + c, one fused LN over z
            return self.norm(z, pool=True, pooled_bias=terms.pooled_bias)
        term = terms.last_term if terms is not None else self.norm.pos_term(last_src)
        assert term is not None
        return self.norm(z, pos_term=self._readout(term).unsqueeze(1)).squeeze(1)

    def forward_features(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Images -> the head's input [B, D]: the last norm of the LCA output (+ MPVG's LN'_last readout).
        Once :meth:`prune_intermediate_layers` removed the LCA (``prune_head=True``): the per-token features
        [B, T, D] of the last kept block after the last norm, LN(x) (+ LN'_last(p) per token), or the tokens
        themselves when the norm was pruned too. ``pe_terms``: precomputed terms (:meth:`compute_pe_terms`, e.g.
        frozen for export); default: the cache, or computed live."""
        if self.lca is None:
            x, _, terms, last_src, _ = self._forward_body(x, pe_terms)
            return self._norm_tokens(x, self._last_term(terms, last_src))
        _, reads, terms, last_src, _ = self._forward_body(x, pe_terms, read=True)
        return self._last_step(self._lca(reads), terms, last_src)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features from :meth:`forward_features` -> logits (or the features with ``pre_logits``); the per-token
        features of a model without the LCA are pooled first with the readout (class token or patch mean)."""
        if self.lca is None:
            x = self._readout(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> logits [B, num_classes] (``pe_terms``: see :meth:`forward_features`)."""
        return self.forward_head(self.forward_features(x, pe_terms))

    # ------------------------------------------------------------------ timm's feature contract

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates``: the token stream after the encoder blocks named by ``indices`` (None:
        all; int n: the last n; a sequence: those, negative from the end), the class token split off, as ``NCHW``
        [B, D, h, w] or ``NLC`` [B, h*w, D] (:func:`~mpvg_kernels.models.base.format_intermediates`).

        ``norm=True`` normalises each with the last norm per token *including* MPVG's LN'_last(p): LN(x_l) +
        LN'_last(p). The final features (unless ``intermediates_only``) are :meth:`forward_features`' output: the
        LCA output after the last norm [B, D]. The LCA reads every block, so ``stop_early`` before the last block
        is a ValueError unless ``intermediates_only`` (or the LCA was pruned)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        with_lca = self.lca is not None and not intermediates_only
        if with_lca and stop_early and max_index < len(self.blocks) - 1:
            raise ValueError(
                f"stop_early=True would stop after block {max_index}, but the final features come from the LCA "
                f"head and the LCA reads every block (0..{len(self.blocks) - 1}); pass intermediates_only=True or "
                "stop_early=False"
            )
        grid = self._grid(x)
        feats, reads, terms, last_src, kept = self._forward_body(
            x, take=set(take), stop_after=max_index if stop_early else None, read=with_lca
        )
        term = None
        if norm or (not intermediates_only and not with_lca):
            term = self._last_term(terms, last_src, grid)
        if norm:
            kept = [self._norm_tokens(y, term) for y in kept]
        final = None
        if with_lca:
            final = self._last_step(self._lca(reads), terms, last_src)
        elif not intermediates_only:
            final = self._norm_tokens(feats, term)
        return format_intermediates(
            kept, final, grid, self.num_prefix_tokens, output_fmt, return_prefix_tokens, output_dict
        )

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's pruning for feature extraction: keep the encoder blocks up to the last index taken; drop the last
        norm (``prune_norm``) and the head (``prune_head``): the LCA block with ``pos_layer_embed`` (they read
        every block) and the classifier. Without the LCA, :meth:`forward_features` gives per-token features and
        :meth:`forward_head` pools them with the readout. ``prune_head=False`` keeps the LCA, so every block:
        ValueError for an index before the last. Returns the absolute indices kept."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        if not prune_head and self.lca is not None and max_index < len(self.blocks) - 1:
            raise ValueError(
                f"prune_head=False keeps the LCA head and the LCA reads every block (0..{len(self.blocks) - 1}); "
                f"pruning after block {max_index} needs prune_head=True"
            )
        knobs = self.pe_knobs.pruned(max_index + 1, last_norm=not prune_norm)
        self.blocks = self.blocks[: max_index + 1]
        self.depth = len(self.blocks)
        self._set_pe_knobs(knobs)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.lca = None
            self.pos_layer_embed = None
            self.reset_classifier(0)
        self.feature_info = self._make_feature_info()
        self.clear_pe_cache()
        return take

    # ------------------------------------------------------------------ analysis

    def forward_analysis(self, x: torch.Tensor) -> dict[str, Any]:
        """Every intermediate the analysis needs, computed with unfused plain-PyTorch steps (no cache). Keys:

        - ``block_inputs``: x_l entering encoder block l, [B, T, D] each (L entries);
        - ``token_terms``: LN1_l(x_l); ``pos_terms``: the PE term added at block l ([1, T, D]) or None;
        - ``attn_inputs``: token_term + pos_term (what attention sees);
        - ``readouts``: what block l gives the LCA, [B, D]; ``lca_input``: their stack + ``pos_layer_embed``;
        - ``last_norm_input``: the LCA output z [B, 1, D]; ``last_norm_output``: LN(z) without PE;
        - ``last_pos_term``: LN'_last(p) per token ([1, T, D]) or None; ``last_pos_readout``: its readout (class
          row or mean of the patch rows, [1, 1, D]) that the model adds to LN(z), or None;
        - ``features``: LN(z) (+ the readout) [B, 1, D]; ``pooled``: [B, D]; ``logits``: [B, num_classes];
        - ``grid``: the token grid (h, w); ``num_prefix_tokens``: 1 with a class token, else 0.

        RuntimeError for a model whose LCA or last norm :meth:`prune_intermediate_layers` removed.
        """
        if self.lca is None:
            raise RuntimeError("forward_analysis needs the LCA head, which prune_intermediate_layers removed")
        norm = self._last_norm()
        out, x, step = self._analysis_begin(x, readouts=[])
        grid, npt = out["grid"], self.num_prefix_tokens
        for i, blk in enumerate(self.blocks):
            x = blk.forward_rest(x, self._analyse_block(out, step, i, blk, x), grid, npt)
            out["readouts"].append(self._readout(x))
        out["lca_input"] = torch.stack(out["readouts"], dim=1) + self.pos_layer_embed
        last_term = readout = None
        if self.has_last_pos:
            last_term = norm.pos_term(step.last_source)
            readout = self._readout(last_term).unsqueeze(1)
        out["last_pos_readout"] = readout
        feats = self._analyse_last_norm(out, self.lca(out["lca_input"]), norm, last_term, added=readout)
        out.update(pooled=feats[:, 0], logits=self.head(feats[:, 0]))
        return out

    def extra_repr(self) -> str:
        return (
            f"pe={self.pe!r}, pos_embed={self.pos_embed_type!r}, pool={self.pool!r}, "
            f"class_token={self.has_class_token}, "
            f"add_pos_to_input={self.add_pos_to_input}, include_layer0={self.include_layer0}, "
            f"hierarchical={self.hierarchical}, last_pos={self.last_pos}"
        )


# ----------------------------------------------------------------------------- registered configurations
# I2T tokenizer (conv 7x7/2 + BN + max-pool 3x3/2, then a 4x4/4 conv: 224 -> 14x14 tokens), LeFF instead of the
# MLP, layer-wise class-token attention (LCA); official parameter names.
register_models(CeiT, {
    "ceit_tiny_patch16_224": {
        "model": dict(img_size=224, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=1000),
        "cfg": imagenet_cfg(),
        "source": "CeiT-T (Yuan et al. 2021); MPVG Table 1, LaPE Table 1",
        "tiny": dict(img_size=32, patch_size=2, stem_chans=16, embed_dim=32, depth=2, num_heads=2),
    },
    "ceit_small_patch16_224": {
        "model": dict(img_size=224, patch_size=4, embed_dim=384, depth=12, num_heads=6, num_classes=1000),
        "cfg": imagenet_cfg(),
        "source": "CeiT-S (Yuan et al. 2021); LaPE Table 1",
        "tiny": dict(img_size=32, patch_size=2, stem_chans=16, embed_dim=32, depth=2, num_heads=2),
    },
})
