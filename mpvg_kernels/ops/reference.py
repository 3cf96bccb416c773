"""Plain PyTorch definition of every op: the spec that all backends are tested against.

Each function works in any floating dtype (float64 included, for gradcheck) and is differentiable by
ordinary autograd. Statistics are computed in float32 (or float64 for float64 input) and the result is
returned in ``x``'s dtype, as the fused kernels do.

The ``*_forward`` / ``*_backward`` pairs are the reference kernels behind the custom ops: they take the
flattened ``[B, N, D]`` layout and return the saved statistics (``mean``, ``rstd``, float32 ``[B*N]``) and
float32 parameter gradients, exactly as a kernel backend does.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every backend: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm_add(
    x: torch.Tensor,
    pe: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``LN(x) * weight + bias + pe`` over the last dim; ``pe`` ([N, D] or [1, N, D]) broadcasts over batch."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(acc) + bias.to(acc)
    if pe is not None:
        y = y + pe.reshape(pe.shape[-2], pe.shape[-1]).to(acc)
    return y.to(x.dtype)


def dual_layer_norm(
    x: torch.Tensor,
    pos: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LN(x) + LN'(pos), LN'(pos))``: a block's norm plus its independently normalised PE."""
    pos_norm = layer_norm_add(pos, None, pos_weight, pos_bias, eps)
    return layer_norm_add(x, pos_norm, weight, bias, eps), pos_norm


def layer_norm_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pe: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``mean_n(LN(x[..., n, :]) + pe[n])``: the last LayerNorm (plus optional PE) and global average pooling."""
    acc = acc_dtype(x.dtype)
    y = layer_norm_add(x.to(acc), None if pe is None else pe.to(acc), weight, bias, eps)
    return y.mean(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Reference kernels: the same contract as the Triton and C++ kernels ([B, N, D] in, stats out).
# ---------------------------------------------------------------------------------------------------


def _stats(x3: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = acc_dtype(x3.dtype)
    xf = x3.to(acc)
    mean = xf.mean(-1)
    rstd = torch.rsqrt((xf - mean.unsqueeze(-1)).pow(2).mean(-1) + eps)
    xhat = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    return xhat, mean, rstd


def forward(
    x3: torch.Tensor,
    pe: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    pool: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel contract: x3 [B, N, D] -> (y [B, N, D] or pooled [B, D], mean [B*N], rstd [B*N]).

    Statistics and parameter gradients are float32, or float64 when x is float64.
    """
    B, N, D = x3.shape
    acc = acc_dtype(x3.dtype)
    xhat, mean, rstd = _stats(x3, eps)
    y = xhat * weight.to(acc) + bias.to(acc)
    if pe is not None:
        y = y + pe.to(acc)
    if pool:
        y = y.mean(1) if N > 0 else torch.zeros(B, D, dtype=acc, device=x3.device)
    return y.to(x3.dtype), mean.reshape(-1).to(acc), rstd.reshape(-1).to(acc)


def backward(
    grad: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_pe: bool,
    pool: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel contract: -> (dx [B, N, D] in x.dtype, dpe [N, D] (or [0]), dweight [D], dbias [D]).

    The last three are in the accumulation dtype (float32, or float64 for float64 x).
    """
    B, N, D = x3.shape
    acc = acc_dtype(x3.dtype)
    xf = x3.to(acc)
    mean = mean.to(acc).reshape(B, N, 1)
    rstd = rstd.to(acc).reshape(B, N, 1)
    xhat = (xf - mean) * rstd
    if pool:
        dy = (grad.to(acc) / max(N, 1)).unsqueeze(1).expand(B, N, D)
    else:
        dy = grad.to(acc)
    wdy = dy * weight.to(acc)
    c1 = (wdy * xhat).mean(-1, keepdim=True)
    c2 = wdy.mean(-1, keepdim=True)
    dx = (wdy - xhat * c1 - c2) * rstd
    dw = (dy * xhat).sum((0, 1))
    db = dy.sum((0, 1))
    dpe = dy.sum(0) if has_pe else dy.new_zeros(0)
    return dx.to(x3.dtype), dpe.to(acc), dw.to(acc), db.to(acc)


def backward_differentiable(
    grad: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    has_pe: bool,
    pool: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`backward` with the statistics recomputed from ``x3`` by differentiable ops, so that the gradients
    are themselves differentiable in ``grad``, ``x3`` and ``weight`` (double backward, ``create_graph=True``)."""
    _, mean, rstd = _stats(x3, eps)
    return backward(grad, x3, weight, mean, rstd, has_pe, pool)
