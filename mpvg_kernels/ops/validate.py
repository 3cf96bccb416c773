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


_FLOATS = frozenset(FLOAT_DTYPES)
_INF = math.inf
_T = torch.Tensor


def quick_ok(x: object, pe: object, weight: object, bias: object, eps: object, *more_params: object) -> bool:
    """True when every argument is well formed: float tensors on x's device, x ``[..., N, D]`` with D > 0 and stride
    1 in its last dim, pe None or ``[N, D]``, weight, bias (and ``more_params``) ``[D]``, eps a finite float >= 0.

    A cheap screen for the common case: False does not mean invalid, only that the full checks (which raise with
    a message, or accept) must run.
    """
    if type(eps) is not float or not 0.0 <= eps < _INF:
        return False
    if not (isinstance(x, _T) and isinstance(weight, _T) and isinstance(bias, _T)):
        return False
    shape = x.shape
    if len(shape) < 2:
        return False
    n, d = shape[-2], shape[-1]
    dev = x.device
    wshape = (d,)
    if not (
        d
        and x.stride(-1) == 1
        and weight.shape == wshape == bias.shape
        and x.dtype in _FLOATS
        and weight.dtype in _FLOATS
        and bias.dtype in _FLOATS
        and weight.device == dev == bias.device
    ):
        return False
    for p in more_params:
        if not isinstance(p, _T) or p.shape != wshape or p.dtype not in _FLOATS or p.device != dev:
            return False
    return pe is None or (isinstance(pe, _T) and pe.shape == (n, d) and pe.dtype in _FLOATS and pe.device == dev)
