"""Host (Python) overhead per call of the Triton-backed ops, with the kernel launches stubbed out: the registered
``mpvg::`` op path next to the eager fast path, in one run.

Runs on CPU under the Triton interpreter's dispatch (``TRITON_INTERPRET=1`` routes CPU tensors to the Triton
launchers) with ``triton_kernels.run_kernel`` (every launch) replaced by a no-op, so what is timed is everything
the package does in Python before and around the kernels: argument checks, backend resolution, the dispatcher
and torch.library's autograd layer (registered path only), the launchers' cached plan lookup, buffer allocation,
the partial-sum finish, and the autograd bookkeeping of the backward node. On a GPU the same code runs, plus the
launches themselves (Triton's launcher, a few microseconds per kernel). The two paths of each row are timed in
alternating rounds.

    PYTHONPATH=. python benchmarks/host_overhead.py [--iters 1000] [--json out.json] [--dry-run]

Rows (microseconds per call, best of 20 repeats of ``--iters`` calls):

- ``forward``: the public ``layer_norm_add`` under ``torch.no_grad`` (the inference call);
- ``backward``: one call of the autograd node the training forward leaves on its output (``grad_fn.apply``:
  the backward's Python, planning, allocation and launches; the engine's own C++ work is the same for both paths);
- ``backward_op``: the layer below that node: the ``mpvg::layer_norm_add_backward`` op (registered path) or the
  backward launcher ``triton_kernels.backward`` with the forward's plan as ``hint``, as the eager path calls it;
- ``forward_grad``: the public ``layer_norm_add`` with inputs that require grad (records the autograd node);
- ``train``: ``forward_grad`` plus ``torch.autograd.grad`` through the engine (everything a training step pays);
- ``backward_bf16_pe``: ``backward`` with a bfloat16 pe, whose float32 gradient is converted by a separate tensor
  op on both paths;
- ``launcher_forward`` / ``launcher_backward``: the launchers alone as the registered ops' kernels call them
  (``triton_kernels.forward`` keeping the statistics, ``backward`` without a hint) with a no-op ``launch``: the
  cached plan lookup, the allocations and the argument tuples; ``empty``: one ``torch.empty`` (a unit for
  comparing machines).

x is bfloat16 [4, 16, 64]; pe, weight and bias float32 (the parameters' dtype in mixed precision) unless stated.
The target is ``forward`` and ``backward`` <= 10 us on the eager path.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

if os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton / mpvg_kernels are imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

import mpvg_kernels  # noqa: E402
from mpvg_kernels.ops import triton_kernels as tk  # noqa: E402
from mpvg_kernels.ops import use_eager_fast_path  # noqa: E402

PATHS = ("registered", "eager")
ROWS = ("forward", "backward", "backward_op", "forward_grad", "train", "backward_bf16_pe")
TARGET_US = 10.0


def _no_launch(kernel, grid, args, meta) -> None:
    """A launch that launches nothing."""


def _stub_launches() -> None:
    tk.run_kernel = _no_launch  # the launchers' default launch: every launch of both paths goes through it


class Call(NamedTuple):
    """A timed call: ``fn()`` on one path (the eager fast path on or off), with or without grad mode."""

    fn: Callable[[], object]
    path: str = "eager"
    grad: bool = True

    def context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(use_eager_fast_path(self.path == "eager"))
        stack.enter_context(torch.set_grad_enabled(self.grad))
        return stack


def _best_us_interleaved(calls: dict[str, Call], iters: int, rounds: int = 20) -> dict[str, float]:
    """Per candidate, the best (least disturbed) of ``rounds`` timings of ``iters`` calls, in microseconds of this
    thread's CPU time per call. The candidates take turns round by round, so a disturbance from other processes
    on a shared machine (which lasts longer than one timing) lands on all of them alike; the garbage collector is
    off while timing; the path and grad mode are set around each timing, not each call."""
    for call in calls.values():
        with call.context():
            for _ in range(min(iters, 100)):
                call.fn()
    best = dict.fromkeys(calls, float("inf"))
    gc.collect()
    gc.disable()  # a collection inside a timing would be charged to whichever candidate happens to trigger it
    try:
        for r in range(rounds):
            names = list(calls)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                fn = calls[name].fn
                with calls[name].context():
                    t0 = time.thread_time()
                    for _ in range(iters):
                        fn()
                    best[name] = min(best[name], (time.thread_time() - t0) / iters * 1e6)
    finally:
        gc.enable()
    return best


def _node_call(leaves):
    """(the autograd node of a training forward, the gradients its ``apply`` takes)."""
    y = mpvg_kernels.layer_norm_add(*leaves)
    # Both nodes take one gradient per tensor output of their op, (y, stats), as the engine calls them.
    return y.grad_fn, (torch.ones_like(y), None)


def _row_fns(path: str, x, pe, w, b, leaves, leaves_bf16_pe) -> dict[str, Call]:
    """The calls of every row on one path, set up on that path."""
    fns: dict[str, Call] = {}
    with use_eager_fast_path(path == "eager"):
        fns["forward"] = Call(lambda: mpvg_kernels.layer_norm_add(x, pe, w, b), path, grad=False)
        node, grads = _node_call(leaves)
        registered_node = type(node).__name__.startswith("GeneratedBackwardFor_mpvg")
        assert registered_node == (path == "registered"), f"the {path} path recorded {type(node).__name__}"
        fns["backward"] = Call(lambda: node.apply(*grads), path, grad=False)
        g = grads[0]
        with torch.no_grad():
            if path == "registered":
                _, stats = torch.ops.mpvg.layer_norm_add(x, pe, w, b, 1e-6)
                op = torch.ops.mpvg.layer_norm_add_backward
                fns["backward_op"] = Call(lambda: op(g, x, w, stats, True), path, grad=False)
            else:  # as the eager path's backward calls the launcher: with the forward's plan as hint
                _, stats, plan = tk.forward(x, pe, w, b, 1e-6, False, True)
                fns["backward_op"] = Call(lambda: tk.backward(g, x, w, stats, True, False, plan), path, grad=False)
        fns["forward_grad"] = Call(lambda: mpvg_kernels.layer_norm_add(*leaves), path)
        fns["train"] = Call(lambda: torch.autograd.grad(mpvg_kernels.layer_norm_add(*leaves), leaves, g), path)
        node16, grads16 = _node_call(leaves_bf16_pe)
        fns["backward_bf16_pe"] = Call(lambda: node16.apply(*grads16), path, grad=False)
    return fns


def measure(iters: int = 1000, B: int = 4, N: int = 16, D: int = 64) -> dict[str, dict[str, float]]:
    """Microseconds of Python per call with the launches stubbed: ``{path: {row: us}}`` for the registered and
    the eager path (each row's two candidates timed in alternating rounds), plus ``{"common": {...}}`` (the
    launchers alone with a no-op launch, one ``torch.empty``)."""
    _stub_launches()
    torch.set_num_threads(1)
    x = torch.randn(B, N, D).to(torch.bfloat16)
    pe = torch.randn(N, D)
    w = torch.ones(D)
    b = torch.zeros(D)
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in (x, pe, w, b))
    leaves_bf16_pe = tuple(t.detach().clone().requires_grad_(True) for t in (x, pe.to(torch.bfloat16), w, b))
    res: dict[str, dict[str, float]] = {path: {} for path in PATHS}
    with mpvg_kernels.use_backend("triton"):
        fns = {path: _row_fns(path, x, pe, w, b, leaves, leaves_bf16_pe) for path in PATHS}
        for row in ROWS:
            n = max(1, iters // 2) if row == "train" else iters
            best = _best_us_interleaved({path: fns[path][row] for path in PATHS}, n)
            for path in PATHS:
                res[path][row] = best[path]
    y, stats = torch.ops.mpvg.layer_norm_add(x, pe, w, b, 1e-6)
    g = torch.empty_like(y)
    res["common"] = _best_us_interleaved(
        {
            "empty": Call(lambda: torch.empty(B * N)),
            "launcher_forward": Call(lambda: tk.forward(x, pe, w, b, 1e-6, False, True, _no_launch)),
            "launcher_backward": Call(lambda: tk.backward(g, x, w, stats, True, False, None, _no_launch)),
        },
        iters,
    )
    return res


def report(res: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per measurement, the two paths side by side."""
    lines = [
        "host overhead per call in us (launches stubbed, best of 20, thread CPU time; bf16 x [4, 16, 64], fp32 pe "
        "and params; triton launchers)",
        f"{'':<14}{'registered':>12}{'eager':>10}{'speed-up':>10}",
    ]
    for row in ROWS:
        r, e = res["registered"][row], res["eager"][row]
        mark = "" if row not in ("forward", "backward") else ("  <= 10 us" if e <= TARGET_US else "  > 10 us")
        lines.append(f"{row:<14}{r:>12.1f}{e:>10.1f}{r / e:>9.1f}x{mark}")
    lines.append("common: " + ", ".join(f"{k} {v:.1f}" for k, v in res["common"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=1000, help="calls per timing; the best of 20 timings is reported")
    p.add_argument("--json", default=None)
    p.add_argument("--dry-run", action="store_true", help="a few iterations only: checks that the script runs")
    a = p.parse_args(argv)
    res = measure(5 if a.dry_run else a.iters)
    print(report(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
