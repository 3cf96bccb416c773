"""Eager fast path of the public ops: the kernels without torch.library's Python dispatch and autograd layers.

In plain eager mode (no ``torch.compile``/``torch.export`` tracing, no ``torch.jit`` tracing, no
``TorchDispatchMode``/``TorchFunctionMode`` active, no functorch transform, plain tensors or parameters) the
public ops of ``custom_ops.py`` skip the registered ``mpvg::`` ops and:

- ``triton`` backend: call the launchers' cached plans directly (``triton_kernels.forward_eager`` /
  ``backward_eager``): no argument re-validation, no per-call planning, one statistics buffer (mean and rstd)
  saved for the backward, none at all without autograd (the kernel then skips the statistics);
- ``cpp`` backend: call the ``mpvg::`` op below the autograd key, i.e. straight into the C++ kernel;
- under CUDA autocast, CUDA inputs are first cast to float32 as the registered autocast rule casts them;

with autograd through one ``torch.autograd.Function`` (:class:`FusedLayerNorm`), entered without
``Function.apply``'s Python preamble. Everything else (compiling, exporting, ``opcheck``, fake tensors, modes,
functorch) takes the registered ops, which stay the one definition the graph sees. Both paths launch the same
kernels with the same work splits, so their results are bitwise identical (tested, backward included).

Switch: :func:`set_eager_fast_path` / :func:`use_eager_fast_path`, or ``MPVG_EAGER_FAST_PATH=0`` (read at
import) to send every call through the registered ops.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import reference

_C = torch._C

_state: dict[str, bool] = {
    "enabled": os.environ.get("MPVG_EAGER_FAST_PATH", "1").strip().lower() not in ("0", "false", "off", "no"),
}

#: Tensor types the fast path accepts: subclasses (fake, functional, user subclasses) take the registered ops.
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_BELOW_AUTOGRAD = _C._AutoDispatchBelowAutograd
_F32, _F64 = torch.float32, torch.float64


def set_eager_fast_path(enabled: bool) -> None:
    """Turn the eager fast path on (the default) or off (every call through the registered ``mpvg::`` ops)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _state["enabled"] = enabled


def eager_fast_path_enabled() -> bool:
    """Whether the eager fast path is switched on (it still applies only in plain eager mode)."""
    return _state["enabled"]


@contextlib.contextmanager
def use_eager_fast_path(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_eager_fast_path`, restoring the previous setting on exit."""
    old = _state["enabled"]
    set_eager_fast_path(enabled)
    try:
        yield
    finally:
        _state["enabled"] = old


def applies(x: torch.Tensor, pe: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """True when a call on these tensors may take the fast path: switched on, plain eager mode, plain tensors.

    ``torch.compiler.is_compiling()`` comes first: under Dynamo it is a constant True, so the traced code takes
    the registered op and nothing else here is traced.
    """
    if torch.compiler.is_compiling() or not _state["enabled"]:
        return False
    if (
        _C._len_torch_dispatch_stack()
        or _C._is_torch_function_mode_enabled()
        or _C._are_functorch_transforms_active()
        or _C._get_tracing_state() is not None
    ):
        return False
    if type(x) not in _PLAIN or type(weight) not in _PLAIN or type(bias) not in _PLAIN:
        return False
    return pe is None or type(pe) in _PLAIN


def _cpp_ops(pool: bool):
    ops = torch.ops.mpvg
    if pool:
        return ops.layer_norm_pool.default, ops.layer_norm_pool_backward.default
    return ops.layer_norm_add.default, ops.layer_norm_add_backward.default


def _cpp_forward(x3, pe, weight, bias, eps, pool):
    fwd = _cpp_ops(pool)[0]
    with _BELOW_AUTOGRAD():  # straight to the CPU kernel: the autograd key's Python kernel is not needed here
        return fwd(x3, weight, bias, pe, eps) if pool else fwd(x3, pe, weight, bias, eps)


_tk: list = []  # triton_kernels, imported on first use (importing it needs triton; a backward follows a forward)


def _triton():
    if not _tk:
        from . import triton_kernels

        _tk.append(triton_kernels)
    return _tk[0]


class FusedLayerNorm(torch.autograd.Function):
    """Autograd of the fast path: ``LN(x3) * weight + bias (+ pe)``, per token or pooled, on one backend.

    Its backward is the registered ops' (``custom_ops._make_autograd``): the backward kernel, or, when a graph of
    the gradient is being built (``create_graph=True``), the reference's differentiable formulas; gradients in the
    accumulation dtype are converted to the dtypes of pe, weight and bias as there.
    """

    @staticmethod
    def forward(ctx, x3, pe, weight, bias, eps, pool, backend):  # type: ignore[override]
        if backend == "triton":
            out, stats, ctx.plan = _triton().forward_eager_planned(x3, pe, weight, bias, eps, pool, True)
            ctx.save_for_backward(x3, weight, stats)
        else:
            out, mean, rstd = _cpp_forward(x3, pe, weight, bias, eps, pool)
            ctx.save_for_backward(x3, weight, mean, rstd)
        acc = _F64 if x3.dtype == _F64 else _F32
        pe_cast = None if pe is None or pe.dtype == acc else pe.dtype
        w_cast = None if weight.dtype == acc else weight.dtype
        b_cast = None if bias.dtype == acc else bias.dtype
        ctx.info = (eps, pool, backend, pe is not None, pe_cast, w_cast, b_cast)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if grad is None:
            return None, None, None, None, None, None, None
        eps, pool, backend, has_pe, pe_cast, w_cast, b_cast = ctx.info
        saved = ctx.saved_tensors
        x3, weight = saved[0], saved[1]
        if _C.is_grad_enabled() and (grad.requires_grad or x3.requires_grad or weight.requires_grad):
            dx, dpe, dw, db = reference.backward_differentiable(grad, x3, weight, eps, has_pe, pool)
            if not has_pe:
                dpe = None
        elif backend == "triton":
            dx, dpe, dw, db = _tk[0].backward_eager(grad, x3, weight, saved[2], has_pe, pool, ctx.plan)
        else:
            with _BELOW_AUTOGRAD():
                dx, dpe, dw, db = _cpp_ops(pool)[1](grad.contiguous(), x3, weight, saved[2], saved[3], has_pe)
            if not has_pe:
                dpe = None
        if pe_cast is not None:
            dpe = dpe.to(pe_cast)
        if w_cast is not None:
            dw = dw.to(w_cast)
        if b_cast is not None:
            db = db.to(b_cast)
        return dx, dpe, dw, db, None, None, None


# Function.apply without its Python preamble (default-argument binding for setup_context, functorch's dead
# wrappers): neither applies here, since forward takes ctx and applies() refuses functorch transforms.
_apply = _C._FunctionBase.__dict__["apply"].__get__(None, FusedLayerNorm)


def layer_norm(
    backend: str,
    x3: torch.Tensor,
    pe: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    pool: bool,
) -> torch.Tensor:
    """The fused op on the fast path (after :func:`applies`): ``[B, N, D]`` (``[B, D]`` when ``pool``).

    ``backend`` is ``triton`` or ``cpp``; x3 ``[B, N, D]`` with ``B * N > 0`` and stride 1 in its last dim, pe
    ``[N, D]`` contiguous or None, weight and bias ``[D]`` contiguous, all validated by the caller.
    """
    if _C.is_grad_enabled() and (
        x3.requires_grad or weight.requires_grad or bias.requires_grad or (pe is not None and pe.requires_grad)
    ):
        return _apply(x3, pe, weight, bias, eps, pool, backend)
    if backend == "triton":
        return _triton().forward_eager(x3, pe, weight, bias, eps, pool, False)[0]
    return _cpp_forward(x3, pe, weight, bias, eps, pool)[0]
