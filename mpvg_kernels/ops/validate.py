"""Argument checks shared by every public op: raised before any kernel runs."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t: object, *, optional: bool = False) -> None:
    """Type and dtype check of one tensor argument."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported dtypes are float32, float16, bfloat16 and float64"
        )


def check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return float(eps)


def check_x(x: object) -> torch.Tensor:
    check_tensor("x", x)
    assert isinstance(x, torch.Tensor)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., N, D], got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim D, got shape {tuple(x.shape)}")
    if x.numel() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"x must have stride 1 in its last dim, got strides {x.stride()} for shape {tuple(x.shape)}"
        )
    return x


def check_pe(name: str, pe: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """pe must be [N, D] or [1, N, D] for x of shape [..., N, D]; returns it as [N, D]."""
    check_tensor(name, pe, optional=True)
    if pe is None:
        return None
    n, d = x.shape[-2], x.shape[-1]
    if tuple(pe.shape) not in ((n, d), (1, n, d)):
        raise ValueError(
            f"{name} must have shape [N, D] = [{n}, {d}] or [1, {n}, {d}] to match x of shape "
            f"{tuple(x.shape)}, got {tuple(pe.shape)}"
        )
    check_device(name, pe, x)
    return pe.reshape(n, d)


def check_param(name: str, p: object, x: torch.Tensor) -> torch.Tensor:
    check_tensor(name, p)
    assert isinstance(p, torch.Tensor)
    d = x.shape[-1]
    if tuple(p.shape) != (d,):
        raise ValueError(
            f"{name} must have shape [D] = [{d}] to match x of shape {tuple(x.shape)}, got {tuple(p.shape)}"
        )
    check_device(name, p, x)
    return p


def check_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
