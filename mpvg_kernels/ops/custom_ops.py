"""The public ops and the ``mpvg::`` custom ops behind them.

Custom ops (schemas below) take ``x`` as a 3-D ``[B, N, D]`` tensor with stride 1 in the last dim and any
strides in the first two, and return the saved statistics next to the result so that autograd can hand them
to the backward op. Their kernels are chosen by the dispatcher per device:

- CPU: the C++ kernels of ``csrc/cpu`` when built (``TORCH_LIBRARY_IMPL(mpvg, CPU, ...)``), the Triton
  interpreter when ``TRITON_INTERPRET=1``, otherwise the reference kernels of ``reference.py``;
- CUDA: the Triton kernels.

The ops stay opaque to ``torch.compile`` and ``torch.export`` (``register_fake``): the graph keeps
``mpvg::`` nodes, so compiled CPU code reaches the C++ kernels and exported programs stay backend-neutral.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import torch

from . import backends, eager, reference
from . import validate as V
from .reference import acc_dtype

_lib = torch.library.Library("mpvg", "DEF")
_lib.define("layer_norm_add(Tensor x, Tensor? pe, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)")
_lib.define(
    "layer_norm_add_backward(Tensor grad, Tensor x, Tensor weight, Tensor mean, Tensor rstd, bool has_pe)"
    " -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define("layer_norm_pool(Tensor x, Tensor weight, Tensor bias, Tensor? pe, float eps) -> (Tensor, Tensor, Tensor)")
_lib.define(
    "layer_norm_pool_backward(Tensor grad, Tensor x, Tensor weight, Tensor mean, Tensor rstd, bool has_pe)"
    " -> (Tensor, Tensor, Tensor, Tensor)"
)


# ----------------------------------------------------------------------------- fake (meta) kernels


@torch.library.register_fake("mpvg::layer_norm_add")
def _add_fake(x, pe, weight, bias, eps):
    B, N, D = x.shape
    stats = x.new_empty(B * N, dtype=acc_dtype(x.dtype))
    return x.new_empty(B, N, D), stats, torch.empty_like(stats)


@torch.library.register_fake("mpvg::layer_norm_pool")
def _pool_fake(x, weight, bias, pe, eps):
    B, N, D = x.shape
    stats = x.new_empty(B * N, dtype=acc_dtype(x.dtype))
    return x.new_empty(B, D), stats, torch.empty_like(stats)


def _bwd_fake(grad, x, weight, mean, rstd, has_pe):
    B, N, D = x.shape
    acc = acc_dtype(x.dtype)
    dpe = x.new_empty((N, D) if has_pe else (0,), dtype=acc)
    return x.new_empty(B, N, D), dpe, x.new_empty(D, dtype=acc), x.new_empty(D, dtype=acc)


torch.library.register_fake("mpvg::layer_norm_add_backward", _bwd_fake)
torch.library.register_fake("mpvg::layer_norm_pool_backward", _bwd_fake)


# ----------------------------------------------------------------------------- kernel registrations


def _register_module_kernels(get_module: Callable[[], ModuleType], dispatch_key: str) -> None:
    """Register a Python module with ``forward``/``backward`` (reference contract) as the kernels of one key."""

    def add(x, pe, weight, bias, eps):
        return get_module().forward(x, pe, weight, bias, eps, False)

    def add_bwd(grad, x, weight, mean, rstd, has_pe):
        return get_module().backward(grad, x, weight, mean, rstd, has_pe, False)

    def pool(x, weight, bias, pe, eps):
        return get_module().forward(x, pe, weight, bias, eps, True)

    def pool_bwd(grad, x, weight, mean, rstd, has_pe):
        return get_module().backward(grad, x, weight, mean, rstd, has_pe, True)

    for name, fn in (
        ("layer_norm_add", add),
        ("layer_norm_add_backward", add_bwd),
        ("layer_norm_pool", pool),
        ("layer_norm_pool_backward", pool_bwd),
    ):
        _lib.impl(name, fn, dispatch_key)


def _triton_module() -> ModuleType:
    from . import triton_kernels

    return triton_kernels


_register_module_kernels(_triton_module, "CUDA")
if backends.TRITON_INTERPRET:
    # Interpreter mode: CPU tensors run the Triton kernels; the C++ kernels stay unloaded so they cannot
    # shadow them.
    _register_module_kernels(_triton_module, "CPU")
    backends._state["cpp_error"] = "not loaded because TRITON_INTERPRET=1 routes CPU tensors to Triton"
else:
    try:
        from . import _C  # noqa: F401  (registers the C++ CPU kernels of the ops defined above)

        backends._state["cpp_loaded"] = True
        backends._state["cpp_error"] = ""
    except ImportError as exc:  # no compiler at install time, or a build against another torch
        backends._state["cpp_error"] = f"import failed: {exc}"
        _register_module_kernels(lambda: reference, "CPU")


# ----------------------------------------------------------------------------- autograd


def _make_autograd(pool: bool, namespace: str = "mpvg"):
    """(setup_context, backward) of a forward op of ``namespace`` whose backward op is ``NAMESPACE::*_backward``."""
    ops = getattr(torch.ops, namespace)
    bwd_op = ops.layer_norm_pool_backward if pool else ops.layer_norm_add_backward

    def setup_context(ctx, inputs, output):
        if pool:
            x, weight, bias, pe, _ = inputs
        else:
            x, pe, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps = inputs[-1]
        ctx.pe_dtype = None if pe is None else pe.dtype
        ctx.bias_dtype = bias.dtype
        ctx.set_materialize_grads(False)  # mean/rstd never get gradients: no zero-filled tensors for them

    def backward(ctx, grad, _gmean, _grstd):
        if grad is None:
            return None, None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        has_pe = ctx.pe_dtype is not None
        if torch.is_grad_enabled() and (grad.requires_grad or x.requires_grad or weight.requires_grad):
            # create_graph=True: the kernels' gradients are not differentiable, so compute them with the
            # reference's differentiable math (statistics recomputed from x); double backward is then exact.
            dx, dpe, dw, db = reference.backward_differentiable(grad, x, weight, ctx.eps, has_pe, pool)
        else:
            dx, dpe, dw, db = bwd_op(grad.contiguous(), x, weight, mean, rstd, has_pe)
        dpe = dpe.to(ctx.pe_dtype) if has_pe else None
        dw, db = dw.to(weight.dtype), db.to(ctx.bias_dtype)
        if pool:
            return dx, dw, db, dpe, None
        return dx, dpe, dw, db, None

    return setup_context, backward


for _name, _pool in (("layer_norm_add", False), ("layer_norm_pool", True)):
    _s, _b = _make_autograd(_pool)
    torch.library.register_autograd(f"mpvg::{_name}", _b, setup_context=_s)


# F.layer_norm runs in float32 under CUDA autocast and in the input dtype under CPU autocast; so do these.
for _name in ("layer_norm_add", "layer_norm_pool"):
    torch.library.register_autocast(f"mpvg::{_name}", "cuda", torch.float32)


# ----------------------------------------------------------------------------- public API


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """[..., N, D] -> [B, N, D] without copying when the leading dims collapse (always for 2-D and 3-D x)."""
    if x.dim() == 3:
        return x
    if x.dim() == 2:
        return x.unsqueeze(0)
    n, d = x.shape[-2:]
    b = math.prod(x.shape[:-2])  # explicit: -1 is ambiguous for empty x
    try:
        return x.view(b, n, d)
    except RuntimeError:  # leading dims that no single stride describes: one copy is unavoidable
        return x.reshape(b, n, d)


def _check_common(x, pe_name, pe, weight, bias, eps):
    if V.quick_ok(x, pe, weight, bias, eps):
        return x, pe, weight, bias, eps
    x = V.check_x(x)
    pe = V.check_pe(pe_name, pe, x)
    weight = V.check_param("weight", weight, x)
    bias = V.check_param("bias", bias, x)
    return x, pe, weight, bias, V.check_eps(eps)


def layer_norm_add(
    x: torch.Tensor,
    pe: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``LayerNorm(x) * weight + bias + pe``.

    x: [..., N, D] with stride 1 in the last dim. pe: [N, D] or [1, N, D], broadcast over the leading dims.
    weight, bias: [D]. Returns a tensor of x's shape and dtype.
    """
    if pe is None:
        raise TypeError("pe is required for layer_norm_add (use torch.nn.functional.layer_norm without it)")
    if not V.quick_ok(x, pe, weight, bias, eps):
        x, pe, weight, bias, eps = _check_common(x, "pe", pe, weight, bias, eps)
    return _layer_norm_add(x, pe, weight, bias, eps)


def _cuda_autocast_fp32(x: torch.Tensor, *ts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...] | None:
    """The registered autocast rule of the custom ops, for the paths that do not call them (the ``torch`` backend,
    the eager fast path): under CUDA autocast, CUDA inputs other than float64 are cast to float32 (as
    ``F.layer_norm``'s are, and as ``torch.library.register_autocast`` casts). None when autocast is off."""
    if not (x.is_cuda and torch.is_autocast_enabled("cuda")):
        return None
    return tuple(t if t is None or t.dtype == torch.float64 or not t.is_cuda else t.float() for t in (x, *ts))


def _run_reference(fn: Callable[..., torch.Tensor], args: tuple, eps: float) -> torch.Tensor:
    """The ``torch`` backend: the reference function, under the ops' CUDA-autocast rule (float32)."""
    cast = _cuda_autocast_fp32(*args)
    if cast is not None:
        with torch.autocast("cuda", enabled=False):
            return fn(*cast, eps)
    return fn(*args, eps)


def _op_args(
    x: torch.Tensor, pe: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The operands as the kernels take them: x as [B, N, D] (a view), pe, weight and bias contiguous."""
    if pe is not None and not pe.is_contiguous():
        pe = pe.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if not bias.is_contiguous():
        bias = bias.contiguous()
    return (x if x.dim() == 3 else _as_3d(x)), pe, weight, bias


def _fused(
    backend: str,
    x: torch.Tensor,
    pe: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    pool: bool,
) -> torch.Tensor:
    """The fused op on a kernel backend (``cpp`` or ``triton``): [B, N, D] ([B, D] when ``pool``) for x [B, N, D].

    Plain eager calls take the eager fast path (``eager.py``: the same kernels without torch.library's Python
    layers); everything else (compiling, exporting, tracing, modes, subclasses, empty inputs) a registered op: the
    ``mpvg::`` op, or under the ``triton_op`` design (``backends.set_op_design``) the ``mpvg_triton::`` op except
    while exporting. One dtype rule holds on every path: x's dtype, float32 under CUDA autocast.
    """
    x3, pe, weight, bias = _op_args(x, pe, weight, bias)
    if x3.numel() and eager.applies(x3, pe, weight, bias):
        if x3.is_cuda:
            cast = _cuda_autocast_fp32(x3, pe, weight, bias)
            if cast is not None:
                x3, pe, weight, bias = cast
        return eager.layer_norm(backend, x3, pe, weight, bias, eps, pool)
    ops = torch.ops.mpvg
    if backends._state["op_design"] == "triton_op" and not torch.compiler.is_exporting():
        ops = torch.ops.mpvg_triton
    if pool:
        return ops.layer_norm_pool(x3, weight, bias, pe, eps)[0]
    return ops.layer_norm_add(x3, pe, weight, bias, eps)[0]


def _layer_norm_add(
    x: torch.Tensor, pe: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """:func:`layer_norm_add` without the argument checks, for callers whose shapes are known to be valid
    (the modules' cached inference path); pe may be None (a plain LayerNorm) and must be [N, D].

    The ``torch`` backend runs the reference (following the ops' CUDA-autocast rule); the others
    :func:`_fused`.
    """
    backend = backends.resolve_backend(x.device)
    if backend == "torch":
        return _run_reference(reference.layer_norm_add, (x, pe, weight, bias), eps)
    y = _fused(backend, x, pe, weight, bias, eps, False)
    return y if x.dim() == 3 else y.view(x.shape)


def _layer_norm_pool(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pe: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """:func:`layer_norm_pool` without the argument checks (see :func:`_layer_norm_add`); x has N >= 1 tokens."""
    backend = backends.resolve_backend(x.device)
    if backend == "torch":
        return _run_reference(reference.layer_norm_pool, (x, weight, bias, pe), eps)
    out = _fused(backend, x, pe, weight, bias, eps, True)
    return out if x.dim() == 3 else out.view(*x.shape[:-2], x.shape[-1])


def dual_layer_norm(
    x: torch.Tensor,
    pos: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LN(x) + LN'(pos), LN'(pos))``: one block's LayerNorm plus its own LayerNorm of the PE.

    ``pos_norm`` keeps pos's shape and dtype and also feeds the next layer (the hierarchical PE chain).
    """
    if V.quick_ok(x, pos, weight, bias, eps, pos_weight, pos_bias):
        pos2 = pos
    else:
        x, pos2, weight, bias, eps = _check_common(x, "pos", pos, weight, bias, eps)
        pos_weight = V.check_param("pos_weight", pos_weight, x)
        pos_bias = V.check_param("pos_bias", pos_bias, x)
    pos_norm = _layer_norm_add(pos2, None, pos_weight, pos_bias, eps)
    y = _layer_norm_add(x, pos_norm, weight, bias, eps)
    return y, pos_norm.view(pos.shape)


def layer_norm_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pe: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``mean over tokens of (LayerNorm(x) * weight + bias + pe)``: x [..., N, D] -> [..., D].

    The per-token result is never materialised; pe is optional ([N, D] or [1, N, D]).
    """
    x, pe, weight, bias, eps = _check_common(x, "pe", pe, weight, bias, eps)
    if x.shape[-2] == 0:
        raise ValueError(f"layer_norm_pool needs at least one token to average, got x of shape {tuple(x.shape)}")
    return _layer_norm_pool(x, weight, bias, pe, eps)


if backends.get_op_design() == "triton_op":  # MPVG_OP_DESIGN=triton_op: register the mpvg_triton:: ops now
    backends.set_op_design("triton_op")
elif backends.get_op_design() not in backends.OP_DESIGNS:
    raise ValueError(
        f"MPVG_OP_DESIGN={backends.get_op_design()!r} is not an op design; choose one of "
        f"{', '.join(backends.OP_DESIGNS)}"
    )
