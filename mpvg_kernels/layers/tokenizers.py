"""Image tokenizers of :class:`~mpvg_kernels.models.VisionTransformer`, by name (``TOKENIZERS``).

A tokenizer is built as ``TOKENIZERS[name](img_size, patch_size, in_chans, embed_dim, **tokenizer_args)`` and
provides ``img_size`` (h, w), ``patch_size`` (its total stride, (sh, sw)), ``grid_size`` (the token grid of
``img_size``), ``num_patches``, ``in_chans``, ``first_conv`` (the name of its first conv inside it, for
``default_cfg["first_conv"]``), ``grid_for(H, W)`` (the grid of another input size), ``set_img_size(img_size)``
and ``forward(x) -> [B, N, D]`` (contiguous: the fused norms need stride 1 in D).

- ``patch``: :class:`~mpvg_kernels.layers.PatchEmbed` (ViT/DeiT, ViT-Lite/CVT): one ``patch_size`` conv with the
  same stride.
- ``conv``: :class:`ConvTokenizer`, the CCT tokenizer of Compact-Transformers.
- ``t2t``: :class:`~mpvg_kernels.layers.t2t.T2TTokenizer`, the Tokens-to-Token module of T2T-ViT (``patch_size``:
  its total stride, 16).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .blocks import PatchEmbed, to_2tuple
from .t2t import T2TTokenizer

__all__ = ["TOKENIZERS", "ConvTokenizer", "build_tokenizer"]


class ConvTokenizer(nn.Module):
    """The CCT tokenizer (Hassani et al. 2021, ``src/utils/tokenizer.py`` of Compact-Transformers): ``n_conv_layers``
    blocks of [Conv2d(k, stride, padding, no bias), ReLU, MaxPool2d(pooling_kernel_size, pooling_stride,
    pooling_padding)], channels in_chans -> in_planes -> ... -> embed_dim, flattened to tokens [B, N, D].

    ``patch_size`` is the conv kernel size k (CCT-7/3x1: k = 3, one layer); as in CCT, stride = max(1, k // 2 - 1)
    and padding = max(1, k // 2) unless given. ``patch_size`` *of the module* is its total stride (conv stride x
    pooling stride per layer), ``kernel_size`` the conv kernel. ``max_pool=False`` drops the pooling,
    ``activation=False`` the ReLU, ``conv_bias=True`` adds conv biases. Parameter names follow the official
    module (``conv_layers.i.0.weight``)."""

    first_conv = "conv_layers.0.0"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int | tuple[int, int] = 3,
        in_chans: int = 3,
        embed_dim: int = 256,
        n_conv_layers: int = 1,
        in_planes: int = 64,
        stride: int | None = None,
        padding: int | None = None,
        pooling_kernel_size: int = 3,
        pooling_stride: int = 2,
        pooling_padding: int = 1,
        max_pool: bool = True,
        activation: bool = True,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        k = to_2tuple(patch_size)
        for name, v in (
            ("n_conv_layers", n_conv_layers),
            ("in_planes", in_planes),
            ("kernel size", min(k)),
            ("pooling_kernel_size", pooling_kernel_size),
            ("pooling_stride", pooling_stride),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ConvTokenizer: {name} must be an integer >= 1, got {v!r}")
        self.kernel_size = k
        self.stride = stride if stride is not None else max(1, k[0] // 2 - 1)
        self.padding = padding if padding is not None else max(1, k[0] // 2)
        self.max_pool = bool(max_pool)
        self.pool_args = (pooling_kernel_size, pooling_stride, pooling_padding)
        self.in_chans = in_chans
        chans = [in_chans] + [in_planes] * (n_conv_layers - 1) + [embed_dim]
        self.conv_layers = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(chans[i], chans[i + 1], k, stride=self.stride, padding=self.padding, bias=conv_bias),
                    nn.ReLU() if activation else nn.Identity(),
                    nn.MaxPool2d(*self.pool_args) if max_pool else nn.Identity(),
                )
                for i in range(n_conv_layers)
            )
        )
        s = self.stride * (pooling_stride if max_pool else 1)
        self.patch_size = (s**n_conv_layers, s**n_conv_layers)
        self.set_img_size(img_size)

    def _out(self, n: int, axis: int) -> int:
        for _ in self.conv_layers:
            n = (n + 2 * self.padding - self.kernel_size[axis]) // self.stride + 1
            if self.max_pool:
                kp, sp, pp = self.pool_args
                n = (n + 2 * pp - kp) // sp + 1
        return n

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an input of height x width pixels."""
        return self._out(height, 0), self._out(width, 1)

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Set the input size (``img_size``, ``grid_size``, ``num_patches``)."""
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.grid_for(*self.img_size)
        if self.grid_size[0] < 1 or self.grid_size[1] < 1:
            raise ValueError(f"img_size {self.img_size} leaves no tokens after the conv tokenizer")
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, h * w, D] (contiguous)."""
        return self.conv_layers(x).flatten(2).transpose(1, 2).contiguous()


#: name -> constructor ``(img_size, patch_size, in_chans, embed_dim, **tokenizer_args)``.
TOKENIZERS: dict[str, Callable[..., nn.Module]] = {
    "patch": PatchEmbed,
    "conv": ConvTokenizer,
    "t2t": T2TTokenizer,
}


def build_tokenizer(
    name: str,
    img_size: int | tuple[int, int],
    patch_size: int | tuple[int, int],
    in_chans: int,
    embed_dim: int,
    tokenizer_args: dict[str, Any] | None = None,
) -> nn.Module:
    """The tokenizer ``TOKENIZERS[name]`` built with ``tokenizer_args``; a ValueError names an unknown one."""
    if name not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {tuple(TOKENIZERS)}, got {name!r}")
    if tokenizer_args is not None and not isinstance(tokenizer_args, dict):
        raise TypeError(f"tokenizer_args must be a dict or None, got {type(tokenizer_args).__name__}")
    try:
        return TOKENIZERS[name](img_size, patch_size, in_chans, embed_dim, **(tokenizer_args or {}))
    except TypeError as e:
        raise ValueError(f"tokenizer {name!r} does not take these tokenizer_args {tokenizer_args}: {e}") from e
