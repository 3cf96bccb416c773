"""Property-based tests of the public ops (hypothesis): random shapes (D = 1, N = 1 and B = 0 included), strides,
dtypes and pe layouts on every CPU backend against the float64 reference; and for bad inputs, the exact exception
type, raised before any work.

The examples are derandomised, so a CI run is reproducible; a failure prints the smallest failing example.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mpvg_kernels as mk  # noqa: E402
from mpvg_kernels.ops import backends  # noqa: E402
from mpvg_kernels.ops import layer_norm as LN  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# |out - float64 reference on the same (rounded) inputs|: atol + rtol * |ref|
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (2e-2, 1e-2),
       torch.bfloat16: (1.5e-1, 2e-2)}


def _cpu_backends() -> list[str]:
    return backends.available_backends("cpu")


@st.composite
def op_case(draw):
    """(x, pe or None, weight, bias, eps, layout description) with x of shape [*lead, N, D]."""
    lead = draw(st.sampled_from([(), (0,), (1,), (3,), (2, 2), (0, 3)]))
    n = draw(st.integers(1, 9))
    d = draw(st.sampled_from([1, 2, 3, 5, 8, 17, 33, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "row_padded", "transposed"]))
    pe_layout = draw(st.sampled_from(["none", "2d", "3d"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(dtype)

    if layout == "row_padded":  # rows of x are D apart inside a wider buffer: stride(-2) = D + 3
        x = rnd(*lead, n, d + 3)[..., :d]
    elif layout == "transposed" and len(lead) == 1:  # [N, B, D] seen as [B, N, D]
        x = rnd(n, *lead, d).transpose(0, 1)
    else:
        x = rnd(*lead, n, d)
    pe = None if pe_layout == "none" else rnd(n, d) if pe_layout == "2d" else rnd(1, n, d)
    w, b = rnd(d), rnd(d)
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    return x, pe, w, b, eps, f"{tuple(x.shape)} {dtype} {layout} pe={pe_layout}"


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.dtype == dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    atol, rtol = TOL[dtype]
    err = (got.double() - want).abs()
    bound = atol + rtol * want.abs()
    assert bool((err <= bound).all()), f"{what}: max err {err.max().item() if err.numel() else 0:.3e}"


@pytest.mark.parametrize("backend", _cpu_backends())
@SETTINGS
@given(case=op_case())
def test_layer_norm_add_and_pool_match_float64_reference(backend, case):
    x, pe, w, b, eps, what = case
    xd, wd, bd = x.double(), w.double(), b.double()
    ped = None if pe is None else pe.double()
    with mk.use_backend(backend):
        if pe is not None:
            want = LN.reference_layer_norm_add(xd, ped, wd, bd, eps)
            _close(mk.layer_norm_add(x, pe, w, b, eps), want, x.dtype, f"{backend} add {what}")
            y, pos_norm = mk.dual_layer_norm(x, pe, w, b, w, b, eps)
            want_pos = LN.reference_layer_norm_add(ped, None, wd, bd, eps)
            _close(pos_norm, want_pos, pe.dtype, f"{backend} dual pos {what}")
            # the op adds the rounded LN'(pos) of the input dtype, as an unfused pair of calls would
            want_y = LN.reference_layer_norm_add(xd, pos_norm.double(), wd, bd, eps)
            _close(y, want_y, x.dtype, f"{backend} dual {what}")
        want = LN.reference_layer_norm_pool(xd, wd, bd, ped, eps)
        _close(mk.layer_norm_pool(x, w, b, pe, eps), want, x.dtype, f"{backend} pool {what}")


@pytest.mark.parametrize("backend", _cpu_backends())
@SETTINGS
@given(case=op_case())
def test_gradients_match_float64_reference(backend, case):
    x, pe, w, b, eps, what = case
    if x.dtype not in (torch.float32, torch.float64):
        return  # low-precision gradients are covered by the per-backend sweeps
    pe = torch.zeros(x.shape[-2:], dtype=x.dtype) if pe is None else pe
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, pe, w, b)]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, pe, w, b)]
    g = torch.Generator().manual_seed(1)
    cot = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with mk.use_backend(backend):
        mk.layer_norm_add(*leaves, eps).backward(cot.to(x.dtype))
    LN.reference_layer_norm_add(*ref_leaves, eps).backward(cot)
    for name, got, want in zip(("x", "pe", "weight", "bias"), leaves, ref_leaves, strict=True):
        assert got.grad is not None, f"{backend} {what}: no gradient for {name}"
        scale = max(1.0, want.grad.abs().max().item()) if want.grad.numel() else 1.0
        atol, rtol = TOL[x.dtype]
        torch.testing.assert_close(got.grad.double(), want.grad, atol=atol * scale * 10, rtol=rtol * 10,
                                   msg=f"{backend} grad {name} {what}")


BAD = {
    "pe_shape": (ValueError, lambda x, pe, w, b: mk.layer_norm_add(
        x, torch.zeros(x.shape[-2] + 1, x.shape[-1], dtype=x.dtype), w, b)),
    "weight_shape": (ValueError, lambda x, pe, w, b: mk.layer_norm_add(x, pe, torch.cat([w, w]), b)),
    "bias_shape": (ValueError, lambda x, pe, w, b: mk.layer_norm_pool(x, w, b[:0], pe)),
    "int_x": (TypeError, lambda x, pe, w, b: mk.layer_norm_add(x.to(torch.int32), pe, w, b)),
    "int_weight": (TypeError, lambda x, pe, w, b: mk.layer_norm_pool(x, w.to(torch.int64), b)),
    "x_1d": (ValueError, lambda x, pe, w, b: mk.layer_norm_add(x.reshape(-1)[: w.shape[0]], pe, w, b)),
    "x_strided_last": (ValueError, lambda x, pe, w, b: mk.layer_norm_add(
        torch.repeat_interleave(x, 2, dim=-1)[..., ::2] if x.shape[-1] > 1 else x.expand(*x.shape[:-1], 2),
        pe, w, b)),
    "eps_nan": (ValueError, lambda x, pe, w, b: mk.layer_norm_add(x, pe, w, b, float("nan"))),
    "eps_negative": (ValueError, lambda x, pe, w, b: mk.layer_norm_pool(x, w, b, pe, -1e-6)),
    "eps_str": (TypeError, lambda x, pe, w, b: mk.layer_norm_add(x, pe, w, b, "1e-6")),
    "pe_none": (TypeError, lambda x, pe, w, b: mk.layer_norm_add(x, None, w, b)),
    "pe_list": (TypeError, lambda x, pe, w, b: mk.layer_norm_add(x, pe.tolist(), w, b)),
    "pool_no_tokens": (ValueError, lambda x, pe, w, b: mk.layer_norm_pool(x[..., :0, :], w, b)),
}


@pytest.mark.parametrize("backend", _cpu_backends())
@SETTINGS
@given(case=op_case(), bad=st.sampled_from(sorted(BAD)))
def test_bad_inputs_raise_the_exact_type(backend, case, bad):
    x, pe, w, b, _, what = case
    pe = torch.zeros(x.shape[-2:], dtype=x.dtype) if pe is None else pe
    exc, call = BAD[bad]
    # an empty x reads nothing, so its (arbitrary) strides are not checked
    assume(not (bad == "x_strided_last" and x.numel() == 0))
    if bad == "x_strided_last" and x.shape[-1] == 1:
        w, b = torch.cat([w, w]), torch.cat([b, b])  # x is widened to D = 2 with a zero last stride
        pe = pe.repeat(1, 2) if pe.dim() == 2 else pe.repeat(1, 1, 2)
    with mk.use_backend(backend):
        with pytest.raises(exc) as info:
            call(x, pe, w, b)
    assert type(info.value) is exc, f"{bad} on {what}: {type(info.value).__name__}: {info.value}"
