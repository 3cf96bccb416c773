"""Transformer building blocks with timm parameter names: patch embedding, attention, MLP, stochastic depth and a
block whose attention input may carry a position-embedding term (``LN1(x) + pos_term``); plus PE-aware norms that
timm's own ``Block`` can call with one argument (:class:`StreamDualLayerNorm`, :class:`StreamLastNorm`, bound by
``mpvg_kernels.models.timm_bridge.attach_pe``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .norms import DualLayerNorm, LastLayerNormPE
from .pe_walk import PEWalk
from .pos_embed import infer_grid_size, resample_abs_pos_embed

__all__ = [
    "BLOCK_STYLES",
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "PEBlock",
    "PEStream",
    "PatchEmbed",
    "StreamDualLayerNorm",
    "StreamLastNorm",
    "to_2tuple",
]

BLOCK_STYLES = ("prenorm", "cct")


def to_2tuple(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``drop_prob`` (training)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity in eval or when drop_prob is 0; otherwise x * mask / keep_prob with a per-sample mask."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class PatchEmbed(nn.Module):
    """Image to patch tokens: a ``patch_size`` x ``patch_size`` conv with the same stride, flattened to [B, N, D]
    (the ``patch`` tokenizer of :mod:`mpvg_kernels.layers.tokenizers`)."""

    first_conv = "proj"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.set_img_size(img_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an input of height x width pixels."""
        return height // self.patch_size[0], width // self.patch_size[1]

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Set the input size (``img_size``, ``grid_size``, ``num_patches``)."""
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.grid_for(*self.img_size)
        if self.grid_size[0] < 1 or self.grid_size[1] < 1:
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H // p) * (W // p), D] (contiguous, as the fused norms need stride 1 in D)."""
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: ``qkv`` then ``proj``), computed by scaled_dot_product_attention."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        p = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm names)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D]."""
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PEBlock(nn.Module):
    """Base of every block whose attention input may carry a PE term (ViT, Swin and CeiT blocks): holds ``use_pos``
    and ``norm1`` (a :class:`~mpvg_kernels.layers.DualLayerNorm` when ``use_pos``, else a LayerNorm) and computes
    the attention input from them."""

    use_pos: bool
    norm1: nn.Module

    def _init_norm1(self, dim: int, eps: float, use_pos: bool) -> None:
        self.use_pos = use_pos
        self.norm1 = DualLayerNorm(dim, eps=eps) if use_pos else nn.LayerNorm(dim, eps=eps)

    def attn_input(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, pos_term: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(attention input, this block's PE term or None): LN1(x) + LN'(pos) through the fused op, LN1(x) +
        ``pos_term`` for a precomputed term (the model's PE cache or given terms), or LN1(x) for a block without
        PE."""
        if not self.use_pos:
            return self.norm1(x), None
        if pos_term is not None:
            return self.norm1._forward_cached_term(x, pos_term), pos_term
        if pos is None:
            raise ValueError("this block adds a position embedding to its attention input: pass pos")
        return self.norm1(x, pos)


class Block(PEBlock):
    """A transformer block whose attention input may carry a PE term: ``LN1(x) + pos_term``.

    ``use_pos``: ``norm1`` is a :class:`~mpvg_kernels.layers.DualLayerNorm` (LN1 + LN'), else a plain LayerNorm.
    ``block_style``: ``prenorm`` (timm/DeiT) or ``cct`` (Compact-Transformers: LN2 normalises the stream).
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
        block_style: str = "prenorm",
    ) -> None:
        super().__init__()
        if block_style not in BLOCK_STYLES:
            raise ValueError(f"block_style must be one of {BLOCK_STYLES}, got {block_style!r}")
        self.block_style = block_style
        self._init_norm1(dim, eps, use_pos)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward_rest(self, x: torch.Tensor, attn_in: torch.Tensor) -> torch.Tensor:
        """The block after its first norm: attention on ``attn_in``, residual, then the MLP half."""
        x = x + self.drop_path1(self.attn(attn_in))
        if self.block_style == "cct":
            x = self.norm2(x)
            return x + self.drop_path2(self.mlp(x))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, pos_term: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D], pos [1, T, D] -> (x_next, this block's PE term or None)."""
        a, term = self.attn_input(x, pos, pos_term)
        return self.forward_rest(x, a), term


# ----------------------------------------------------------------------------- norms for timm's own Block


class PEStream:
    """Where the PE-aware norms below find the position embedding when a block calls them with ``x`` alone, as
    timm's ``Block.forward`` calls ``norm1(x)`` and its ``VisionTransformer`` calls ``norm(x)``.

    ``owner``: the module holding ``pos_embed`` ([1, T, D]), ``num_prefix_tokens`` and ``patch_embed.grid_size``
    (a timm ViT); the PE is read from it at every call, so ``.to()``, loading and optimizer steps are seen. For
    another token count the PE is resampled (bicubic) to the grid. ``norms``: the blocks' PE norms in block order.
    The chain is recomputed from ``pos`` by each block (a few LayerNorms of [T, D]), so a block's result depends
    on the parameters only, never on state left by another call: gradient checkpointing recomputes it exactly.
    """

    def __init__(self, owner: nn.Module, hierarchical: bool = True) -> None:
        self.owner = owner
        self.hierarchical = hierarchical
        self.norms: list[StreamDualLayerNorm] = []

    def pos(self, num_tokens: int) -> torch.Tensor:
        """The PE for ``num_tokens`` tokens (prefix rows included)."""
        pos = self.owner.pos_embed
        if pos.shape[-2] == num_tokens:
            return pos
        npt = int(getattr(self.owner, "num_prefix_tokens", 0))
        old = tuple(self.owner.patch_embed.grid_size)
        return resample_abs_pos_embed(pos, infer_grid_size(num_tokens - npt), old, npt)

    def source(self, norm: StreamDualLayerNorm, num_tokens: int) -> torch.Tensor:
        """The PE that ``norm`` normalises: ``pos`` (non-hierarchical, or the first PE block) or the previous PE
        block's term LN'_{l-1}(...LN'_first(pos))."""
        p = self.pos(num_tokens)
        if not self.hierarchical:
            return p
        step = PEWalk([True] * len(self.norms), hierarchical=True, last_pos=None).start(p)
        for i, n in enumerate(self.norms):
            src = step.source(i)
            if n is norm:
                return src
            step.record(i, n.norm_pos(src))
        raise RuntimeError("this norm is not part of its PEStream")


class StreamDualLayerNorm(DualLayerNorm):
    """A :class:`DualLayerNorm` that timm's ``Block`` can call as ``norm1(x)``: it returns LN1(x) + LN'(p) (the fused
    ``dual_layer_norm``), p from its :class:`PEStream`. ``norm(x, pos)`` keeps DualLayerNorm's two outputs."""

    stream: PEStream | None = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> Any:  # type: ignore[override]
        if pos is not None:
            return super().forward(x, pos)
        if self.stream is None:
            raise RuntimeError("this StreamDualLayerNorm is not bound to a model's PE (attach_pe)")
        y, _ = super().forward(x, self.stream.source(self, x.shape[-2]))
        return y


class StreamLastNorm(LastLayerNormPE):
    """MPVG's last norm for a timm model: ``norm(x)`` gives LN(x) + LN'_last(pos) per token (``pos`` from its
    :class:`PEStream`), so timm's pooling, ``forward_features`` and ``forward_intermediates(norm=True)`` see the
    MPVG features."""

    stream: PEStream | None = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None, pool: bool = False, **kw: Any) -> torch.Tensor:
        if pos is None and not kw and self.use_pos:
            if self.stream is None:
                raise RuntimeError("this StreamLastNorm is not bound to a model's PE (attach_pe)")
            pos = self.stream.pos(x.shape[-2])
        return super().forward(x, pos, pool, **kw)
