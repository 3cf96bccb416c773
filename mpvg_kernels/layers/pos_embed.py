"""Absolute position embeddings: resampling a learned one to another token grid (the way timm does it) and the
fixed sinusoidal tables (1-D as T2T-ViT's ``get_sinusoid_encoding``, 2-D as MAE's ``get_2d_sincos_pos_embed``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "POS_EMBED_TYPES",
    "infer_grid_size",
    "resample_abs_pos_embed",
    "sincos_pos_embed",
    "sincos_table_1d",
    "sincos_table_2d",
]

#: The absolute position embeddings of :class:`~mpvg_kernels.models.VisionTransformer`: ``learn`` (a parameter),
#: ``sincos1d`` / ``sincos2d`` (fixed tables, buffers).
POS_EMBED_TYPES: tuple[str, ...] = ("learn", "sincos1d", "sincos2d")


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


def sincos_table_1d(num_positions: int, dim: int) -> torch.Tensor:
    """The 1-D sinusoid table [num_positions, dim] (float64) of "Attention is all you need", as T2T-ViT's
    ``get_sinusoid_encoding``: row n, column j is sin (j even) or cos (j odd) of n / 10000^(2 * (j // 2) / dim)."""
    if num_positions < 1 or dim < 1:
        raise ValueError(f"num_positions and dim must be >= 1, got {num_positions} and {dim}")
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2.0 * torch.div(j, 2, rounding_mode="floor") / dim)
    return torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle))


def _sincos_1d_halves(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE's ``get_1d_sincos_pos_embed_from_grid``: [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim / 2))."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).to(torch.float64) * omega
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_table_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """The 2-D sin-cos table [h * w, dim] (float64, rows in row-major grid order) of MAE/MoCo-v3, as MAE's
    ``get_2d_sincos_pos_embed``: the first dim / 2 columns encode the column index of the token, the last dim / 2
    its row index, each as [sin, cos] of the 1-D frequencies. ``dim`` must be a multiple of 4."""
    h, w = int(grid[0]), int(grid[1])
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs an embed dim divisible by 4, got {dim}")
    if h < 1 or w < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # row index of each token
    cols = torch.arange(w, dtype=torch.float64).repeat(h)  # column index of each token
    return torch.cat([_sincos_1d_halves(dim // 2, cols), _sincos_1d_halves(dim // 2, rows)], dim=1)


def sincos_pos_embed(
    kind: str,
    grid: tuple[int, int],
    dim: int,
    num_prefix_tokens: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A fixed position embedding [1, P + h * w, dim] for ``grid`` with P = ``num_prefix_tokens`` prefix rows.

    ``sincos1d``: the 1-D table over all P + h * w positions (the prefix rows are positions 0..P-1, as T2T-ViT
    numbers the class token); ``sincos2d``: zero prefix rows, then the 2-D table of the grid (as MAE)."""
    if kind == "sincos1d":
        table = sincos_table_1d(num_prefix_tokens + grid[0] * grid[1], dim)
    elif kind == "sincos2d":
        table = sincos_table_2d(grid, dim)
        table = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=table.dtype), table], dim=0)
    else:
        raise ValueError(f"kind must be 'sincos1d' or 'sincos2d', got {kind!r}")
    return table.unsqueeze(0).to(device=device, dtype=dtype)
