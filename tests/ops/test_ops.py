"""Unit tier: the reference against hand-written float64 math, the public API and custom ops on CPU
(whatever kernel the dispatcher registers for CPU: C++ when built, else the reference kernels),
gradcheck, opcheck, torch.compile, backend selection and every input error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpvg_kernels as mk
from mpvg_kernels.ops import backends
from mpvg_kernels.ops import layer_norm as LN

OPS = [
    torch.ops.mpvg.layer_norm_add.default,
    torch.ops.mpvg.layer_norm_pool.default,
]


def _rand(*shape, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def _np_layer_norm_add(x, pe, w, b, eps):
    """Row by row, in numpy float64, the way the paper writes it."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        mu = row.sum() / row.size
        var = ((row - mu) ** 2).sum() / row.size
        out[idx] = (row - mu) / math.sqrt(var + eps) * w + b
        if pe is not None:
            out[idx] += pe[idx[-1]]
    return out


# ----------------------------------------------------------------------------- reference vs float64 math


@pytest.mark.parametrize("shape", [(2, 5, 3), (1, 16, 192), (3, 7, 200), (2, 2, 4, 5)])
def test_reference_matches_handwritten_float64(shape):
    n, d = shape[-2:]
    x, pe, w, b = _rand(*shape, seed=1), _rand(n, d, seed=2), _rand(d, seed=3), _rand(d, seed=4)
    eps = 1e-6
    expect = _np_layer_norm_add(x.numpy(), pe.numpy(), w.numpy(), b.numpy(), eps)
    got = LN.reference_layer_norm_add(x, pe, w, b, eps)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-12, atol=1e-12)
    pooled = LN.reference_layer_norm_pool(x, w, b, pe, eps)
    np.testing.assert_allclose(pooled.numpy(), expect.mean(-2), rtol=1e-12, atol=1e-12)
    pos_norm = _np_layer_norm_add(pe.numpy(), None, b.numpy(), w.numpy(), eps)
    y, pn = LN.reference_dual_layer_norm(x, pe, w, b, b, w, eps)
    np.testing.assert_allclose(pn.numpy(), pos_norm, rtol=1e-12, atol=1e-12)
    expect_dual = _np_layer_norm_add(x.numpy(), pos_norm, w.numpy(), b.numpy(), eps)
    np.testing.assert_allclose(y.numpy(), expect_dual, rtol=1e-12, atol=1e-12)


def test_reference_kernel_backward_matches_autograd():
    x, pe = _rand(3, 7, 12, seed=5, requires_grad=True), _rand(7, 12, seed=6, requires_grad=True)
    w, b = _rand(12, seed=7, requires_grad=True), _rand(12, seed=8, requires_grad=True)
    for pool in (False, True):
        y, stats = LN.reference_forward(x.detach(), pe.detach(), w.detach(), b.detach(), 1e-6, pool)
        g = _rand(*y.shape, seed=9)
        out = LN.reference_layer_norm_pool(x, w, b, pe) if pool else LN.reference_layer_norm_add(x, pe, w, b)
        torch.testing.assert_close(y, out.detach(), rtol=1e-12, atol=1e-12)
        auto = torch.autograd.grad(out, (x, pe, w, b), g)
        mine = LN.reference_backward(g, x.detach(), w.detach(), stats, True, pool)
        recomputed = LN.reference_backward(g, x.detach(), w.detach(), None, True, pool, 1e-6)
        for a, m, r in zip(auto, mine, recomputed, strict=True):
            torch.testing.assert_close(m, a, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(r, a, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- public API on CPU


def _cpu_backends():
    return mk.available_backends("cpu")


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_public_ops_match_reference(backend, dtype):
    x = _rand(3, 16, 200, dtype=dtype, seed=10)
    pe = _rand(1, 16, 200, dtype=dtype, seed=11)
    w, b, pw, pb = (_rand(200, dtype=dtype, seed=s) for s in (12, 13, 14, 15))
    ref = LN.reference_layer_norm_add(x.double(), pe.double(), w.double(), b.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    with mk.use_backend(backend):
        torch.testing.assert_close(mk.layer_norm_add(x, pe, w, b).double(), ref, **tol)
        y, pn = mk.dual_layer_norm(x, pe, w, b, pw, pb)
        assert pn.shape == pe.shape
        pn_ref = LN.reference_layer_norm_add(pe.double(), None, pw.double(), pb.double())
        torch.testing.assert_close(pn.double(), pn_ref, **tol)
        y_ref = LN.reference_layer_norm_add(x.double(), pn_ref, w.double(), b.double())
        torch.testing.assert_close(y.double(), y_ref, **tol)
        pooled = mk.layer_norm_pool(x, w, b, pe)
        torch.testing.assert_close(pooled.double(), ref.mean(-2), **tol)
        torch.testing.assert_close(mk.layer_norm_pool(x, w, b).double(), (ref - pe.double()).mean(-2), **tol)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_gradcheck_float64(backend):
    x = _rand(2, 5, 7, seed=20, requires_grad=True)
    pe = _rand(5, 7, seed=21, requires_grad=True)
    w, b, pw, pb = (_rand(7, seed=s, requires_grad=True) for s in (22, 23, 24, 25))
    with mk.use_backend(backend):
        assert torch.autograd.gradcheck(mk.layer_norm_add, (x, pe, w, b))
        assert torch.autograd.gradcheck(lambda *a: mk.dual_layer_norm(*a)[0], (x, pe, w, b, pw, pb))
        assert torch.autograd.gradcheck(lambda *a: mk.dual_layer_norm(*a)[1], (x, pe, w, b, pw, pb))
        assert torch.autograd.gradcheck(lambda x, w, b, pe: mk.layer_norm_pool(x, w, b, pe), (x, w, b, pe))
        assert torch.autograd.gradcheck(lambda x, w, b: mk.layer_norm_pool(x, w, b), (x, w, b))


@pytest.mark.parametrize("backend", _cpu_backends())
def test_gradgradcheck_float64(backend):
    """Double backward (``create_graph=True``) is exact on every backend, not first-order gradients that drop
    the second-order terms."""
    x = _rand(2, 5, 7, seed=30, requires_grad=True)
    pe = _rand(5, 7, seed=31, requires_grad=True)
    w, b, pw, pb = (_rand(7, seed=s, requires_grad=True) for s in (32, 33, 34, 35))
    with mk.use_backend(backend):
        assert torch.autograd.gradgradcheck(mk.layer_norm_add, (x, pe, w, b))
        assert torch.autograd.gradgradcheck(lambda *a: mk.dual_layer_norm(*a)[0], (x, pe, w, b, pw, pb))
        assert torch.autograd.gradgradcheck(lambda x, w, b, pe: mk.layer_norm_pool(x, w, b, pe), (x, w, b, pe))
        assert torch.autograd.gradgradcheck(lambda x, w, b: mk.layer_norm_pool(x, w, b), (x, w, b))


@pytest.mark.parametrize("backend", _cpu_backends())
def test_second_order_gradient_matches_torch_backend(backend):
    """The gradient of a gradient norm (as in gradient penalties) equals the plain-PyTorch one."""

    def second_order(name):
        x = _rand(2, 5, 8, seed=40, requires_grad=True)
        pe, w, b = _rand(5, 8, seed=41), _rand(8, seed=42, requires_grad=True), _rand(8, seed=43)
        with mk.use_backend(name):
            (g,) = torch.autograd.grad(mk.layer_norm_add(x, pe, w, b).pow(3).sum(), x, create_graph=True)
            return torch.autograd.grad(g.pow(2).sum(), (x, w))

    for got, want in zip(second_order(backend), second_order("torch"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_row_strided_x_is_not_copied_and_correct():
    big = _rand(3, 20, 64, dtype=torch.float32, seed=30)
    x = big[:, 2:18, :48]  # strides (1280, 64, 1)
    pe, w, b = _rand(16, 48, dtype=torch.float32, seed=31), _rand(48, seed=32).float(), _rand(48, seed=33).float()
    ref = LN.reference_layer_norm_add(x.double(), pe.double(), w.double(), b.double())
    torch.testing.assert_close(mk.layer_norm_add(x, pe, w, b).double(), ref, rtol=1e-5, atol=1e-5)
    x3, *_ = torch.ops.mpvg.layer_norm_add(x, pe, w, b, 1e-6)
    assert x3.is_contiguous()
    torch.testing.assert_close(x3.double(), ref, rtol=1e-5, atol=1e-5)


def test_mixed_precision_params_and_output_dtype():
    x = _rand(2, 8, 32, dtype=torch.bfloat16, seed=40)
    pe = _rand(8, 32, dtype=torch.float32, seed=41)
    w, b = _rand(32, seed=42).float(), _rand(32, seed=43).float()
    y = mk.layer_norm_add(x, pe, w, b)
    assert y.dtype == torch.bfloat16
    ref = LN.reference_layer_norm_add(x.double(), pe.double(), w.double(), b.double())
    same = LN.reference_layer_norm_add(x, pe, w, b)
    assert ((y.double() - ref).abs() <= 2 * (same.double() - ref).abs() + 5e-2).all()
    x.requires_grad_(True)
    w.requires_grad_(True)
    mk.layer_norm_add(x, pe, w, b).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_empty_batch_returns_empty():
    x = torch.empty(0, 16, 24)
    pe, w, b = torch.randn(16, 24), torch.randn(24), torch.randn(24)
    assert mk.layer_norm_add(x, pe, w, b).shape == (0, 16, 24)
    assert mk.layer_norm_pool(x, w, b, pe).shape == (0, 24)
    y, pn = mk.dual_layer_norm(x, pe, w, b, w, b)
    assert y.shape == (0, 16, 24) and pn.shape == (16, 24)
    for op in OPS:
        out, stats = op(x, pe, w, b, 1e-6)
        assert out.shape[0] == 0 and stats.numel() == 0


def test_nan_propagates_like_layer_norm():
    x = torch.randn(2, 4, 8)
    x[0, 1, 3] = float("nan")
    x[1, 2, 0] = float("inf")
    pe, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    y = mk.layer_norm_add(x, pe, w, b)
    expect = F.layer_norm(x, (8,), w, b, 1e-6) + pe
    assert torch.equal(torch.isnan(y), torch.isnan(expect))
    finite = torch.isfinite(expect)
    torch.testing.assert_close(y[finite], expect[finite], rtol=1e-5, atol=1e-5)


def test_backward_is_bit_identical_run_to_run():
    x = _rand(4, 197, 192, dtype=torch.float32, seed=50, requires_grad=True)
    pe = _rand(197, 192, dtype=torch.float32, seed=51, requires_grad=True)
    w = _rand(192, dtype=torch.float32, seed=52, requires_grad=True)
    b = _rand(192, dtype=torch.float32, seed=53, requires_grad=True)
    g = _rand(4, 197, 192, dtype=torch.float32, seed=54)
    runs = [torch.autograd.grad(mk.layer_norm_add(x, pe, w, b), (x, pe, w, b), g) for _ in range(2)]
    for a, c in zip(*runs, strict=True):
        assert torch.equal(a, c)


# ----------------------------------------------------------------------------- custom ops: opcheck, compile


def _op_args(op, dtype=torch.float32, has_pe=True):
    x = _rand(2, 6, 10, dtype=dtype, seed=60, requires_grad=True)
    pe = _rand(6, 10, dtype=dtype, seed=61, requires_grad=True) if has_pe else None
    w, b = _rand(10, dtype=dtype, seed=62, requires_grad=True), _rand(10, dtype=dtype, seed=63, requires_grad=True)
    return (x, pe, w, b, 1e-6)


@pytest.mark.parametrize("op", OPS, ids=["layer_norm_add", "layer_norm_pool"])
@pytest.mark.parametrize("has_pe", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(op, has_pe, dtype):
    torch.library.opcheck(op, _op_args(op, dtype, has_pe))


def test_opcheck_backward_ops():
    x = _rand(2, 6, 10, dtype=torch.float32, seed=70)
    w = _rand(10, dtype=torch.float32, seed=71)
    _, stats = LN.reference_forward(x, None, w, w, 1e-6, False)
    for op, g in (
        (torch.ops.mpvg.layer_norm_add_backward.default, _rand(2, 6, 10, dtype=torch.float32, seed=72)),
        (torch.ops.mpvg.layer_norm_pool_backward.default, _rand(2, 10, dtype=torch.float32, seed=73)),
    ):
        for has_pe in (True, False):
            torch.library.opcheck(op, (g, x, w, stats, has_pe), test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_matches_eager():
    def block(x, pos, w, b, pw, pb, lw, lb):
        y, pos1 = mk.dual_layer_norm(x, pos, w, b, pw, pb)
        h = x + torch.tanh(y)
        return mk.layer_norm_pool(h, lw, lb, pos1), mk.layer_norm_add(h, pos1, lw, lb)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    args = [_rand(3, 16, 32, dtype=torch.float32, seed=80, requires_grad=True),
            _rand(16, 32, dtype=torch.float32, seed=81, requires_grad=True)]
    args += [_rand(32, dtype=torch.float32, seed=s, requires_grad=True) for s in range(82, 88)]
    eager_out = block(*args)
    comp_out = compiled(*args)
    for e, c in zip(eager_out, comp_out, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    ge = torch.autograd.grad(sum(o.sum() for o in eager_out), args)
    gc = torch.autograd.grad(sum(o.sum() for o in comp_out), args)
    for e, c in zip(ge, gc, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


def test_compiled_graph_keeps_mpvg_ops():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    torch._dynamo.reset()
    x, pe, w, b = torch.randn(2, 4, 8), torch.randn(4, 8), torch.randn(8), torch.randn(8)
    if backends.resolve_backend(x.device) == "torch":
        pytest.skip(reason="the auto backend on CPU is the plain torch reference (C++ extension not built)")
    torch.compile(lambda *a: mk.layer_norm_add(*a), backend=backend, fullgraph=True)(x, pe, w, b)
    assert any("mpvg.layer_norm_add" in s for s in seen), seen


# ----------------------------------------------------------------------------- backends


def test_backend_selection_and_errors(monkeypatch):
    assert "torch" in mk.available_backends()
    assert mk.get_backend() in backends.KNOWN_BACKENDS
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        mk.set_backend("fast")
    with pytest.raises(TypeError, match="backend name must be a str"):
        mk.set_backend(3)
    with mk.use_backend("torch"):
        assert mk.get_backend() == "torch"
        assert backends.resolve_backend(torch.device("cpu")) == "torch"
    if not torch.cuda.is_available() and not backends.TRITON_INTERPRET:
        with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
            mk.set_backend("triton")
    if not backends.cpp_status()[0]:
        with pytest.raises(RuntimeError, match="backend 'cpp' is not available"):
            mk.set_backend("cpp")
    monkeypatch.setitem(backends._state, "backend", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        mk.layer_norm_add(torch.randn(2, 3), torch.randn(2, 3), torch.randn(3), torch.randn(3))


def test_auto_picks_fastest_cpu_backend():
    expect = "cpp" if backends.cpp_status()[0] else "torch"
    with mk.use_backend("auto"):
        assert backends.resolve_backend(torch.device("cpu")) == expect


def test_env_var_selects_backend_in_fresh_process():
    import subprocess
    import sys

    code = "import mpvg_kernels as mk; print(mk.get_backend())"
    env = dict(__import__("os").environ, MPVG_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


# ----------------------------------------------------------------------------- input errors


def _good():
    return torch.randn(2, 4, 8), torch.randn(4, 8), torch.randn(8), torch.randn(8)


@pytest.mark.parametrize(
    "mutate, exc, msg",
    [
        (
            lambda a: (a[0], torch.randn(5, 8), a[2], a[3]),
            ValueError,
            r"pe must have shape \[N, D\] = \[4, 8\].*got \(5, 8\)",
        ),
        (lambda a: (a[0], torch.randn(2, 4, 8), a[2], a[3]), ValueError, r"pe must have shape.*got \(2, 4, 8\)"),
        (lambda a: (a[0], a[1], torch.randn(7), a[3]), ValueError, r"weight must have shape \[D\] = \[8\].*\(7,\)"),
        (lambda a: (a[0], a[1], a[2], torch.randn(8, 1)), ValueError, r"bias must have shape \[D\] = \[8\].*\(8, 1\)"),
        (lambda a: (a[0].long(), a[1], a[2], a[3]), TypeError, r"x has dtype torch.int64"),
        (lambda a: (a[0], a[1].int(), a[2], a[3]), TypeError, r"pe has dtype torch.int32"),
        (lambda a: (a[0], a[1], a[2].to(torch.int16), a[3]), TypeError, r"weight has dtype torch.int16"),
        (lambda a: (torch.randn(8), a[1], a[2], a[3]), ValueError, r"x must have at least 2 dims.*\(8,\)"),
        (lambda a: (torch.randn(2, 8, 4).transpose(1, 2), a[1], a[2], a[3]), ValueError, r"x must have stride 1"),
        (lambda a: (a[0], a[1].to("meta"), a[2], a[3]), ValueError, r"pe is on meta but x is on cpu"),
        (lambda a: (a[0], a[1], a[2].to("meta"), a[3]), ValueError, r"weight is on meta but x is on cpu"),
        (lambda a: ([[1.0]], a[1], a[2], a[3]), TypeError, r"x must be a torch.Tensor, got list"),
    ],
)
def test_layer_norm_add_errors(mutate, exc, msg):
    with pytest.raises(exc, match=msg):
        mk.layer_norm_add(*mutate(_good()))


def test_other_errors():
    x, pe, w, b = _good()
    with pytest.raises(TypeError, match="pe is required"):
        mk.layer_norm_add(x, None, w, b)
    for eps in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            mk.layer_norm_add(x, pe, w, b, eps)
    with pytest.raises(TypeError, match="eps must be a float"):
        mk.layer_norm_add(x, pe, w, b, "1e-6")
    with pytest.raises(ValueError, match=r"pos must have shape \[N, D\]"):
        mk.dual_layer_norm(x, torch.randn(3, 8), w, b, w, b)
    with pytest.raises(ValueError, match=r"pos_weight must have shape \[D\]"):
        mk.dual_layer_norm(x, pe, w, b, torch.randn(4), b)
    with pytest.raises(ValueError, match=r"pe must have shape"):
        mk.layer_norm_pool(x, w, b, torch.randn(4, 9))
    with pytest.raises(ValueError, match="needs at least one token"):
        mk.layer_norm_pool(torch.randn(2, 0, 8), w, b)
