"""Host (Python) overhead per call of the Triton-backed ops, with the kernel launches stubbed out.

Runs on CPU under the Triton interpreter's dispatch (``TRITON_INTERPRET=1`` routes CPU tensors to the Triton
launchers) with ``Launch.__call__`` replaced by a no-op, so what is timed is everything the package does in
Python before and around the kernels: argument checks, backend resolution, the dispatcher, planning, buffer
allocation, the partial-sum finish, and autograd bookkeeping for the backward. On a GPU the same code runs,
plus the launch itself (a few microseconds per kernel in Triton's launcher).

    PYTHONPATH=. python benchmarks/host_overhead.py [--iters 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton / mpvg_kernels are imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

import mpvg_kernels  # noqa: E402
from mpvg_kernels.ops import triton_kernels as tk  # noqa: E402


def _stub_launches() -> None:
    tk.Launch.__call__ = lambda self: None  # type: ignore[method-assign]


def _best_us(fn, iters: int, repeats: int = 5) -> float:
    """Best (least disturbed) of ``repeats`` timings of ``iters`` calls, in microseconds per call."""
    for _ in range(min(iters, 100)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def measure(iters: int = 2000, B: int = 4, N: int = 16, D: int = 64) -> dict[str, float]:
    """Microseconds of Python per call with the launches stubbed (best of 5).

    forward_us: the public ``layer_norm_add`` under no_grad (checks, dispatch, custom op, planning, allocation);
    backward_us: the ``mpvg::layer_norm_add_backward`` op (planning, allocation, the partial-sum finish);
    plan_forward_us / plan_backward_us: the launchers' planning alone; empty_us: one ``torch.empty`` (a unit
    for comparing machines).
    """
    _stub_launches()
    torch.set_num_threads(1)
    x = torch.empty(B, N, D, dtype=torch.bfloat16)
    pe = torch.empty(N, D, dtype=torch.bfloat16)
    w = torch.ones(D)
    b = torch.zeros(D)
    out: dict[str, float] = {}
    out["empty_us"] = _best_us(lambda: torch.empty(B * N), iters)
    with mpvg_kernels.use_backend("triton"), torch.no_grad():
        out["forward_us"] = _best_us(lambda: mpvg_kernels.layer_norm_add(x, pe, w, b), iters)
    y, mean, rstd = torch.ops.mpvg.layer_norm_add(x, pe, w, b, 1e-6)
    g = torch.empty_like(y)
    out["backward_us"] = _best_us(lambda: torch.ops.mpvg.layer_norm_add_backward(g, x, w, mean, rstd, True), iters)
    out["plan_forward_us"] = _best_us(lambda: tk.plan_forward(x, pe, w, b, 1e-6, False), iters)
    out["plan_backward_us"] = _best_us(lambda: tk.plan_backward(g, x, w, mean, rstd, True, False), iters)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = measure(a.iters)
    print("host overhead per call (launches stubbed, best of 5): " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
