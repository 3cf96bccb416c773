"""The ops' layout: one readable route per op (a call enters each file once), one autograd definition serving every
route, and no import circle in ``mpvg_kernels/ops`` (the policy module imports no kernel module)."""

from __future__ import annotations

import ast
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import mpvg_kernels as mk
from mpvg_kernels.ops import backends
from mpvg_kernels.ops import layer_norm as LN

OPS_DIR = Path(LN.__file__).resolve().parent
PKG = str(Path(mk.__file__).resolve().parent)


def _frames(fn) -> list[tuple[str, str, bool]]:
    """(file relative to the package, function, entered from another file) of every Python call into the package."""
    events = []

    def prof(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(PKG):
            return
        f = frame.f_code.co_filename
        back = frame.f_back
        events.append((os.path.relpath(f, PKG), frame.f_code.co_name, back is None or back.f_code.co_filename != f))

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return events


@pytest.mark.skipif(not backends.cpp_status()[0], reason="the C++ extension is not loaded")
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("op", ["layer_norm_add", "dual_layer_norm", "layer_norm_pool"])
def test_one_call_enters_each_file_once(op, grad):
    """From the public function to the kernel call (eager, cpp): no file of the package is entered twice."""
    x, pe, w, b = torch.randn(2, 4, 8), torch.randn(4, 8), torch.randn(8), torch.randn(8).requires_grad_(grad)
    call = {
        "layer_norm_add": lambda: mk.layer_norm_add(x, pe, w, b),
        "dual_layer_norm": lambda: mk.dual_layer_norm(x, pe, w, b, w, b),
        "layer_norm_pool": lambda: mk.layer_norm_pool(x, w, b, pe),
    }[op]
    call()  # warm: first calls may import
    events = _frames(call)
    entered = Counter(f for f, _, entry in events if entry)
    assert events and events[0][:2] == ("ops/layer_norm.py", op), events
    assert all(n == 1 for n in entered.values()), f"{op}: files entered more than once: {entered}\n{events}"
    assert set(entered) == {"ops/layer_norm.py", "ops/backends.py"}, entered


def _imports(path: Path) -> set[str]:
    """Modules of mpvg_kernels.ops that ``path`` imports, at any depth (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mpvg_kernels.ops."):
            found.add(node.module.split(".")[2])
    return {m for m in found if (OPS_DIR / f"{m}.py").exists()}


def test_ops_imports_form_no_circle_and_the_policy_imports_no_kernel_module():
    graph = {p.stem: _imports(p) for p in OPS_DIR.glob("*.py")}
    assert graph["backends"] == set(), graph["backends"]

    def visit(node, stack):
        assert node not in stack, f"import circle: {' -> '.join([*stack, node])}"
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node])

    for start in graph:
        visit(start, [])



def test_one_backward_body_serves_every_route(op_log):
    """The eager Function and the registered ops' autograd (taken under a dispatch mode, as under compile/export) run
    the same backward function; a Function is the only autograd.Function in ops/."""
    assert LN._LayerNormFn.backward is LN._backward and LN._LayerNormFn.jvp is LN._jvp
    functions = [
        n.name for p in OPS_DIR.glob("*.py") for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)
        and any(ast.unparse(base).endswith("autograd.Function") for base in n.bases)
    ]  # fmt: skip
    assert functions == ["_LayerNormFn"], functions
    x, pe, w, b = (torch.randn(s, requires_grad=True) for s in ((2, 4, 8), (4, 8), (8,), (8,)))
    routes = {}
    for route in ("eager", "registered"):
        events = []
        if route == "eager":
            y = mk.layer_norm_add(x, pe, w, b)
            events = _frames(lambda y=y: y.sum().backward())
        else:
            with op_log() as log:
                y = mk.layer_norm_add(x, pe, w, b)
                events = _frames(lambda y=y: y.sum().backward())
            assert "mpvg.layer_norm_add.default" in log.ops and "mpvg.layer_norm_add_backward.default" in log.ops
        routes[route] = [(f, n) for f, n, _ in events if f == "ops/layer_norm.py"]
    for route, frames in routes.items():
        assert ("ops/layer_norm.py", "_backward") in frames, (route, frames)
