"""Swin Transformer building blocks with timm's parameter names: window partitioning, the shifted-window mask,
window attention with a relative position bias (optionally joined through a LayerNorm, LaPE's way for relative
PE) and patch merging.

Tokens are ``[B, H * W, C]`` in row-major order (the layout the fused norms take); the helpers reshape to windows
and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchMerging",
    "RelPosBiasNorm",
    "WindowAttention",
    "relative_position_index",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, H, W, C] -> [B * num_windows, wh * ww, C] (windows in row-major order, tokens row-major inside)."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """The inverse of :func:`window_partition`: [B * num_windows, wh * ww, C] -> [B, H, W, C]."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """[N, N] (N = wh * ww): the row of the ``(2wh - 1)(2ww - 1)`` bias table for each (query, key) pair."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]: (dy, dx) of query - key
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def shifted_window_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """[num_windows, N, N] additive mask (0 or -100) of shifted-window attention on a ``grid`` rolled by -shift:
    tokens of a window that came from different regions of the unrolled map do not attend to each other."""
    H, W = grid
    region = torch.zeros(1, H, W, 1)
    cnt = 0
    for hs in (slice(0, H - window[0]), slice(H - window[0], H - shift[0]), slice(H - shift[0], H)):
        for ws in (slice(0, W - window[1]), slice(W - window[1], W - shift[1]), slice(W - shift[1], W)):
            region[:, hs, ws, :] = cnt
            cnt += 1
    ids = window_partition(region, window).squeeze(-1)  # [nW, N]
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class RelPosBiasNorm(nn.Module):
    """LaPE's join of a relative PE: a LayerNorm of the relative position bias [nH, N, N] over its last (key)
    dimension, with affine parameters ``pos_weight``/``pos_bias`` of shape [N] (the official LaPE code's
    ``RPE_Attention(join_type='LN')`` applies ``nn.LayerNorm(num_patches)`` to the bias the same way)."""

    def __init__(self, num_keys: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.normalized_shape = (num_keys,)
        self.eps = eps
        self.pos_weight = nn.Parameter(torch.ones(num_keys))
        self.pos_bias = nn.Parameter(torch.zeros(num_keys))

    def reset_parameters(self) -> None:
        """pos_weight = 1, pos_bias = 0."""
        with torch.no_grad():
            self.pos_weight.fill_(1.0)
            self.pos_bias.zero_()

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        """[..., N] -> LayerNorm over the last dim."""
        return F.layer_norm(bias, self.normalized_shape, self.pos_weight, self.pos_bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}"


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows of ``window`` tokens with Swin's learned relative position bias
    (``relative_position_bias_table`` [(2wh - 1)(2ww - 1), nH]), added to the scaled query-key product together
    with the shifted-window mask. ``rpe_norm=True``: the bias is added as LN(bias) (:class:`RelPosBiasNorm`,
    ``rpe_norm.pos_weight/pos_bias``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rpe_norm: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.window = window
        self.window_area = window[0] * window[1]
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.rpe_norm = RelPosBiasNorm(self.window_area) if rpe_norm else None
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Recompute ``relative_position_index`` (not in the state dict) where it lives: timm's protocol
        (``reinit_non_persistent_buffers``, after ``to_empty``); the model's ``init_weights`` calls it too."""
        self.relative_position_index.copy_(relative_position_index(self.window))

    def relative_position_bias(self) -> torch.Tensor:
        """The bias added to the attention logits, [nH, N, N] (after LN(.) with ``rpe_norm``)."""
        n = self.window_area
        table = self.relative_position_bias_table
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        return bias if self.rpe_norm is None else self.rpe_norm(bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B * nW, N, C], mask [nW, N, N] or None -> [B * nW, N, C]."""
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias().to(q.dtype).unsqueeze(0)  # [1, nH, N, N]
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.to(q.dtype)[None, :, None]).expand(Bw // nw, -1, -1, -1, -1)
            bias = bias.reshape(Bw, self.num_heads, N, N)
        p = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.scale)
        x = x.transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(self.proj(x))


class PatchMerging(nn.Module):
    """Swin's downsampling: each 2x2 patch neighbourhood concatenated (timm's order), LayerNorm(4C), then a linear
    map to ``out_dim`` (2C) without bias: [B, H * W, C] -> [B, (H / 2) * (W / 2), out_dim]."""

    def __init__(self, dim: int, out_dim: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x [B, H * W, C] on ``grid`` (H, W), both even."""
        B, _, C = x.shape
        H, W = grid
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, (H // 2) * (W // 2), 4 * C)
        return self.reduction(self.norm(x))
