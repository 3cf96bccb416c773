"""The eager fast path (``ops/layer_norm.py``, section 4) on CPU with the C++ backend: bitwise the registered ops'
results (forward, inference and every gradient), taken only in plain eager mode, and the registered ``mpvg::`` ops
everywhere else (dispatch modes, fake tensors, make_fx, torch.compile). The Triton launchers' fast path is checked
the same way under the Triton interpreter (``triton_interp_checks.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import mpvg_kernels
from mpvg_kernels.ops import backends
from mpvg_kernels.ops import layer_norm as LN

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not backends.cpp_status()[0], reason="the C++ extension is not loaded: no kernel backend serves CPU tensors"
)


def _x(shape, dtype, layout, gen):
    *lead, n, d = shape
    if layout == "contiguous":
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    elif layout == "slice":
        x = torch.randn(*lead, n, d + 3, generator=gen, dtype=torch.float64)[..., :d]
    elif layout == "transposed":
        x = torch.randn(n, *lead, d, generator=gen, dtype=torch.float64).movedim(0, -2)
    else:
        raise ValueError(layout)
    return (2 * x + 0.5).to(dtype)


def _params(n, d, dtype, pdt, gen, k=2):
    ps = [(1 + 0.4 * torch.randn(d, generator=gen, dtype=torch.float64)).to(pdt) for _ in range(k)]
    bs = [(0.4 * torch.randn(d, generator=gen, dtype=torch.float64)).to(pdt) for _ in range(k)]
    pe = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    return ps, bs, pe


def _run(fn, tensors, fast, seed):
    """Outputs, outputs under no_grad, input gradients and the autograd node names, on one path."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    with backends.use_eager_fast_path(fast):
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        nodes = {type(o.grad_fn).__name__ for o in outs}
        gen = torch.Generator().manual_seed(seed)
        cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, leaves, cots)
        with torch.no_grad():
            inf = fn(*leaves)
    inf = inf if isinstance(inf, tuple) else (inf,)
    return [o.detach() for o in outs] + list(inf) + list(grads), nodes


CASES = [
    # (shape, x dtype, layout, param dtype)
    ((3, 16, 200), torch.float32, "contiguous", torch.float32),
    ((2, 3, 17, 64), torch.float32, "slice", torch.float32),
    ((3, 16, 384), torch.bfloat16, "transposed", torch.float32),
    ((16, 5), torch.float16, "contiguous", torch.float16),
    ((2, 9, 24), torch.float64, "slice", torch.float64),
    ((1, 1, 1), torch.float32, "contiguous", torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}-{c[2]}-params_{c[3]}")
@pytest.mark.parametrize("op", ["add", "pool", "pool_nope", "dual"])
def test_eager_path_is_bitwise_the_registered_path(case, op):
    shape, dtype, layout, pdt = case
    gen = torch.Generator().manual_seed(7)
    n, d = shape[-2], shape[-1]
    x = _x(shape, dtype, layout, gen)
    (w, pw), (b, pb), pe = _params(n, d, dtype, pdt, gen)
    fn, tensors = {
        "add": (lambda x, pe, w, b: mpvg_kernels.layer_norm_add(x, pe, w, b), (x, pe, w, b)),
        "pool": (lambda x, w, b, pe: mpvg_kernels.layer_norm_pool(x, w, b, pe), (x, w, b, pe)),
        "pool_nope": (lambda x, w, b: mpvg_kernels.layer_norm_pool(x, w, b), (x, w, b)),
        "dual": (lambda *t: mpvg_kernels.dual_layer_norm(*t), (x, pe, w, b, pw, pb)),
    }[op]
    registered, reg_nodes = _run(fn, tensors, False, seed=3)
    fast, fast_nodes = _run(fn, tensors, True, seed=3)
    assert len(registered) == len(fast)
    for k, (r, f) in enumerate(zip(registered, fast, strict=True)):
        assert r.dtype == f.dtype and r.shape == f.shape, k
        assert torch.equal(r, f), f"{op} {case}: result {k} differs (max {(r.double() - f.double()).abs().max()})"
    assert not any("_LayerNormFn" in n for n in reg_nodes), reg_nodes
    if x.dim() == 3 and op != "dual":  # (other ranks end in a view node)
        assert fast_nodes == {"_LayerNormFnBackward"}, fast_nodes


def test_inference_calls_the_fast_path_and_training_records_one_node(monkeypatch):
    calls = []
    kernel_forward = LN._kernel_forward

    def counted(*a, **k):
        calls.append(a[0])
        return kernel_forward(*a, **k)

    monkeypatch.setattr(LN, "_kernel_forward", counted)
    x, pe, w, b = torch.randn(2, 4, 8), torch.randn(4, 8), torch.randn(8), torch.randn(8)
    with torch.no_grad():
        y = mpvg_kernels.layer_norm_add(x, pe, w, b)
    assert calls == ["cpp"] and y.grad_fn is None
    w.requires_grad_(True)
    y = mpvg_kernels.layer_norm_add(x, pe, w, b)
    assert type(y.grad_fn).__name__ == "_LayerNormFnBackward" and len(calls) == 2
    with backends.use_eager_fast_path(False):
        mpvg_kernels.layer_norm_add(x, pe, w, b)
    assert len(calls) == 2  # switched off: the registered op


def test_eager_backward_is_bitwise_deterministic():
    gen = torch.Generator().manual_seed(4)
    x = _x((6, 50, 200), torch.float32, "slice", gen)
    (w,), (b,), pe = _params(50, 200, torch.float32, torch.float32, gen, k=1)
    runs = [_run(lambda *t: mpvg_kernels.layer_norm_add(*t), (x, pe, w, b), True, seed=1)[0] for _ in range(2)]
    for a, c in zip(*runs, strict=True):
        assert torch.equal(a, c)


def test_eager_double_backward_is_exact():
    g = torch.Generator().manual_seed(50)
    x = torch.randn(2, 5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    pe = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    w, b = (torch.randn(7, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    assert type(mpvg_kernels.layer_norm_add(x, pe, w, b).grad_fn).__name__ == "_LayerNormFnBackward"
    assert torch.autograd.gradcheck(mpvg_kernels.layer_norm_add, (x, pe, w, b))
    assert torch.autograd.gradgradcheck(mpvg_kernels.layer_norm_add, (x, pe, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b, pe: mpvg_kernels.layer_norm_pool(x, w, b, pe), (x, w, b, pe))


# ----------------------------------------------------------------------------- where the registered ops stay



def _inputs(requires_grad=False):
    t = (torch.randn(2, 4, 8), torch.randn(4, 8), torch.randn(8), torch.randn(8))
    return tuple(v.requires_grad_(requires_grad) for v in t)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_dispatch_modes_see_the_registered_ops(requires_grad, op_log):
    x, pe, w, b = _inputs(requires_grad)
    with op_log() as log:
        y = mpvg_kernels.layer_norm_add(x, pe, w, b)
        if requires_grad:
            y.sum().backward()
    assert "mpvg.layer_norm_add.default" in log.ops, log.ops
    if requires_grad:
        assert "mpvg.layer_norm_add_backward.default" in log.ops, log.ops


def test_fake_tensors_and_make_fx_take_the_registered_ops():
    with FakeTensorMode():
        x, pe, w, b = _inputs()
        y = mpvg_kernels.layer_norm_add(x, pe, w, b)
        assert y.shape == x.shape
    gm = make_fx(lambda x, pe, w, b: mpvg_kernels.layer_norm_add(x, pe, w, b), tracing_mode="fake")(*_inputs())
    assert "mpvg.layer_norm_add" in gm.code, gm.code
    gm = make_fx(lambda x, w, b: mpvg_kernels.layer_norm_pool(x, w, b))(*_inputs()[0:1], *_inputs()[2:])
    assert "mpvg.layer_norm_pool" in gm.code, gm.code


def test_torch_compile_graph_keeps_the_registered_ops():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    x, pe, w, b = _inputs()
    fn = torch.compile(lambda x, pe, w, b: mpvg_kernels.layer_norm_add(x, pe, w, b), backend=backend, fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad():
        y = fn(x, pe, w, b)
    assert graphs and "mpvg.layer_norm_add" in graphs[0], graphs
    with backends.use_eager_fast_path(False), torch.no_grad():
        assert torch.equal(y, mpvg_kernels.layer_norm_add(x, pe, w, b))


# ----------------------------------------------------------------------------- switch, screen, autocast rule


def test_switch():
    assert backends.eager_fast_path_enabled()
    with backends.use_eager_fast_path(False):
        assert not backends.eager_fast_path_enabled()
    assert backends.eager_fast_path_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        backends.set_eager_fast_path("no")


def test_environment_variable_turns_it_off():
    env = dict(os.environ, MPVG_EAGER_FAST_PATH="0", PYTHONPATH=str(ROOT))
    code = "import mpvg_kernels.ops as ops; print(ops.eager_fast_path_enabled())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_quick_screen_accepts_only_what_the_full_checks_accept():
    x, pe, w, b = torch.randn(2, 4, 8), torch.randn(4, 8), torch.randn(8), torch.randn(8)
    assert LN._quick_ok(x, pe, w, b, 1e-6) and LN._quick_ok(x, None, w, b, 0.0)
    assert LN._quick_ok(x, pe, w, b, 1e-6, w, b)
    bad = [
        (x, pe, w, b, 1),  # eps not a float
        (x, pe, w, b, -1e-6),
        (x, pe, w, b, float("nan")),
        (x, pe, w, b, float("inf")),
        (x[0, 0], None, w, b, 1e-6),  # 1-D x
        (torch.randn(2, 4, 0), None, torch.randn(0), torch.randn(0), 1e-6),  # D = 0
        (torch.randn(2, 8, 4).transpose(1, 2), pe, w, b, 1e-6),  # last-dim stride != 1
        (x.int(), pe, w, b, 1e-6),
        (x, pe.int(), w, b, 1e-6),
        (x, pe, w[:4], b, 1e-6),
        (x, pe, w, b.view(1, 8), 1e-6),
        (x, pe[:3], w, b, 1e-6),
        (x, pe.unsqueeze(0), w, b, 1e-6),  # valid, but left to the full checks (reshaped there)
        (x, pe, w.to("meta"), b, 1e-6),
        (x.numpy(), pe, w, b, 1e-6),
        (x, pe, [1.0] * 8, b, 1e-6),
    ]
    for args in bad:
        assert not LN._quick_ok(*args), args
    assert not LN._quick_ok(x, pe, w, b, 1e-6, w[:4])
    with pytest.raises(ValueError, match="pos_weight must have shape"):
        mpvg_kernels.dual_layer_norm(x, pe, w, b, w[:4], b)


def test_cuda_autocast_rule_matches_register_autocast():
    """Under CUDA autocast the fast path casts as torch.library.register_autocast does: floating CUDA tensors to
    float32 except float64 ones (CUDA tensors are fake here)."""
    prev = torch.is_autocast_enabled("cuda")
    with FakeTensorMode():
        x = torch.empty(2, 4, 8, dtype=torch.bfloat16, device="cuda")
        x64 = torch.empty(2, 4, 8, dtype=torch.float64, device="cuda")
        w = torch.empty(8, dtype=torch.float16, device="cuda")
        torch.set_autocast_enabled("cuda", True)
        try:
            cast = LN._cuda_autocast_fp32(x, None, w, x64)
        finally:
            torch.set_autocast_enabled("cuda", prev)
        assert LN._cuda_autocast_fp32(x, w) is None  # autocast off
    assert cast is not None
    assert cast[0].dtype == torch.float32 and cast[1] is None and cast[2].dtype == torch.float32
    assert cast[3].dtype == torch.float64
