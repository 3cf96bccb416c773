"""The Tokens-to-Token (T2T) tokenizer of T2T-ViT (Yuan et al. 2021): images -> [B, N, D] tokens.

Three soft splits (``nn.Unfold``: 7x7 stride 4 padding 2, then 3x3/2/1 twice by default) with a one-head token
layer after each of the first two (``attention1``: ``in_chans * 7 * 7 -> token_dim``, ``attention2``:
``token_dim * 3 * 3 -> token_dim``) that re-structures the tokens into an image for the next split, and a linear
``project`` of the last split to ``embed_dim``. The total stride is 4 * 2 * 2 = 16: a 224 x 224 image gives a
14 x 14 token grid. The module carries no position embedding.

The token layer is one of

- ``performer`` (:class:`TokenPerformer`, the official T2T-ViT-7/10/12/14/19/24): linear attention with positive
  orthogonal random features ``w`` [m, token_dim], m = ``token_dim * kernel_ratio``; ``w`` is fixed (a buffer,
  drawn from ``feature_seed``, loaded from a checkpoint like any buffer);
- ``transformer`` (:class:`TokenTransformer`, the official T2T-ViT_t-14/19/24): softmax attention.

Both use the value projection as the residual of the attention half (the width changes there) and a 1x MLP.
Parameter names follow the official code (``tokens_to_token.soft_split0..2``, ``attention1/2``, ``project``;
performer: ``kqv``, ``proj``, ``norm1``, ``norm2``, ``mlp.0``, ``mlp.2``, ``w``; transformer: ``norm1``,
``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), so an official state dict loads as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Mlp, to_2tuple
from .pe_cache import no_autocast

__all__ = ["T2T_TOKEN_TYPES", "T2TTokenizer", "TokenPerformer", "TokenTransformer", "orthogonal_random_features"]

#: The token layers of the T2T module.
T2T_TOKEN_TYPES: tuple[str, ...] = ("performer", "transformer")


def orthogonal_random_features(num_features: int, dim: int, seed: int) -> torch.Tensor:
    """``num_features`` x ``dim`` Performer features: (block-)orthogonal rows scaled by sqrt(num_features), as the
    official T2T code draws them, but from a fixed ``seed`` instead of the global RNG (float32, on the CPU)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    w = torch.empty(num_features, dim, device="cpu", dtype=torch.float32)
    nn.init.orthogonal_(w, generator=g)
    return w * math.sqrt(num_features)


def _on_default_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` moved to the device factories use now (e.g. ``meta`` inside ``with torch.device("meta")``)."""
    return t.to(torch.empty(0).device)


class TokenPerformer(nn.Module):
    """T2T's Performer layer from width ``dim`` to ``out_dim`` (one head):

    k, q, v = kqv(LN1(x)); y = v + drop(proj(A(q, k, v))); out = y + MLP(LN2(y)), with the linear attention
    A(q, k, v)_t = phi(q_t) (sum_s phi(k_s) v_s^T) / (phi(q_t) . sum_s phi(k_s) + 1e-8) and the positive random
    features phi(x) = exp(w x - |x|^2 / 2) / sqrt(m). ``w`` is a fixed buffer [m, out_dim], m = int(out_dim *
    kernel_ratio). The kernel part runs in float32 at least (for half inputs, as the official code does).
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        kernel_ratio: float = 0.5,
        drop: float = 0.1,
        eps: float = 1e-5,
        feature_seed: int = 0,
    ) -> None:
        super().__init__()
        m = int(out_dim * kernel_ratio)
        if m < 1:
            raise ValueError(f"kernel_ratio {kernel_ratio} leaves no random feature for width {out_dim}")
        self.emb = out_dim
        self.num_features = m
        self.epsilon = 1e-8
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(out_dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(drop))
        self.feature_seed = feature_seed
        self.register_buffer("w", _on_default_device(orthogonal_random_features(m, out_dim, feature_seed)))

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Draw the random features ``w`` again from ``feature_seed`` (on ``w``'s device; the model's
        ``init_weights`` calls it, e.g. after ``to_empty``)."""
        self.w.copy_(orthogonal_random_features(self.w.shape[0], self.w.shape[1], self.feature_seed))

    def _features(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """phi(x) [B, T, m] for x [B, T, emb]."""
        sq = (x * x).sum(dim=-1, keepdim=True) / 2
        return torch.exp(x @ w.t() - sq) / math.sqrt(self.num_features)

    def attention(self, a: torch.Tensor) -> torch.Tensor:
        """The attention half on the normalised input ``a`` [B, T, dim]: v + drop(proj(A(q, k, v))) [B, T, emb]."""
        k, q, v = torch.split(self.kqv(a), self.emb, dim=-1)
        dtype = v.dtype
        acc = torch.promote_types(dtype, torch.float32)
        with no_autocast(v.device.type):
            kf, qf, vf = k.to(acc), q.to(acc), v.to(acc)
            w = self.w.to(acc)
            kp, qp = self._features(kf, w), self._features(qf, w)
            kv = kp.transpose(1, 2) @ vf  # [B, m, emb]
            den = qp @ kp.sum(dim=1).unsqueeze(-1)  # [B, T, 1]
            y = (qp @ kv) / (den + self.epsilon)
        return v + self.dp(self.proj(y.to(dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] -> [B, T, emb]."""
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenAttention(nn.Module):
    """T2T's one-head softmax attention from width ``dim`` to ``out_dim`` with the value as residual:
    v + proj(softmax(q k^T * dim^-0.5) v). The scale uses the *input* width ``dim``, as the official code does."""

    def __init__(self, dim: int, out_dim: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.scale = dim**-0.5
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias)
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] -> [B, T, out_dim]."""
        q, k, v = self.qkv(a).unsqueeze(1).split(self.out_dim, dim=-1)  # [B, 1, T, out_dim] each
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return (v + self.proj(y)).squeeze(1)


class TokenTransformer(nn.Module):
    """T2T's transformer layer from width ``dim`` to ``out_dim`` (one head, MLP ratio ``mlp_ratio``):
    y = TokenAttention(LN1(x)); out = y + MLP(LN2(y))."""

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TokenAttention(dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim, eps=eps)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] -> [B, T, out_dim]."""
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _split_size(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


class T2TTokenizer(nn.Module):
    """The T2T module: images [B, C, H, W] -> tokens [B, N, embed_dim] (see the module docstring).

    ``patch_size``: the total stride, which must equal the product of ``strides`` (16 by default). ``token_type``:
    ``performer`` or ``transformer``; ``token_dim``: the width of the token layers; ``kernel_sizes``, ``strides``,
    ``paddings``: the three soft splits; ``kernel_ratio``, ``token_drop`` (dropout of the performer, 0.1 in the
    official code) and ``feature_seed`` (random features; ``attention2`` uses seed + 1) apply to the performer;
    ``norm_eps``: the token layers' LayerNorms.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] | None = None,
        in_chans: int = 3,
        embed_dim: int = 768,
        token_type: str = "performer",
        token_dim: int = 64,
        kernel_sizes: Sequence[int] = (7, 3, 3),
        strides: Sequence[int] = (4, 2, 2),
        paddings: Sequence[int] = (2, 1, 1),
        kernel_ratio: float = 0.5,
        token_drop: float = 0.1,
        feature_seed: int = 0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if token_type not in T2T_TOKEN_TYPES:
            raise ValueError(f"token_type must be one of {T2T_TOKEN_TYPES}, got {token_type!r}")
        kernel_sizes, strides, paddings = (tuple(int(v) for v in s) for s in (kernel_sizes, strides, paddings))
        for name, seq, minimum in (
            ("kernel_sizes", kernel_sizes, 1),
            ("strides", strides, 1),
            ("paddings", paddings, 0),
        ):
            if len(seq) != 3 or any(v < minimum for v in seq):
                raise ValueError(f"{name} must be three integers >= {minimum}, got {seq!r}")
        for name, value in (("token_dim", token_dim), ("embed_dim", embed_dim), ("in_chans", in_chans)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        stride = math.prod(strides)
        if patch_size is not None and to_2tuple(patch_size) != (stride, stride):
            raise ValueError(
                f"patch_size {patch_size!r} is the T2T module's total stride, which strides={strides} make "
                f"{stride}; pass patch_size={stride} or other strides"
            )
        self.token_type = token_type
        self.token_dim = token_dim
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.kernel_sizes, self.strides, self.paddings = kernel_sizes, strides, paddings
        self.patch_size = (stride, stride)
        self.set_img_size(img_size)

        k0, k1, k2 = kernel_sizes
        self.soft_split0 = nn.Unfold(kernel_size=k0, stride=strides[0], padding=paddings[0])
        self.soft_split1 = nn.Unfold(kernel_size=k1, stride=strides[1], padding=paddings[1])
        self.soft_split2 = nn.Unfold(kernel_size=k2, stride=strides[2], padding=paddings[2])
        dims = (in_chans * k0 * k0, token_dim * k1 * k1)
        if token_type == "performer":
            self.attention1: nn.Module = TokenPerformer(
                dims[0], token_dim, kernel_ratio, token_drop, norm_eps, feature_seed
            )
            self.attention2: nn.Module = TokenPerformer(
                dims[1], token_dim, kernel_ratio, token_drop, norm_eps, feature_seed + 1
            )
        else:
            self.attention1 = TokenTransformer(dims[0], token_dim, eps=norm_eps)
            self.attention2 = TokenTransformer(dims[1], token_dim, eps=norm_eps)
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)
        #: The first layer that sees the input channels (``default_cfg["first_conv"]``).
        self.first_conv = "attention1.kqv" if token_type == "performer" else "attention1.attn.qkv"

    def _grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """The token grid after each soft split, for an input of height x width pixels."""
        grids = []
        h, w = int(height), int(width)
        for k, s, p in zip(self.kernel_sizes, self.strides, self.paddings, strict=True):
            h, w = _split_size(h, k, s, p), _split_size(w, k, s, p)
            if h < 1 or w < 1:
                raise ValueError(
                    f"an input of {height} x {width} pixels is too small for the T2T soft splits "
                    f"(kernels {self.kernel_sizes}, strides {self.strides}, paddings {self.paddings})"
                )
            grids.append((h, w))
        return grids

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an input of height x width pixels (14 x 14 for 224 x 224)."""
        return self._grids(height, width)[-1]

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Set the input size (``img_size``, ``grid_size``, ``num_patches``)."""
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.grid_for(*self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, h * w, embed_dim] (contiguous)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}")
        (h0, w0), (h1, w1), _ = self._grids(x.shape[-2], x.shape[-1])
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(-1, self.token_dim, h0, w0)
        x = self.attention2(self.soft_split1(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(-1, self.token_dim, h1, w1)
        return self.project(self.soft_split2(x).transpose(1, 2)).contiguous()

    def extra_repr(self) -> str:
        return (
            f"token_type={self.token_type!r}, token_dim={self.token_dim}, img_size={self.img_size}, "
            f"grid_size={self.grid_size}"
        )
