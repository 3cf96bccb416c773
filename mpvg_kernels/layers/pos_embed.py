"""Absolute position-embedding resampling (to another token grid), the way timm does it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["resample_abs_pos_embed", "infer_grid_size"]


def infer_grid_size(num_grid_tokens: int) -> tuple[int, int]:
    """The square grid (h, w) with h * w == num_grid_tokens; ValueError if there is none."""
    side = math.isqrt(num_grid_tokens)
    if side * side != num_grid_tokens:
        raise ValueError(
            f"cannot infer the token grid of a position embedding with {num_grid_tokens} grid tokens (not a square "
            "number); pass old_size=(h, w)"
        )
    return side, side


def resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a ``[1, P + h*w, D]`` (or ``[P + h*w, D]``) position embedding to the grid ``new_size``.

    The first ``num_prefix_tokens`` rows (class/distillation tokens) are kept as they are; the grid rows are
    interpolated as a D-channel image (float32, ``F.interpolate(mode=interpolation, antialias=antialias)``), as in
    timm's ``resample_abs_pos_embed``. Returns the input itself when the grid already matches. Differentiable.
    """
    squeeze = posemb.dim() == 2
    if squeeze:
        posemb = posemb.unsqueeze(0)
    if posemb.dim() != 3 or posemb.shape[0] != 1:
        raise ValueError(f"posemb must be [1, T, D] or [T, D], got shape {tuple(posemb.shape)}")
    new_size = (int(new_size[0]), int(new_size[1]))
    num_grid = posemb.shape[1] - num_prefix_tokens
    if num_grid <= 0:
        raise ValueError(f"posemb has {posemb.shape[1]} rows, not more than num_prefix_tokens={num_prefix_tokens}")
    old_size = infer_grid_size(num_grid) if old_size is None else (int(old_size[0]), int(old_size[1]))
    if old_size[0] * old_size[1] != num_grid:
        raise ValueError(f"old_size {old_size} does not match the {num_grid} grid rows of posemb")
    if old_size == new_size:
        return posemb.squeeze(0) if squeeze else posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = posemb.shape[-1]
    orig_dtype = grid.dtype
    img = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=new_size, mode=interpolation, antialias=antialias)
    grid = img.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], dim).to(orig_dtype)
    out = torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid
    return out.squeeze(0) if squeeze else out
