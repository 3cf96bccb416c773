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


def measure(iters: int = 2000, B: int = 4, N: int = 16, D: int = 64) -> dict[str, float]:
    """Microseconds of Python per call: forward (no grad), backward (autograd backward of one layer_norm_add)."""
    _stub_launches()
    torch.set_num_threads(1)
    x = torch.empty(B, N, D, dtype=torch.bfloat16)
    pe = torch.empty(N, D, dtype=torch.bfloat16)
    w = torch.ones(D)
    b = torch.zeros(D)
    out: dict[str, float] = {}
    with mpvg_kernels.use_backend("triton"), torch.no_grad():
        for _ in range(50):
            mpvg_kernels.layer_norm_add(x, pe, w, b)
        t0 = time.perf_counter()
        for _ in range(iters):
            mpvg_kernels.layer_norm_add(x, pe, w, b)
        out["forward_us"] = (time.perf_counter() - t0) / iters * 1e6
    y, mean, rstd = torch.ops.mpvg.layer_norm_add(x, pe, w, b, 1e-6)
    g = torch.empty_like(y)
    with mpvg_kernels.use_backend("triton"):
        for _ in range(50):
            torch.ops.mpvg.layer_norm_add_backward(g, x, w, mean, rstd, True)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.ops.mpvg.layer_norm_add_backward(g, x, w, mean, rstd, True)
        out["backward_us"] = (time.perf_counter() - t0) / iters * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = measure(a.iters)
    print(
        f"host overhead per call (launch stubbed): forward {res['forward_us']:.1f} us, "
        f"backward op {res['backward_us']:.1f} us"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
