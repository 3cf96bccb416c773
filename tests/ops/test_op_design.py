"""The two op designs (``backends.set_op_design``): opaque ``mpvg::`` custom ops (default) and the
``torch.library.triton_op`` route (``mpvg_triton::``). On CPU: both register, trace with fake tensors and
``torch.compile(fullgraph=True)``, pass ``opcheck``, and reach the C++ kernels; the triton_op's CUDA branch is traced
with fake CUDA tensors to check that it decomposes into the Triton kernels (what Inductor then sees)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

import mpvg_kernels
from mpvg_kernels.ops import backends, get_op_design, set_op_design, use_op_design

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
DESIGNS = ("opaque", "triton_op")
NS = {"opaque": "mpvg", "triton_op": "mpvg_triton"}

needs_cpp = pytest.mark.skipif(not backends.cpp_status()[0], reason="the C++ extension is not loaded")


@pytest.fixture(autouse=True)
def _restore_design():
    old = get_op_design()
    yield
    backends._state["op_design"] = old


def _inputs(requires_grad=False, device="cpu", B=2, N=4, D=8, seed=0):
    if device != "cpu":  # fake CUDA tensors (under a FakeTensorMode): no data to fill
        return [torch.empty(s, device=device) for s in ((B, N, D), (N, D), (D,), (D,))]
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, N, D, generator=g), torch.randn(N, D, generator=g)]
    ts += [1 + 0.2 * torch.randn(D, generator=g), 0.2 * torch.randn(D, generator=g)]
    return [t.to(device).requires_grad_(requires_grad) for t in ts]


def test_both_designs_register():
    set_op_design("triton_op")
    for ns in NS.values():
        ops = getattr(torch.ops, ns)
        for name in ("layer_norm_add", "layer_norm_pool", "layer_norm_add_backward", "layer_norm_pool_backward"):
            assert hasattr(ops, name), f"{ns}::{name} not registered"
    assert get_op_design() == "triton_op"
    with use_op_design("opaque"):
        assert get_op_design() == "opaque"
    assert get_op_design() == "triton_op"


def test_switch_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown op design 'fast'"):
        set_op_design("fast")
    with pytest.raises(TypeError, match="op design must be a str"):
        set_op_design(1)
    monkeypatch.setattr(backends, "_TRITON_FOUND", False)
    with pytest.raises(RuntimeError, match="needs triton"):
        set_op_design("triton_op")


def test_environment_variable_selects_the_design():
    env = dict(os.environ, MPVG_OP_DESIGN="triton_op", PYTHONPATH=str(ROOT))
    code = (
        "import torch, mpvg_kernels; "
        "print(mpvg_kernels.ops.get_op_design(), hasattr(torch.ops.mpvg_triton, 'layer_norm_add'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["triton_op", "True"], out.stderr[-2000:]
    env["MPVG_OP_DESIGN"] = "bogus"  # no traceback at import; the error names the variable where the design is used
    code = (
        "import torch, mpvg_kernels\n"
        "x, pe, w = torch.randn(2, 4, 8), torch.randn(4, 8), torch.randn(8)\n"
        "print(mpvg_kernels.layer_norm_add(x, pe, w, w).shape)\n"
        "try:\n    torch.compile(mpvg_kernels.layer_norm_add, backend='eager')(x, pe, w, w)\n"
        "except Exception as e:\n    print('ERR', e)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2, 4, 8])" in out.stdout and "MPVG_OP_DESIGN='bogus' is not an op design" in out.stdout


@needs_cpp
@pytest.mark.parametrize("design", DESIGNS)
def test_opcheck(design):
    set_op_design(design)
    ops = getattr(torch.ops, NS[design])
    x, pe, w, b = _inputs(requires_grad=True)
    with torch.no_grad():
        y, stats = ops.layer_norm_add(x, pe, w, b, 1e-6)
    torch.library.opcheck(ops.layer_norm_add, (x, pe, w, b, 1e-6))
    torch.library.opcheck(ops.layer_norm_pool, (x, pe, w, b, 1e-6))
    torch.library.opcheck(ops.layer_norm_pool, (x, None, w, b, 1e-6))
    g = torch.randn_like(y)
    args = (g, x.detach(), w.detach(), stats, True)
    torch.library.opcheck(ops.layer_norm_add_backward, args)
    gp = torch.randn(2, 8)
    torch.library.opcheck(ops.layer_norm_pool_backward, (gp, *args[1:]))


@needs_cpp
def test_designs_agree_eagerly_and_reach_the_cpp_kernels():
    """The triton_op body on CPU is the opaque op: same values and gradients, bitwise."""
    x, pe, w, b = _inputs(requires_grad=True, seed=3)
    res = []
    for design in DESIGNS:
        set_op_design(design)
        y = getattr(torch.ops, NS[design]).layer_norm_add(x, pe, w, b, 1e-6)[0]
        res.append((y, *torch.autograd.grad(y, (x, pe, w, b), torch.ones_like(y))))
    for a, c in zip(*res, strict=True):
        assert torch.equal(a, c)


def _capture_backend(graphs: dict):
    """A torch.compile backend recording Dynamo's graph and the AOT forward/backward graphs, run eagerly."""
    from torch._dynamo.backends.common import aot_autograd

    def fw(gm, _):
        graphs.setdefault("aot", []).append(gm.code)
        return gm.forward

    aot = aot_autograd(fw_compiler=fw, bw_compiler=fw)

    def backend(gm, example_inputs):
        graphs.setdefault("dynamo", []).append(gm.code)
        return aot(gm, example_inputs)

    return backend


@needs_cpp
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_compile_fullgraph_on_cpu(design, train):
    """torch.compile(fullgraph=True) through the public ops: Dynamo records the design's op; on CPU the AOT graphs
    hold the opaque mpvg:: ops (C++ kernels) in both designs; results equal eager."""
    set_op_design(design)
    graphs: dict = {}
    torch._dynamo.reset()

    def f(x, pe, w, b, pw, pb):
        y, p = mpvg_kernels.dual_layer_norm(x, pe, w, b, pw, pb)
        return mpvg_kernels.layer_norm_pool(y, w, b, p)

    cf = torch.compile(f, backend=_capture_backend(graphs), fullgraph=True)
    x, pe, w, b = _inputs(requires_grad=train, seed=5)
    pw, pb = (w.detach().clone().requires_grad_(train), b.detach().clone().requires_grad_(train))
    args = (x, pe, w, b, pw, pb)
    with torch.set_grad_enabled(train):
        out = cf(*args)
        ref = f(*args)
    assert torch.equal(out, ref)
    if train:
        g1 = torch.autograd.grad(out.sum(), args)
        g2 = torch.autograd.grad(ref.sum(), args)
        for a, c in zip(g1, g2, strict=True):
            assert torch.equal(a, c)
    assert f"{NS[design]}.layer_norm_add" in graphs["dynamo"][0], graphs["dynamo"][0]
    assert f"{NS[design]}.layer_norm_pool" in graphs["dynamo"][0]
    aot = "\n".join(graphs["aot"])
    assert "mpvg.layer_norm_add.default" in aot and "mpvg.layer_norm_pool.default" in aot, aot
    assert "mpvg_triton" not in aot and "triton_kernel_wrapper" not in aot
    if train:
        assert "mpvg.layer_norm_add_backward.default" in aot and "mpvg.layer_norm_pool_backward.default" in aot, aot
    torch._dynamo.reset()


@pytest.mark.parametrize("design", DESIGNS)
def test_fake_tensors_trace_both_designs(design):
    set_op_design(design)
    ops = getattr(torch.ops, NS[design])
    with FakeTensorMode():
        for device in ("cpu", "cuda"):
            x, pe, w, b = _inputs(device=device)
            y, stats = ops.layer_norm_add(x, pe, w, b, 1e-6)
            assert y.shape == x.shape and y.device == x.device and stats.shape == (16,)
            out = ops.layer_norm_pool(x, None, w, b, 1e-6)[0]
            assert out.shape == (2, 8)
            dx, dpe, dw, db = ops.layer_norm_add_backward(y, x, w, stats, True)
            assert dx.shape == x.shape and dpe.shape == pe.shape and dw.shape == w.shape
    gm = make_fx(lambda *t: mpvg_kernels.layer_norm_add(*t), tracing_mode="fake")(*_inputs())
    assert f"{NS[design]}.layer_norm_add" in gm.code or "mpvg.layer_norm_add" in gm.code, gm.code


def _functional_graph(fn, device):
    fm = FakeTensorMode()
    with fm:
        args = _inputs(device=device)
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)  # no driver here
    with fm:
        return make_fx(dispatch_functionalize(fn), tracing_mode="real")(*args).code


def test_triton_op_decomposes_into_triton_kernels_on_cuda():
    """What AOTAutograd hands Inductor (functionalised trace, fake tensors): on CUDA the triton_op becomes the
    launcher's Triton kernels (forward kernel; backward kernel and the partial-sum finish), no opaque node; on CPU
    it stays the opaque mpvg:: op. The opaque design keeps one mpvg:: node on both."""
    set_op_design("triton_op")
    fwd = lambda x, pe, w, b: torch.ops.mpvg_triton.layer_norm_add(x, pe, w, b, 1e-6)[0]  # noqa: E731

    def bwd(x, pe, w, b):
        y, stats = torch.ops.mpvg_triton.layer_norm_add(x, pe, w, b, 1e-6)
        return torch.ops.mpvg_triton.layer_norm_add_backward(y, x, w, stats, True)

    code = _functional_graph(fwd, "cuda")
    assert "triton_kernel_wrapper_functional" in code and "mpvg." not in code, code
    assert code.count("triton_kernel_wrapper_functional(") == 1  # one forward launch at this shape
    code = _functional_graph(bwd, "cuda")
    assert code.count("triton_kernel_wrapper_functional(") == 3, code  # forward, backward, finish
    code = _functional_graph(fwd, "cpu")
    assert "mpvg.layer_norm_add.default" in code and "triton_kernel_wrapper" not in code, code
    opaque = _functional_graph(lambda x, pe, w, b: torch.ops.mpvg.layer_norm_add(x, pe, w, b, 1e-6)[0], "cuda")
    assert "mpvg.layer_norm_add.default" in opaque and "triton_kernel_wrapper" not in opaque


@needs_cpp
def test_export_keeps_the_opaque_ops_in_both_designs():
    set_op_design("triton_op")

    class M(torch.nn.Module):
        def forward(self, x, pe, w, b):
            return mpvg_kernels.layer_norm_add(x, pe, w, b)

    ep = torch.export.export(M(), tuple(_inputs()))
    code = ep.graph_module.code
    assert "mpvg.layer_norm_add.default" in code and "mpvg_triton" not in code, code


def test_eager_calls_take_the_fast_path_in_both_designs():
    for design in DESIGNS:
        set_op_design(design)
        y = mpvg_kernels.layer_norm_add(*_inputs(requires_grad=True))
        expect = "_LayerNormFnBackward" if backends.cpp_status()[0] and backends.eager_fast_path_enabled() else None
        if expect:
            assert type(y.grad_fn).__name__ == expect
