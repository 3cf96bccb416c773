"""One dtype rule for every path: empty inputs reach the ``mpvg::`` ops, and the ``torch`` backend (which does
not call them) follows the ops' registered CUDA-autocast rule. CPU-only: CUDA tensors are fake tensors and the
CUDA autocast state is switched on directly (``torch.autocast("cuda")`` refuses to turn on without a GPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import OpLog  # noqa: E402  (tests/ops/conftest.py)
from torch._subclasses.fake_tensor import FakeTensorMode

import mpvg_kernels
from mpvg_kernels.ops import backends


def _mpvg_ops(fn) -> list[str]:
    with OpLog() as log:
        fn()
    return [o for o in log.ops if o.startswith("mpvg.")]


@pytest.mark.parametrize("shape", [(0, 16, 8), (2, 0, 16, 8), (3, 0, 8), (0, 8)], ids=str)
def test_empty_inputs_reach_the_op(shape):
    """B = 0 (and N = 0 for the per-token ops) go through the custom op like any other input."""
    if not backends.cpp_status()[0] and backends.resolve_backend(torch.device("cpu")) == "torch":
        pytest.skip(reason="the C++ extension is not built and MPVG_BACKEND resolves CPU tensors to the torch "
                    "backend, which bypasses the custom ops: nothing to dispatch here")
    N, D = shape[-2], shape[-1]
    x = torch.randn(shape, requires_grad=True)
    pe = torch.randn(N, D, requires_grad=True)
    w, b = torch.ones(D, requires_grad=True), torch.zeros(D, requires_grad=True)
    with mpvg_kernels.use_backend("auto"):
        ops = _mpvg_ops(lambda: mpvg_kernels.layer_norm_add(x, pe, w, b).sum().backward())
        assert "mpvg.layer_norm_add.default" in ops and "mpvg.layer_norm_add_backward.default" in ops, ops
        y = mpvg_kernels.layer_norm_add(x, pe, w, b)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert pe.grad is not None and pe.grad.shape == pe.shape and not pe.grad.any()
        if N > 0:
            ops = _mpvg_ops(lambda: mpvg_kernels.layer_norm_pool(x, w, b, pe).sum().backward())
            assert "mpvg.layer_norm_pool.default" in ops, ops
            assert mpvg_kernels.layer_norm_pool(x, w, b, pe).shape == (*shape[:-2], D)
            ops = _mpvg_ops(lambda: mpvg_kernels.dual_layer_norm(x, pe, w, b, w, b))
            assert ops.count("mpvg.layer_norm_add.default") == 2, ops


@contextlib.contextmanager
def _cuda_autocast_on():
    prev = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", prev)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("B", [0, 2])
def test_cuda_autocast_dtype_is_one_rule(backend, B):
    """Under CUDA autocast every path returns float32 (as F.layer_norm does), whatever B and the backend."""
    with FakeTensorMode():
        x = torch.empty(B, 4, 8, dtype=torch.bfloat16, device="cuda")
        pe = torch.empty(4, 8, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(8, device="cuda")
        prev = backends.get_backend()
        backends._state["backend"] = backend  # set_backend("triton") would ask for a real GPU
        try:
            with _cuda_autocast_on():
                assert mpvg_kernels.layer_norm_add(x, pe, w, w).dtype == torch.float32
                assert mpvg_kernels.layer_norm_pool(x, w, w, pe).dtype == torch.float32
                y, p = mpvg_kernels.dual_layer_norm(x, pe, w, w, w, w)
                assert y.dtype == torch.float32 and p.dtype == torch.float32
            assert mpvg_kernels.layer_norm_add(x, pe, w, w).dtype == torch.bfloat16  # autocast off: x's dtype
            assert mpvg_kernels.layer_norm_pool(x, w, w, pe).dtype == torch.bfloat16
        finally:
            backends._state["backend"] = prev


def test_cpu_autocast_keeps_the_input_dtype():
    x = torch.randn(0, 4, 8, dtype=torch.bfloat16)
    pe = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.ones(8)
    for backend in ("auto", "torch"):
        with mpvg_kernels.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            assert mpvg_kernels.layer_norm_add(x, pe, w, w).dtype == torch.bfloat16
