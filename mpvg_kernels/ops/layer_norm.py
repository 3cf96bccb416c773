"""The fused LayerNorm op family: ``layer_norm_add``, ``dual_layer_norm``, ``layer_norm_pool``, in one place.

Read top to bottom:

1. **Contract**: shapes, the dtype rule, the argument checks (raised before any kernel runs).
2. **Reference**: the plain PyTorch definition, the spec every backend is tested against in float64; it is also the
   ``torch`` backend and gives the differentiable formulas of double backward and forward mode.
3. **Registered ops**: the ``mpvg::`` custom ops (schemas, fake kernels, the kernels per dispatch key), which
   ``torch.compile``, ``torch.export``, ONNX and ``opcheck`` see; the ``mpvg_triton::`` design over them.
4. **Kernel route**: :func:`_kernel_forward` / :func:`_kernel_backward`, the one way down to a backend's launcher:
   in plain eager mode straight to it from a cached plan (the eager fast path), otherwise through the registered op.
5. **Autograd**: one definition (:func:`_setup_context`, :func:`_backward`, :func:`_jvp`, :func:`_vmap`) used by
   every route: the ``_LayerNormFn`` Function (eager, ``torch.autograd.forward_ad``, ``torch.func``) and the
   registered ops' autograd (``torch.compile``, ``torch.export``, tracing, modes).
6. **Public functions**.

Kernels live per backend: ``triton_kernels.py`` (one launcher per direction) and ``csrc/cpu`` (the C++ ops).
The policy (which backend, which op design, the fast-path switch) is ``backends.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.autograd import forward_ad

from . import backends

# =============================================================================================== 1. contract
#
# x: [..., N, D], float32/float16/bfloat16/float64, stride 1 in its last dim (any strides elsewhere), D > 0.
# pe (pos): [N, D] or [1, N, D], broadcast over the leading dims; weight, bias: [D]; all on x's device.
# Result: x's dtype and shape ([..., D] for layer_norm_pool). Statistics and accumulation in float32, float64 for
# float64 x; under CUDA autocast every CUDA input but float64 is taken as float32 (as F.layer_norm does).
# Kernels take x as [B, N, D] and save one statistics buffer [2 * B * N]: the means, then the reciprocal stds.

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOATS = frozenset(FLOAT_DTYPES)
_T = torch.Tensor
_F64 = torch.float64
_F32 = torch.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every backend: float64 for float64 inputs, else float32."""
    return _F64 if dtype == _F64 else _F32


def _check_tensor(name: str, t: object, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are float32, float16, bfloat16 and float64")


def _check_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return float(eps)


def _check_x(x: object) -> torch.Tensor:
    _check_tensor("x", x)
    assert isinstance(x, torch.Tensor)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., N, D], got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim D, got shape {tuple(x.shape)}")
    if x.numel() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"x must have stride 1 in its last dim, got strides {x.stride()} for shape {tuple(x.shape)}")
    return x


def _check_pe(name: str, pe: object, x: torch.Tensor) -> torch.Tensor | None:
    """pe must be [N, D] or [1, N, D] for x of shape [..., N, D]; returns it as [N, D]."""
    _check_tensor(name, pe, optional=True)
    if pe is None:
        return None
    assert isinstance(pe, torch.Tensor)
    n, d = x.shape[-2], x.shape[-1]
    if tuple(pe.shape) not in ((n, d), (1, n, d)):
        raise ValueError(
            f"{name} must have shape [N, D] = [{n}, {d}] or [1, {n}, {d}] to match x of shape {tuple(x.shape)}, "
            f"got {tuple(pe.shape)}"
        )
    _check_device(name, pe, x)
    return pe.reshape(n, d)


def _check_param(name: str, p: object, x: torch.Tensor) -> torch.Tensor:
    _check_tensor(name, p)
    assert isinstance(p, torch.Tensor)
    d = x.shape[-1]
    if tuple(p.shape) != (d,):
        raise ValueError(
            f"{name} must have shape [D] = [{d}] to match x of shape {tuple(x.shape)}, got {tuple(p.shape)}"
        )
    _check_device(name, p, x)
    return p


def _quick_ok(x: object, pe: object, weight: object, bias: object, eps: object, *more_params: object) -> bool:
    """True when every argument is well formed (the common case, screened cheaply). False does not mean invalid,
    only that :func:`_checked` must run (it raises with a message, or accepts)."""
    if type(eps) is not float or not 0.0 <= eps < math.inf:
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


def _checked(x, pe_name, pe, weight, bias, eps):
    """The full argument checks: (x, pe as [N, D] or None, weight, bias, eps as float), or an error naming what is
    wrong."""
    x = _check_x(x)
    pe = _check_pe(pe_name, pe, x)
    weight = _check_param("weight", weight, x)
    bias = _check_param("bias", bias, x)
    return x, pe, weight, bias, _check_eps(eps)


def _cuda_autocast_fp32(*ts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...] | None:
    """The dtype rule under CUDA autocast (as ``F.layer_norm``, and as the registered ops' autocast rule casts): CUDA
    inputs other than float64 cast to float32. None when autocast is off (the first tensor decides)."""
    if not (ts[0].is_cuda and torch.is_autocast_enabled("cuda")):
        return None
    return tuple(t if t is None or t.dtype == _F64 or not t.is_cuda else t.float() for t in ts)


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


# ============================================================================================== 2. reference


def reference_layer_norm_add(
    x: torch.Tensor, pe: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
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


def reference_dual_layer_norm(
    x: torch.Tensor,
    pos: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LN(x) + LN'(pos), LN'(pos))``: a block's norm plus its independently normalised PE."""
    pos_norm = reference_layer_norm_add(pos, None, pos_weight, pos_bias, eps)
    return reference_layer_norm_add(x, pos_norm, weight, bias, eps), pos_norm


def reference_layer_norm_pool(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pe: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """``mean_n(LN(x[..., n, :]) + pe[n])``: the last LayerNorm (plus optional PE) and global average pooling."""
    acc = acc_dtype(x.dtype)
    y = reference_layer_norm_add(x.to(acc), None if pe is None else pe.to(acc), weight, bias, eps)
    return y.mean(-2).to(x.dtype)


def _reference_stats(x3: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xhat, mean, rstd) of x3 over its last dim, in the accumulation dtype, by differentiable ops."""
    xf = x3.to(acc_dtype(x3.dtype))
    mean = xf.mean(-1)
    rstd = torch.rsqrt((xf - mean.unsqueeze(-1)).pow(2).mean(-1) + eps)
    return (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1), mean, rstd


def reference_forward(
    x3: torch.Tensor, pe: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float, pool: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel contract: x3 [B, N, D] -> (y [B, N, D] or pooled [B, D] in x's dtype, stats [2 * B * N]: mean, rstd)."""
    B, N, D = x3.shape
    acc = acc_dtype(x3.dtype)
    xhat, mean, rstd = _reference_stats(x3, eps)
    y = xhat * weight.to(acc) + bias.to(acc)
    if pe is not None:
        y = y + pe.to(acc)
    if pool:
        y = y.mean(1) if N > 0 else torch.zeros(B, D, dtype=acc, device=x3.device)
    return y.to(x3.dtype), torch.cat([mean.reshape(-1), rstd.reshape(-1)])


def reference_backward(
    grad: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor,
    stats: torch.Tensor | None,
    has_pe: bool,
    pool: bool,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel contract: -> (dx [B, N, D] in x's dtype, dpe [N, D] (or [0]), dweight [D], dbias [D]); the last three
    in the accumulation dtype.

    ``stats`` None: the statistics are recomputed from x3 (with ``eps``) by differentiable ops, so that the gradients
    are themselves differentiable in grad, x3 and weight (double backward, ``torch.func``).
    """
    B, N, D = x3.shape
    acc = acc_dtype(x3.dtype)
    xf = x3.to(acc)
    if stats is None:
        xhat, _, rstd = _reference_stats(x3, eps)
        rstd = rstd.unsqueeze(-1)
    else:
        mean = stats[: B * N].to(acc).reshape(B, N, 1)
        rstd = stats[B * N :].to(acc).reshape(B, N, 1)
        xhat = (xf - mean) * rstd
    if pool:
        dy = (grad.to(acc) / max(N, 1)).unsqueeze(1).expand(B, N, D)
    else:
        dy = grad.to(acc)
    wdy = dy * weight.to(acc)
    c1 = (wdy * xhat).mean(-1, keepdim=True)
    c2 = wdy.mean(-1, keepdim=True)
    dx = (wdy - xhat * c1 - c2) * rstd
    dpe = dy.sum(0) if has_pe else dy.new_zeros(0)
    return dx.to(x3.dtype), dpe, (dy * xhat).sum((0, 1)), dy.sum((0, 1))


def reference_jvp(
    x3: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    pool: bool,
    tx: torch.Tensor | None,
    tpe: torch.Tensor | None,
    tw: torch.Tensor | None,
    tb: torch.Tensor | None,
) -> torch.Tensor:
    """The forward-mode derivative of the op at (x3, weight) along the tangents (None: zero), in x's dtype.

    ``LN(x) = xhat * w + b + pe`` with ``xhat = (x - mean) * rstd`` gives
    ``d xhat = rstd * (u - xhat * mean(xhat * u))`` for ``u = tx - mean(tx)``; the statistics are recomputed by
    differentiable ops (higher orders stay exact).
    """
    acc = acc_dtype(x3.dtype)
    xhat, _, rstd = _reference_stats(x3, eps)
    ty = torch.zeros_like(xhat)
    if tx is not None:
        u = tx.to(acc)
        u = u - u.mean(-1, keepdim=True)
        ty = ty + rstd.unsqueeze(-1) * (u - xhat * (xhat * u).mean(-1, keepdim=True)) * weight.to(acc)
    if tw is not None:
        ty = ty + xhat * tw.to(acc)
    if tb is not None:
        ty = ty + tb.to(acc)
    if tpe is not None:
        ty = ty + tpe.to(acc)
    if pool:
        ty = ty.mean(-2) if x3.shape[-2] else ty.sum(-2)
    return ty.to(x3.dtype)


# ======================================================================================== 3. registered ops

_lib = torch.library.Library("mpvg", "DEF")
for _op in ("layer_norm_add", "layer_norm_pool"):
    _lib.define(f"{_op}(Tensor x, Tensor? pe, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)")
    _lib.define(
        f"{_op}_backward(Tensor grad, Tensor x, Tensor weight, Tensor stats, bool has_pe)"
        " -> (Tensor, Tensor, Tensor, Tensor)"
    )


def _fake_forward(pool: bool) -> Callable:
    def fake(x, pe, weight, bias, eps):
        B, N, D = x.shape
        return x.new_empty((B, D) if pool else (B, N, D)), x.new_empty(2 * B * N, dtype=acc_dtype(x.dtype))

    return fake


def _fake_backward(grad, x, weight, stats, has_pe):
    B, N, D = x.shape
    acc = acc_dtype(x.dtype)
    dpe = x.new_empty((N, D) if has_pe else (0,), dtype=acc)
    return x.new_empty(B, N, D), dpe, x.new_empty(D, dtype=acc), x.new_empty(D, dtype=acc)


for _op, _pool in (("layer_norm_add", False), ("layer_norm_pool", True)):
    torch.library.register_fake(f"mpvg::{_op}", _fake_forward(_pool), lib=_lib)
    torch.library.register_fake(f"mpvg::{_op}_backward", _fake_backward, lib=_lib)


def _register_kernels(forward: Callable, backward: Callable, key: str) -> None:
    """Register ``forward(x, pe, weight, bias, eps, pool) -> (out, stats)`` and ``backward(grad, x, weight, stats,
    has_pe, pool) -> (dx, dpe, dweight, dbias)`` as the kernels of both ops for one dispatch key."""
    for op, pool in (("layer_norm_add", False), ("layer_norm_pool", True)):
        _lib.impl(op, lambda x, pe, w, b, eps, _p=pool: forward(x, pe, w, b, eps, _p), key)
        _lib.impl(f"{op}_backward", lambda g, x, w, s, has_pe, _p=pool: backward(g, x, w, s, has_pe, _p), key)


def _triton_forward(x, pe, weight, bias, eps, pool):
    from . import triton_kernels

    out, stats, _ = triton_kernels.forward(x, pe, weight.contiguous(), bias.contiguous(), eps, pool, True)
    return out, stats


def _triton_backward(grad, x, weight, stats, has_pe, pool):
    from . import triton_kernels

    dx, dpe, dw, db = triton_kernels.backward(grad, x, weight.contiguous(), stats, has_pe, pool)
    return dx, (dx.new_empty(0, dtype=dw.dtype) if dpe is None else dpe), dw, db


_register_kernels(_triton_forward, _triton_backward, "CUDA")
if backends.TRITON_INTERPRET:
    # Interpreter mode: CPU tensors run the Triton kernels; the C++ kernels stay unloaded so they cannot shadow them.
    _register_kernels(_triton_forward, _triton_backward, "CPU")
    backends._state["cpp_error"] = "not loaded because TRITON_INTERPRET=1 routes CPU tensors to Triton"
else:
    try:
        from . import _C  # noqa: F401  (registers the C++ CPU kernels of the ops defined above)

        backends._state["cpp_loaded"] = True
        backends._state["cpp_error"] = ""
    except ImportError as exc:  # no compiler at install time, or a build against another torch
        backends._state["cpp_error"] = f"import failed: {exc}"
        _register_kernels(reference_forward, reference_backward, "CPU")

# F.layer_norm runs in float32 under CUDA autocast and in the input dtype under CPU autocast; so do these.
for _op in ("layer_norm_add", "layer_norm_pool"):
    torch.library.register_autocast(f"mpvg::{_op}", "cuda", torch.float32, lib=_lib)


def _registered_ops():
    """The registered ops of the op design in force: ``torch.ops.mpvg``, or ``torch.ops.mpvg_triton`` under the
    ``triton_op`` design (never while exporting: exported programs stay backend-neutral)."""
    if backends.get_op_design() == "triton_op" and not torch.compiler.is_exporting():
        return torch.ops.mpvg_triton
    return torch.ops.mpvg


def _on_op_design(name: str) -> None:
    """Register the ``mpvg_triton::`` ops (``triton_ops.py``) with this op family's autograd, once, when the
    ``triton_op`` design is chosen."""
    if name != "triton_op" or hasattr(torch.ops, "mpvg_triton") and hasattr(torch.ops.mpvg_triton, "layer_norm_add"):
        return
    from . import triton_ops

    for op, pool in (("layer_norm_add", False), ("layer_norm_pool", True)):
        _register_autograd(f"{triton_ops.NAMESPACE}::{op}", pool)
        torch.library.register_autocast(f"{triton_ops.NAMESPACE}::{op}", "cuda", torch.float32)


# ========================================================================================== 4. kernel route

_C = torch._C
_BELOW_AUTOGRAD = _C._AutoDispatchBelowAutograd
#: Tensor types the fast path takes: subclasses (fake, functional, user subclasses) take the registered ops.
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_STATE = backends._state


def _plain_eager(x3: torch.Tensor, pe: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether a call may launch a kernel directly (the eager fast path): switched on, not compiling, exporting or
    tracing, no dispatch or function mode, no ``torch.func`` transform, plain tensors.

    ``torch.compiler.is_compiling()`` comes first: under Dynamo it is a constant True, so nothing else is traced.
    """
    if torch.compiler.is_compiling() or not _STATE["fast_path"]:
        return False
    if (
        _C._len_torch_dispatch_stack()
        or _C._is_torch_function_mode_enabled()
        or _C._are_functorch_transforms_active()
        or _C._get_tracing_state() is not None
    ):
        return False
    if type(x3) not in _PLAIN or type(weight) not in _PLAIN or type(bias) not in _PLAIN:
        return False
    return pe is None or type(pe) in _PLAIN


def _cpp_op(pool: bool, backward: bool):
    op = torch.ops.mpvg.layer_norm_pool if pool else torch.ops.mpvg.layer_norm_add
    if backward:
        op = torch.ops.mpvg.layer_norm_pool_backward if pool else torch.ops.mpvg.layer_norm_add_backward
    return op.default


_tk: list = []  # triton_kernels, imported on first use (importing it needs triton)


def _triton():
    if not _tk:
        from . import triton_kernels

        _tk.append(triton_kernels)
    return _tk[0]


def _kernel_forward(backend, x3, pe, weight, bias, eps, pool, keep_stats):
    """The fused forward: (out, stats or None, the launcher's plan or None).

    ``backend`` ``cpp`` or ``triton``: a plain eager call (:func:`_plain_eager`), launched from the backend's cached
    plan (``stats`` only when ``keep_stats``). None: any other call, through the registered op of the op design in
    force (the dispatcher picks the kernel; the statistics are always returned).
    """
    if backend == "triton":
        return _triton().forward(x3, pe, weight, bias, eps, pool, keep_stats)
    if backend == "cpp":
        with _BELOW_AUTOGRAD():  # straight into the C++ kernel, below the op's own autograd
            out, stats = _cpp_op(pool, False)(x3, pe, weight, bias, eps)
        return out, stats, None
    ops = _registered_ops()
    out, stats = (ops.layer_norm_pool if pool else ops.layer_norm_add)(x3, pe, weight, bias, eps)
    return out, stats, None


def _kernel_backward(backend, grad, x3, weight, stats, has_pe, pool, plan):
    """The backward kernel for :func:`_kernel_forward`'s statistics: (dx, dpe or None, dweight, dbias); ``backend``
    as there."""
    if backend == "triton":
        return _tk[0].backward(grad, x3, weight, stats, has_pe, pool, plan)
    if backend == "cpp":
        with _BELOW_AUTOGRAD():
            dx, dpe, dw, db = _cpp_op(pool, True)(grad.contiguous(), x3, weight, stats, has_pe)
    else:
        ops = _registered_ops()
        op = ops.layer_norm_pool_backward if pool else ops.layer_norm_add_backward
        dx, dpe, dw, db = op(grad.contiguous(), x3, weight, stats, has_pe)
    return dx, (dpe if has_pe else None), dw, db


# ============================================================================================== 5. autograd
#
# One definition for every route. Inputs of the Function: (x3, pe, weight, bias, eps, pool, backend), backend None
# for the registered ops (see _kernel_forward); the registered ops' inputs are the first five (pool is the op's, the
# kernel the dispatcher's). Outputs: (out, stats[, the launcher's plan]).


def _setup_context(ctx, inputs, output, pool=None):
    x3, pe, weight, bias, eps = inputs[:5]
    if pool is None:
        pool, backend = inputs[5], inputs[6]
    else:
        backend = None  # a registered op: its backward is the registered backward op
    stats = output[1]
    ctx.save_for_backward(x3, weight, stats)
    ctx.save_for_forward(x3, weight)
    acc = _F64 if x3.dtype == _F64 else _F32
    ctx.info = (
        eps,
        pool,
        backend,
        len(inputs),
        pe is not None,
        None if pe is None or pe.dtype == acc else pe.dtype,
        None if weight.dtype == acc else weight.dtype,
        None if bias.dtype == acc else bias.dtype,
    )
    ctx.plan = output[2] if len(output) > 2 else None
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *_unused):
    eps, pool, backend, n_inputs, has_pe, pe_cast, w_cast, b_cast = ctx.info
    if grad is None:
        return (None,) * n_inputs
    x3, weight, stats = ctx.saved_tensors
    # The backward must itself be differentiable when a graph of the gradient is being built (create_graph=True), a
    # torch.func transform is active or forward-mode AD is on; a backward traced by compiled autograd takes the
    # registered op.
    graph = _C.is_grad_enabled() and (grad.requires_grad or x3.requires_grad or weight.requires_grad)
    if torch.compiler.is_compiling():
        backend = None
    elif not graph:
        graph = _C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    if graph:  # the reference's differentiable formulas: higher orders stay exact
        dx, dpe, dw, db = reference_backward(grad, x3, weight, None, has_pe, pool, eps)
    else:
        dx, dpe, dw, db = _kernel_backward(backend, grad, x3, weight, stats, has_pe, pool, ctx.plan)
    dpe = None if not has_pe else (dpe if pe_cast is None else dpe.to(pe_cast))
    if w_cast is not None:
        dw = dw.to(w_cast)
    if b_cast is not None:
        db = db.to(b_cast)
    return (dx, dpe, dw, db) + (None,) * (n_inputs - 4)


def _jvp(ctx, tx, tpe, tw, tb, *_unused):
    eps, pool = ctx.info[:2]
    x3, weight = ctx.saved_tensors[:2]
    return reference_jvp(x3, weight, eps, pool, tx, tpe, tw, tb), None, None


def _register_autograd(qualname: str, pool: bool) -> None:
    """This section's autograd as the registered op ``qualname``'s (its backward runs the registered backward op)."""
    torch.library.register_autograd(
        qualname, _backward, setup_context=lambda ctx, inputs, output: _setup_context(ctx, inputs, output, pool)
    )


class _LayerNormFn(torch.autograd.Function):
    """The op with its autograd: ``LN(x3) * weight + bias (+ pe)``, per token or pooled, on a kernel backend."""

    @staticmethod
    def forward(x3, pe, weight, bias, eps, pool, backend):  # type: ignore[override]
        return _kernel_forward(backend, x3, pe, weight, bias, eps, pool, True)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)

    @staticmethod
    def vmap(info, in_dims, x3, pe, weight, bias, eps, pool, backend):  # type: ignore[override]
        """``torch.func.vmap``: a vmapped x folds into the batch (the kernels run once); vmapped parameters take the
        reference's broadcasting formulas."""
        xd, ped, wd, bd = in_dims[:4]
        V = info.batch_size
        x = x3.movedim(xd, 0) if xd is not None else x3.unsqueeze(0).expand(V, *x3.shape)
        _, B, N, D = x.shape
        if ped is None and wd is None and bd is None:
            out, stats, _ = _LayerNormFn.apply(x.reshape(V * B, N, D), pe, weight, bias, eps, pool, backend)
            stats = stats.view(2, V, B * N).transpose(0, 1).reshape(V, 2 * B * N)
            return (out.view(V, B, *out.shape[1:]), stats, None), (0, 0, None)
        acc = acc_dtype(x.dtype)

        def lead(t, d, shape):  # the vmapped parameter as [V, ...] broadcastable against [V, B, N, D]
            t = t.movedim(d, 0) if d is not None else t.unsqueeze(0)
            return t.to(acc).reshape(t.shape[0], *shape)

        xhat, mean, rstd = _reference_stats(x, eps)
        y = xhat * lead(weight, wd, (1, 1, D)) + lead(bias, bd, (1, 1, D))
        if pe is not None:
            y = y + lead(pe, ped, (1, N, D))
        if pool:
            y = y.mean(2) if N else y.sum(2)
        stats = torch.cat([mean.reshape(V, -1), rstd.reshape(V, -1)], 1)
        return (y.to(x.dtype), stats, None), (0, 0, None)


for _op, _pool in (("layer_norm_add", False), ("layer_norm_pool", True)):
    _register_autograd(f"mpvg::{_op}", _pool)
backends._design_hooks.append(_on_op_design)
if _STATE["op_design"] == "triton_op":  # MPVG_OP_DESIGN=triton_op: register the mpvg_triton:: ops now
    _on_op_design("triton_op")

# Function.apply without its Python preamble (default-argument binding, the functorch dispatch): the fast path calls
# it only when no torch.func transform is active.
_apply = _C._FunctionBase.__dict__["apply"].__get__(None, _LayerNormFn)


def _fused(x3, pe, weight, bias, eps, pool, backend):
    """The op on a kernel backend for x3 [B, N, D] (validated): plain eager calls take the fast path (the kernels
    from a cached plan, through the Function when autograd needs the node); ``torch.func`` transforms and forward-mode
    AD the Function; compiling, exporting, tracing and modes the registered ops."""
    if _plain_eager(x3, pe, weight, bias):
        if x3.is_cuda:
            cast = _cuda_autocast_fp32(x3, pe, weight, bias)
            if cast is not None:
                x3, pe, weight, bias = cast
        if (
            _C.is_grad_enabled()
            and (
                x3.requires_grad or weight.requires_grad or bias.requires_grad or (pe is not None and pe.requires_grad)
            )
        ) or forward_ad._current_level >= 0:
            return _apply(x3, pe, weight, bias, eps, pool, backend)[0]
        return _kernel_forward(backend, x3, pe, weight, bias, eps, pool, False)[0]
    if not torch.compiler.is_compiling() and (
        _C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    ):
        cast = _cuda_autocast_fp32(x3, pe, weight, bias)
        if cast is not None:
            x3, pe, weight, bias = cast
        return _LayerNormFn.apply(x3, pe, weight, bias, eps, pool, None)[0]
    ops = _registered_ops()
    return (ops.layer_norm_pool if pool else ops.layer_norm_add)(x3, pe, weight, bias, eps)[0]


# ====================================================================================== 6. public functions


def _run(
    x: torch.Tensor,
    pe: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    pool: bool,
    backend: str | None = None,
) -> torch.Tensor:
    """The op for validated arguments (pe [N, D] or None; x [..., N, D] with N >= 1 when pooling), on ``backend``
    (default: the one resolved for x's device)."""
    if backend is None:
        backend = backends.resolve_backend(x.device)
    if backend == "torch":  # the reference, under the ops' CUDA-autocast rule
        cast = _cuda_autocast_fp32(x, pe, weight, bias)
        if cast is not None:
            with torch.autocast("cuda", enabled=False):
                return _run_reference(*cast, eps, pool)
        return _run_reference(x, pe, weight, bias, eps, pool)
    if pe is not None and not pe.is_contiguous():
        pe = pe.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if not bias.is_contiguous():
        bias = bias.contiguous()
    out = _fused(x if x.dim() == 3 else _as_3d(x), pe, weight, bias, eps, pool, backend)
    if x.dim() == 3:
        return out
    return out.view(*x.shape[:-2], x.shape[-1]) if pool else out.view(x.shape)


def _run_reference(x, pe, weight, bias, eps, pool):
    if pool:
        return reference_layer_norm_pool(x, weight, bias, pe, eps)
    return reference_layer_norm_add(x, pe, weight, bias, eps)


def _layer_norm_add(
    x: torch.Tensor, pe: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """:func:`layer_norm_add` without the argument checks, for callers whose arguments are known to be valid (the
    modules' cached inference path); pe may be None (a plain LayerNorm) and must be [N, D]."""
    return _run(x, pe, weight, bias, eps, False)


def _layer_norm_pool(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pe: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """:func:`layer_norm_pool` without the argument checks (see :func:`_layer_norm_add`); x has N >= 1 tokens."""
    return _run(x, pe, weight, bias, eps, True)


def layer_norm_add(
    x: torch.Tensor, pe: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LayerNorm(x) * weight + bias + pe``.

    x: [..., N, D] with stride 1 in the last dim. pe: [N, D] or [1, N, D], broadcast over the leading dims.
    weight, bias: [D]. Returns a tensor of x's shape and dtype.
    """
    if pe is None:
        raise TypeError("pe is required for layer_norm_add (use torch.nn.functional.layer_norm without it)")
    if not _quick_ok(x, pe, weight, bias, eps):
        x, pe, weight, bias, eps = _checked(x, "pe", pe, weight, bias, eps)
    return _run(x, pe, weight, bias, eps, False)


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
    pos2 = pos
    if not _quick_ok(x, pos, weight, bias, eps, pos_weight, pos_bias):
        x, pos2, weight, bias, eps = _checked(x, "pos", pos, weight, bias, eps)
        pos_weight = _check_param("pos_weight", pos_weight, x)
        pos_bias = _check_param("pos_bias", pos_bias, x)
    backend = backends.resolve_backend(x.device)
    pos_norm = _run(pos2, None, pos_weight, pos_bias, eps, False, backend)
    return _run(x, pos_norm, weight, bias, eps, False, backend), pos_norm.view(pos.shape)


def layer_norm_pool(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pe: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """``mean over tokens of (LayerNorm(x) * weight + bias + pe)``: x [..., N, D] -> [..., D].

    The per-token result is never materialised; pe is optional ([N, D] or [1, N, D]).
    """
    x, pe, weight, bias, eps = _checked(x, "pe", pe, weight, bias, eps)
    if x.shape[-2] == 0:
        raise ValueError(f"layer_norm_pool needs at least one token to average, got x of shape {tuple(x.shape)}")
    return _run(x, pe, weight, bias, eps, True)
