"""The numbers behind ``mpvg analyze``, on plain tensors: Pearson correlation of token and PE terms, cosine
similarities between PE rows (position-correlation maps), parameter statistics, and the default choice of blocks
and reference token. Everything is computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_pe_correlation(tokens: Tensor, pe: Tensor) -> Tensor:
    """Pearson correlation of each image's ``tokens[b]`` ([B, N, D]) with ``pe`` ([N, D]), flattened over N x D.

    Returns a float64 tensor [B]. An image (or PE) with zero variance gives NaN.
    """
    if tokens.dim() != 3 or pe.dim() != 2 or tuple(tokens.shape[1:]) != tuple(pe.shape):
        raise ValueError(f"tokens must be [B, N, D] and pe [N, D] with the same N, D; got {list(tokens.shape)} "
                         f"and {list(pe.shape)}")
    t = tokens.detach().to(torch.float64).flatten(1)
    p = pe.detach().to(torch.float64).flatten()
    t = t - t.mean(dim=1, keepdim=True)
    p = p - p.mean()
    return (t @ p) / (t.norm(dim=1) * p.norm())


def position_correlation(pe: Tensor) -> Tensor:
    """Cosine similarity between every pair of rows of ``pe`` ([N, D]) -> float64 [N, N] (LaPE Sec. 3.3)."""
    if pe.dim() != 2:
        raise ValueError(f"pe must be [N, D]; got {list(pe.shape)}")
    p = torch.nn.functional.normalize(pe.detach().to(torch.float64), dim=1)
    return p @ p.T


def position_correlation_map(pe: Tensor, grid: tuple[int, int], ref_token: int) -> Tensor:
    """Cosine similarity of patch ``ref_token``'s PE to every patch's PE, reshaped to ``grid`` -> float64 [h, w]."""
    h, w = grid
    if pe.shape[0] != h * w:
        raise ValueError(f"pe has {pe.shape[0]} rows but the grid {h}x{w} has {h * w} patches")
    if not 0 <= ref_token < h * w:
        raise ValueError(f"ref_token {ref_token} is outside 0..{h * w - 1}")
    p = torch.nn.functional.normalize(pe.detach().to(torch.float64), dim=1)
    return (p @ p[ref_token]).reshape(h, w)


def mean_pairwise_cosine(pe: Tensor) -> float:
    """Mean cosine similarity over all pairs i != j of PE rows: near 1 means globally correlated ("all white")."""
    s = position_correlation(pe)
    n = s.shape[0]
    if n < 2:
        return float("nan")
    return float((s.sum() - s.diagonal().sum()) / (n * (n - 1)))


def vector_stats(v: Tensor) -> dict[str, float]:
    """mean, var and std (population, ddof=0), min, max and max |v| of a 1-D parameter, in float64."""
    v = v.detach().to(torch.float64).flatten()
    return {
        "mean": float(v.mean()),
        "var": float(v.var(unbiased=False)),
        "std": float(v.std(unbiased=False)),
        "min": float(v.min()),
        "max": float(v.max()),
        "abs_max": float(v.abs().max()),
    }


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two tensors flattened, in float64."""
    a = a.detach().to(torch.float64).flatten()
    b = b.detach().to(torch.float64).flatten()
    return float(a @ b / (a.norm() * b.norm()))


def default_layers(depth: int) -> list[int]:
    """Blocks shown in the heatmaps: all of them up to 6, else 5 spread out ending at the last (MPVG Fig. 2)."""
    if depth <= 6:
        return list(range(depth))
    picks = {round(1 + i * (depth - 2) / 4) for i in range(5)}
    return sorted(min(p, depth - 1) for p in picks)


def default_ref_token(grid: tuple[int, int]) -> int:
    """The patch at the centre of the grid (row h//2, column w//2), as LaPE picks a central token."""
    h, w = grid
    return (h // 2) * w + w // 2

