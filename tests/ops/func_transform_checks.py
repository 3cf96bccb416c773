"""Forward-mode AD and ``torch.func`` through every op and module, on one kernel backend, against the ``torch`` backend.

Transforms: ``jvp``, ``jacfwd``, ``torch.autograd.forward_ad``, ``grad``, ``jacrev``, ``vmap`` (of x alone, and of
every input), ``hessian``; subjects: ``layer_norm_add``, ``dual_layer_norm``, ``layer_norm_pool``, ``DualLayerNorm``,
``LastLayerNormPE`` (per token and pooled), in float32 and float64, differentiating with respect to every input.

Imported by ``test_func_transforms.py`` (the ``cpp`` backend, in process) and run as a script under
``TRITON_INTERPRET=1`` for the ``triton`` backend (``python func_transform_checks.py triton``), which prints one line
per failure and ``ALL OK`` at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

import mpvg_kernels as mk

DTYPES = (torch.float32, torch.float64)
TOL = {torch.float32: 2e-4, torch.float64: 1e-9}
B, N, D = 2, 3, 5


def _inputs(dtype: torch.dtype, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x [B, N, D], pos [N, D], then k weight/bias-like [D] vectors (weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    pos = torch.randn(N, D, generator=g, dtype=torch.float64)
    vecs = [(1 + 0.3 * torch.randn(D, generator=g, dtype=torch.float64)) if i % 2 == 0 else
            0.3 * torch.randn(D, generator=g, dtype=torch.float64) for i in range(k)]  # fmt: skip
    return tuple(t.to(dtype) for t in (x, pos, *vecs))


def _module_fn(module: torch.nn.Module, **kw) -> Callable:
    names = [n for n, _ in module.named_parameters()]

    def fn(x, pos, *params):
        return functional_call(module, dict(zip(names, params, strict=True)), (x, pos), kw)

    return fn


def subjects(dtype: torch.dtype) -> dict[str, tuple[Callable, tuple[torch.Tensor, ...]]]:
    """name -> (function of tensors, its inputs)."""
    x, pos, w, b, pw, pb = _inputs(dtype, 4)
    dual = mk.DualLayerNorm(D, dtype=dtype)
    last = mk.LastLayerNormPE(D, dtype=dtype)
    return {
        "layer_norm_add": (lambda x, pe, w, b: mk.layer_norm_add(x, pe, w, b), (x, pos, w, b)),
        "dual_layer_norm": (lambda *t: mk.dual_layer_norm(*t), (x, pos, w, b, pw, pb)),
        "layer_norm_pool": (lambda x, pe, w, b: mk.layer_norm_pool(x, w, b, pe), (x, pos, w, b)),
        "DualLayerNorm": (_module_fn(dual), (x, pos, w, b, pw, pb)),
        "LastLayerNormPE": (_module_fn(last), (x, pos, w, b, pw, pb)),
        "LastLayerNormPE_pool": (_module_fn(last, pool=True), (x, pos, w, b, pw, pb)),
    }


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _scalar(fn: Callable, args: tuple, cot_seed: int = 7) -> Callable:
    """sum(out * fixed cotangent) over every output: a scalar function of the same inputs."""
    cots = []
    for i, o in enumerate(_as_tuple(fn(*args))):
        g = torch.Generator().manual_seed(cot_seed + i)
        cots.append(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype))

    def f(*a):
        return sum((o * c).sum() for o, c in zip(_as_tuple(fn(*a)), cots, strict=True))

    return f


def _forward_ad(fn: Callable, args: tuple, tangents: tuple) -> tuple:
    with fwAD.dual_level():
        outs = _as_tuple(fn(*(fwAD.make_dual(a, t) for a, t in zip(args, tangents, strict=True))))
        res = tuple(fwAD.unpack_dual(o).tangent for o in outs)
    if any(t is None for t in res):
        raise AssertionError("forward_ad gave no tangent (None) for an output")
    return res


def transforms(fn: Callable, args: tuple) -> dict[str, Callable[[], object]]:
    """name -> a thunk computing the transform of fn at args (all inputs differentiated)."""
    argnums = tuple(range(len(args)))
    g = torch.Generator().manual_seed(3)
    tangents = tuple(torch.randn(a.shape, generator=g, dtype=torch.float64).to(a.dtype) for a in args)
    V = 3
    batched = tuple(torch.stack([a * (1 + 0.1 * v) for v in range(V)]) for a in args)
    scalar = _scalar(fn, args)
    return {
        "jvp": lambda: torch.func.jvp(fn, args, tangents),
        "forward_ad": lambda: _forward_ad(fn, args, tangents),
        "jacfwd": lambda: torch.func.jacfwd(fn, argnums=argnums)(*args),
        "grad": lambda: torch.func.grad(scalar, argnums=argnums)(*args),
        "jacrev": lambda: torch.func.jacrev(fn, argnums=argnums)(*args),
        "vmap_x": lambda: torch.func.vmap(fn, in_dims=(0,) + (None,) * (len(args) - 1))(batched[0], *args[1:]),
        "vmap_all": lambda: torch.func.vmap(fn)(*batched),
        "hessian": lambda: torch.func.hessian(scalar, argnums=(0, 2))(*args),
    }


def _compare(got, want, tol: float, where: str) -> list[str]:
    g_leaves, _ = torch.utils._pytree.tree_flatten(got)
    w_leaves, _ = torch.utils._pytree.tree_flatten(want)
    if len(g_leaves) != len(w_leaves):
        return [f"{where}: {len(g_leaves)} results, the torch backend gives {len(w_leaves)}"]
    errors = []
    for i, (a, c) in enumerate(zip(g_leaves, w_leaves, strict=True)):
        if not isinstance(a, torch.Tensor) or a.shape != c.shape or a.dtype != c.dtype:
            errors.append(f"{where}[{i}]: got {type(a).__name__} {getattr(a, 'shape', '')}, want {tuple(c.shape)}")
            continue
        err = (a.double() - c.double()).abs().max().item() if a.numel() else 0.0
        scale = max(1.0, c.double().abs().max().item() if c.numel() else 0.0)
        if not err <= tol * scale:
            errors.append(f"{where}[{i}]: max error {err:.3g} (scale {scale:.3g}, |got| {a.double().norm():.4g}, "
                          f"|want| {c.double().norm():.4g})")  # fmt: skip
    return errors


def check(backend: str, dtype: torch.dtype) -> list[str]:
    """Every transform of every subject on ``backend`` against the torch backend; the list of failures."""
    failures = []
    for name, (fn, args) in subjects(dtype).items():
        with mk.use_backend("torch"):
            want = {t: thunk() for t, thunk in transforms(fn, args).items()}
        with mk.use_backend(backend):
            for t, thunk in transforms(fn, args).items():
                where = f"{backend} {str(dtype).removeprefix('torch.')} {name} {t}"
                try:
                    got = thunk()
                except Exception as exc:  # noqa: BLE001 (reported, not hidden)
                    failures.append(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                failures += _compare(got, want[t], TOL[dtype], where)
    return failures


if __name__ == "__main__":
    be = sys.argv[1]
    failed = [f for dt in DTYPES for f in check(be, dt)]
    for line in failed:
        print("FAIL", line)
    print("ALL OK" if not failed else f"{len(failed)} FAILED")
    sys.exit(1 if failed else 0)
