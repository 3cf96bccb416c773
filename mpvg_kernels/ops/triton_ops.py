"""The ``triton_op`` design: the fused ops as ``torch.library.triton_op`` custom ops (namespace ``mpvg_triton``), a
thin registration over the Triton launchers of ``triton_kernels.py``.

``torch.compile`` decomposes a ``triton_op`` into its Python body while tracing, so on CUDA Inductor sees the Triton
kernels themselves (the launcher runs with ``launch=`` :func:`_wrap_launch`: one ``triton_kernel_wrapper`` node per
launch); the opaque ``mpvg::`` ops (the default design) stay single nodes. On every other device the body calls the
``mpvg::`` op. The schemas are the ``mpvg::`` ops' (``layer_norm.py``), which registers this module's ops with the
op family's autograd and autocast rule when the design is chosen (``backends.set_op_design``).
"""

# No ``from __future__ import annotations``: torch.library infers the schemas from the annotations' objects.

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from . import triton_kernels as tk

NAMESPACE = "mpvg_triton"

Tensor = torch.Tensor


def _wrap_launch(kernel, grid, args, meta) -> None:
    wrap_triton(kernel)[grid](*args, **meta)


def _forward(x: Tensor, pe: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float, pool: bool):  # noqa: UP045
    if x.device.type != "cuda":  # fake CPU tensors cannot be traced through wrap_triton: the mpvg:: op runs eagerly
        op = torch.ops.mpvg.layer_norm_pool if pool else torch.ops.mpvg.layer_norm_add
        return op(x, pe, weight, bias, eps)
    out, stats, _ = tk.forward(x, pe, weight.contiguous(), bias.contiguous(), eps, pool, True, _wrap_launch)
    return out, stats


def _backward(grad: Tensor, x: Tensor, weight: Tensor, stats: Tensor, has_pe: bool, pool: bool):
    if x.device.type != "cuda":
        op = torch.ops.mpvg.layer_norm_pool_backward if pool else torch.ops.mpvg.layer_norm_add_backward
        return op(grad, x, weight, stats, has_pe)
    dx, dpe, dw, db = tk.backward(grad, x, weight.contiguous(), stats, has_pe, pool, None, _wrap_launch)
    return dx, (dx.new_empty(0, dtype=dw.dtype) if dpe is None else dpe), dw, db


@triton_op(f"{NAMESPACE}::layer_norm_add", mutates_args=())
def layer_norm_add(
    x: Tensor, pe: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float  # noqa: UP045
) -> tuple[Tensor, Tensor]:
    return _forward(x, pe, weight, bias, eps, False)


@triton_op(f"{NAMESPACE}::layer_norm_pool", mutates_args=())
def layer_norm_pool(
    x: Tensor, pe: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float  # noqa: UP045
) -> tuple[Tensor, Tensor]:
    return _forward(x, pe, weight, bias, eps, True)


@triton_op(f"{NAMESPACE}::layer_norm_add_backward", mutates_args=())
def layer_norm_add_backward(
    grad: Tensor, x: Tensor, weight: Tensor, stats: Tensor, has_pe: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad, x, weight, stats, has_pe, False)


@triton_op(f"{NAMESPACE}::layer_norm_pool_backward", mutates_args=())
def layer_norm_pool_backward(
    grad: Tensor, x: Tensor, weight: Tensor, stats: Tensor, has_pe: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad, x, weight, stats, has_pe, True)
