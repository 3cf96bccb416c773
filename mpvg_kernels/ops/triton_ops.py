"""The ``triton_op`` design: the fused ops as ``torch.library.triton_op`` custom ops (namespace ``mpvg_triton``).

``torch.compile`` decomposes a ``triton_op`` into its Python body while tracing, so on CUDA Inductor sees the
Triton kernels themselves (``wrap_triton``: one ``triton_kernel_wrapper`` node per launch) and can schedule and fuse
around them; the opaque ``mpvg::`` ops (the default design) stay single nodes that Inductor calls as they are.
On every other device the body calls the opaque ``mpvg::`` op, so CPU tensors still reach the C++ kernels, eagerly
and compiled. ``torch.export`` keeps a ``triton_op`` as a node; the public functions use the opaque ops while
exporting in both designs, so exported programs stay backend-neutral.

Schemas (the same as the ``mpvg::`` ops)::

    mpvg_triton::layer_norm_add(x, pe?, weight, bias, eps)          -> (y, mean, rstd)
    mpvg_triton::layer_norm_pool(x, weight, bias, pe?, eps)         -> (out, mean, rstd)
    mpvg_triton::layer_norm_add_backward(grad, x, weight, mean, rstd, has_pe)  -> (dx, dpe, dweight, dbias)
    mpvg_triton::layer_norm_pool_backward(grad, x, weight, mean, rstd, has_pe) -> (dx, dpe, dweight, dbias)

with the forward ops' autograd and CUDA-autocast rule registered as for the ``mpvg::`` ops. Importing this module
registers them (it needs triton); :func:`mpvg_kernels.ops.set_op_design` does so on first use.
"""

# No ``from __future__ import annotations``: torch.library infers the schemas from the annotations' objects.

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from . import triton_kernels as tk

NAMESPACE = "mpvg_triton"

Tensor = torch.Tensor


def _launch(launch: Optional[tk.Launch]) -> None:  # noqa: UP045 (schema inference needs typing.Optional)
    if launch is not None:
        wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.meta)


def _on_triton(x: Tensor) -> bool:
    """Whether the body launches the Triton kernels itself (CUDA tensors) rather than calling the opaque ``mpvg::``
    op (every other device; on CPU that op runs the C++ kernels, or the Triton interpreter under
    ``TRITON_INTERPRET=1``, eagerly: fake CPU tensors cannot be traced through ``wrap_triton``)."""
    return x.device.type == "cuda"


def _forward(x: Tensor, pe: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float, pool: bool):  # noqa: UP045
    plan = tk.plan_forward(x, pe, weight, bias, eps, pool)
    if plan.launch is None:
        if pool:
            plan.out.zero_()  # the mean over zero tokens, as the reference defines it
        return plan.out, plan.mean, plan.rstd
    _launch(plan.launch)
    _launch(plan.finish)
    return plan.out, plan.mean, plan.rstd


def _backward(grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, has_pe: bool, pool: bool):
    plan = tk.plan_backward(grad, x, weight, mean, rstd, has_pe, pool)
    _launch(plan.launch)
    _launch(plan.finish)
    return plan.dx, plan.dpe, plan.dw, plan.db


@triton_op(f"{NAMESPACE}::layer_norm_add", mutates_args=())
def layer_norm_add(
    x: Tensor,
    pe: Optional[Tensor],  # noqa: UP045
    weight: Tensor,
    bias: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if _on_triton(x):
        return _forward(x, pe, weight, bias, eps, False)
    return torch.ops.mpvg.layer_norm_add(x, pe, weight, bias, eps)


@triton_op(f"{NAMESPACE}::layer_norm_pool", mutates_args=())
def layer_norm_pool(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    pe: Optional[Tensor],  # noqa: UP045
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if _on_triton(x):
        return _forward(x, pe, weight, bias, eps, True)
    return torch.ops.mpvg.layer_norm_pool(x, weight, bias, pe, eps)


@triton_op(f"{NAMESPACE}::layer_norm_add_backward", mutates_args=())
def layer_norm_add_backward(
    grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, has_pe: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _on_triton(x):
        return _backward(grad, x, weight, mean, rstd, has_pe, False)
    return torch.ops.mpvg.layer_norm_add_backward(grad, x, weight, mean, rstd, has_pe)


@triton_op(f"{NAMESPACE}::layer_norm_pool_backward", mutates_args=())
def layer_norm_pool_backward(
    grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, has_pe: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _on_triton(x):
        return _backward(grad, x, weight, mean, rstd, has_pe, True)
    return torch.ops.mpvg.layer_norm_pool_backward(grad, x, weight, mean, rstd, has_pe)


def _register() -> None:
    from .custom_ops import _make_autograd

    for name, pool in (("layer_norm_add", False), ("layer_norm_pool", True)):
        setup_context, backward = _make_autograd(pool, NAMESPACE)
        torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context)
        torch.library.register_autocast(f"{NAMESPACE}::{name}", "cuda", torch.float32)


_register()
