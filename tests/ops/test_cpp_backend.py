"""Unit tier: the C++ CPU backend (``csrc/cpu``, extension ``mpvg_kernels.ops._C``) against the float64 reference.

- the correctness sweep (D in {3, 5, 192, 200, 384, 768, 1000, 1280}, N in {1, 16, 197}, B in {0, 1, 3}, four
  dtypes, row- and batch-strided x, pe as [N, D] and [1, N, D], random affine) through the public API and
  through ``torch.ops.mpvg.*`` directly, forward and every gradient;
- the same ops under every instruction set this build and CPU support (DEFAULT, AVX2, AVX512);
- float64 gradcheck, opcheck of the four ops, ``torch.compile(fullgraph=True)`` reaching the C++ kernels;
- bit-identical backward run to run and across thread counts;
- the build without a compiler (setup.py message, and the package working with the C++ import failing).

Tolerances (docs/design.md#test-tiers): fp32 1e-5 relative (fp64 1e-10); fp16/bf16
``|out - ref| <= 2 |torch - ref| + atol`` with ``torch`` the plain PyTorch expression in the same dtype, atol 1e-2
(fp16) / 5e-2 (bf16).

The module skips, with the reason, only when the extension was not built. If it was built but does not load,
or loads and computes wrong results, the tests fail.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mpvg_kernels as mk
from mpvg_kernels.ops import backends
from mpvg_kernels.ops import layer_norm as LN

ROOT = Path(__file__).resolve().parents[2]

_loaded, _why = backends.cpp_status()
_INTERPRET_WHY = "TRITON_INTERPRET=1 routes CPU tensors to Triton; the C++ kernels are not loaded"
if backends.TRITON_INTERPRET:
    pytest.skip(reason=_INTERPRET_WHY, allow_module_level=True)
if not _loaded and importlib.util.find_spec("mpvg_kernels.ops._C") is None:
    _BUILD_WHY = (
        f"the C++ extension mpvg_kernels.ops._C is not built ({_why}); build it with "
        "'pip install --no-build-isolation -e .' or 'python setup.py build_ext --inplace'"
    )
    pytest.skip(reason=_BUILD_WHY, allow_module_level=True)


def test_extension_loads() -> None:
    """Built means loaded: a .so that exists but does not import is a failure, not a skip."""
    assert _loaded, f"mpvg_kernels.ops._C exists but did not load: {_why}"
    assert "cpp" in mk.available_backends()
    assert backends.resolve_backend(torch.device("cpu")) in ("cpp", mk.get_backend())


_C = importlib.import_module("mpvg_kernels.ops._C") if _loaded else None
_CAPS = _C.capabilities() if _C is not None else ["DEFAULT"]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DS = [3, 5, 192, 200, 384, 768, 1000, 1280]
NS = [1, 16, 197]
BS = [0, 1, 3]
ATOL_HALF = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
EPS = 1e-6


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _strided_x(B: int, N: int, D: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[B, N, D] as a view with batch stride, row stride and an offset that all differ from a contiguous tensor."""
    big = _rand(2 * B, N + 3, D + 5, dtype=dtype, seed=seed, scale=2.0) + 0.5
    x = big[::2, 1 : N + 1, 2 : D + 2]
    assert x.stride(-1) == 1 and (B < 2 or not x.is_contiguous())
    return x


@contextlib.contextmanager
def _capability(name: str) -> Iterator[None]:
    old = _C.set_capability(name)
    try:
        yield
    finally:
        _C.set_capability(old)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _poison_heap(nbytes: int) -> None:
    """Fill and free a block the size of an output, so a kernel that leaves elements unwritten reads NaN garbage."""
    t = torch.full((max(nbytes // 4, 1),), float("nan"))
    del t


def _assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, same: torch.Tensor | None, dtype: torch.dtype):
    """fp32/fp64: error relative to the largest reference value; fp16/bf16: within twice plain PyTorch's own error
    plus atol (atol scaled by the largest reference value when that exceeds 1, e.g. gradients amplified by rstd)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    o, r = out.detach().double(), ref.detach().double()
    assert torch.isfinite(o).all(), f"{name}: non-finite values"
    scale = max(r.abs().max().item(), 1.0)
    err = (o - r).abs()
    if dtype in (torch.float32, torch.float64):
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        worst = err.max().item()
        assert worst <= tol * scale, f"{name} ({dtype}): max error {worst:.3g} > {tol:g} * {scale:.3g}"
    else:
        assert same is not None
        bound = 2 * (same.detach().double() - r).abs() + ATOL_HALF[dtype] * scale
        bad = err > bound
        assert not bad.any(), (
            f"{name} ({dtype}): {int(bad.sum())} of {err.numel()} elements exceed 2*|torch-ref|+atol; "
            f"worst excess {(err - bound).max().item():.3g}"
        )


# ------------------------------------------------------------------------------------- public API sweep


def _public_case(B: int, N: int, D: int, dtype: torch.dtype, seed: int, pe_3d: bool) -> None:
    """layer_norm_add, layer_norm_pool and dual_layer_norm through the public API with the cpp backend:
    outputs and the gradients of x, pe (pos), weight and bias against float64 autograd of the reference."""
    x = _strided_x(B, N, D, dtype, seed).requires_grad_(True)
    pe_shape = (1, N, D) if pe_3d else (N, D)
    pe = _rand(*pe_shape, dtype=dtype, seed=seed + 1).requires_grad_(True)
    w = (_rand(D, seed=seed + 2) * 0.5 + 1.0).to(dtype).requires_grad_(True)
    b = _rand(D, dtype=dtype, seed=seed + 3).requires_grad_(True)
    pw = (_rand(D, seed=seed + 4) * 0.5 + 1.0).to(dtype).requires_grad_(True)
    pb = _rand(D, dtype=dtype, seed=seed + 5).requires_grad_(True)
    leaves = (x, pe, w, b)
    half = dtype in ATOL_HALF  # plain PyTorch in x's dtype is only needed for the half-precision bound
    ref_leaves = tuple(t.detach().double().requires_grad_(True) for t in leaves)
    same_leaves = tuple(t.detach().clone().requires_grad_(True) for t in leaves)

    def torch_add(x, pe, w, b):  # plain PyTorch in x's dtype
        return F.layer_norm(x, (D,), w, b, EPS) + pe.reshape(N, D)

    def torch_pool(x, pe, w, b):
        return (F.layer_norm(x, (D,), w, b, EPS) + pe.reshape(N, D)).mean(-2)

    cases = (
        (
            "layer_norm_add",
            lambda x, pe, w, b: mk.layer_norm_add(x, pe, w, b, EPS),
            lambda x, pe, w, b: LN.reference_layer_norm_add(x, pe, w, b, EPS),
            torch_add,
        ),
        (
            "layer_norm_pool",
            lambda x, pe, w, b: mk.layer_norm_pool(x, w, b, pe, EPS),
            lambda x, pe, w, b: LN.reference_layer_norm_pool(x, w, b, pe, EPS),
            torch_pool,
        ),
    )
    with mk.use_backend("cpp"):
        for name, mine_fn, ref_fn, same_fn in cases:
            out = mine_fn(*leaves)
            ref = ref_fn(*ref_leaves)
            same = same_fn(*same_leaves) if half else None
            assert out.dtype == dtype
            _assert_close(f"{name} y {B}x{N}x{D}", out, ref, same, dtype)
            if B == 0:
                continue
            g = _rand(*out.shape, seed=seed + 9)
            grads = torch.autograd.grad(out, leaves, g.to(dtype))
            ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
            same_grads = torch.autograd.grad(same, same_leaves, g.to(dtype)) if half else (None,) * 4
            for gname, gm, gr, gs, leaf in zip(
                ("dx", "dpe", "dw", "db"), grads, ref_grads, same_grads, leaves, strict=True
            ):
                assert gm.dtype == leaf.dtype and gm.shape == leaf.shape, gname
                _assert_close(f"{name} {gname} {B}x{N}x{D}", gm, gr, gs, dtype)

        # dual_layer_norm: LN'(pos) feeds both the output and the next layer.
        y, pos_n = mk.dual_layer_norm(x, pe, w, b, pw, pb, EPS)
        rl = ref_leaves + tuple(t.detach().double().requires_grad_(True) for t in (pw, pb))
        y_ref, pos_ref = LN.reference_dual_layer_norm(*rl, EPS)
        sl = same_leaves + tuple(t.detach().clone().requires_grad_(True) for t in (pw, pb))
        pos_same = F.layer_norm(sl[1], (D,), sl[4], sl[5], EPS) if half else None
        y_same = F.layer_norm(sl[0], (D,), sl[2], sl[3], EPS) + pos_same.reshape(N, D) if half else None
        assert pos_n.shape == pe.shape
        _assert_close(f"dual y {B}x{N}x{D}", y, y_ref, y_same, dtype)
        _assert_close(f"dual pos {B}x{N}x{D}", pos_n, pos_ref, pos_same, dtype)
        if B > 0:
            gy, gp = _rand(*y.shape, seed=seed + 10), _rand(*pos_n.shape, seed=seed + 11)
            mine_g = torch.autograd.grad((y, pos_n), (x, pe, w, b, pw, pb), (gy.to(dtype), gp.to(dtype)))
            ref_g = torch.autograd.grad((y_ref, pos_ref), rl, (gy.double(), gp.double()))
            same_g = torch.autograd.grad((y_same, pos_same), sl, (gy.to(dtype), gp.to(dtype))) if half else (None,) * 6
            for gname, gm, gr, gs in zip(("dx", "dpos", "dw", "db", "dpw", "dpb"), mine_g, ref_g, same_g, strict=True):
                _assert_close(f"dual {gname} {B}x{N}x{D}", gm, gr, gs, dtype)


@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_public_api_sweep(dtype: torch.dtype, D: int) -> None:
    seed = 1000 * DS.index(D) + 100 * DTYPES.index(dtype)
    for N in NS:
        for B in BS:
            _public_case(B, N, D, dtype, seed=seed + 10 * N + B, pe_3d=(N + B) % 2 == 1)


# ------------------------------------------------------------------------------ torch.ops.mpvg.* directly


def _direct_case(
    B: int,
    N: int,
    D: int,
    dtype: torch.dtype,
    has_pe: bool,
    seed: int,
    pe_dtype: torch.dtype | None = None,
    param_dtype: torch.dtype | None = None,
) -> None:
    """The kernel contract of the four ops (shapes, dtypes, values) against reference.forward/backward in float64."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = _strided_x(B, N, D, dtype, seed)
    pe = _rand(N, D, dtype=pe_dtype or dtype, seed=seed + 1) if has_pe else None
    w = (_rand(D, seed=seed + 2) * 0.5 + 1.0).to(param_dtype or dtype)
    b = _rand(D, dtype=param_dtype or dtype, seed=seed + 3)
    x64 = x.double()
    pe64 = None if pe is None else pe.double()
    for pool in (False, True):
        fwd = torch.ops.mpvg.layer_norm_pool if pool else torch.ops.mpvg.layer_norm_add
        bwd = torch.ops.mpvg.layer_norm_pool_backward if pool else torch.ops.mpvg.layer_norm_add_backward
        _poison_heap(x.numel() * x.element_size())
        y, stats = fwd(x, pe, w, b, EPS)
        ry, rstats = LN.reference_forward(x64, pe64, w.double(), b.double(), EPS, pool)
        assert y.dtype == dtype and stats.dtype == acc
        assert y.shape == ((B, D) if pool else (B, N, D)) and y.is_contiguous()
        assert stats.shape == (2 * B * N,)
        mean, rstd, rmean, rrstd = stats[: B * N], stats[B * N :], rstats[: B * N], rstats[B * N :]
        same_y = LN.reference_forward(x, pe, w, b, EPS, pool)[0]  # fp32 math, rounded once to x's dtype
        _assert_close(f"{fwd} y", y, ry, same_y, dtype)
        _assert_close(f"{fwd} mean", mean, rmean, rmean.to(acc), acc)
        _assert_close(f"{fwd} rstd", rstd, rrstd, rrstd.to(acc), acc)

        g = _rand(*y.shape, dtype=dtype, seed=seed + 4)
        _poison_heap(x.numel() * 4)
        dx, dpe, dw, db = bwd(g, x, w, stats, has_pe)
        r = LN.reference_backward(g.double(), x64, w.double(), rstats, has_pe, pool)
        same = LN.reference_backward(g, x, w, stats, has_pe, pool)
        assert dx.dtype == dtype and dx.shape == (B, N, D) and dx.is_contiguous()
        assert dpe.dtype == acc and dw.dtype == acc and db.dtype == acc
        assert dpe.shape == ((N, D) if has_pe else (0,))
        for name, m, rr, s in zip(("dx", "dpe", "dw", "db"), (dx, dpe, dw, db), r, same, strict=True):
            _assert_close(f"{bwd} {name} {B}x{N}x{D}", m, rr, s, dtype if name == "dx" else acc)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_ops_direct_sweep(dtype: torch.dtype) -> None:
    for i, D in enumerate(DS):
        for N in NS:
            for B in BS:
                _direct_case(B, N, D, dtype, has_pe=(i + N + B) % 2 == 0, seed=7 * i + 3 * N + B)


def test_ops_direct_mixed_param_dtypes() -> None:
    """fp32 params and pe with bf16/fp16 x (autocast), and bf16 params with fp32 x: computed in fp32."""
    _direct_case(3, 16, 200, torch.bfloat16, True, seed=5, pe_dtype=torch.float32, param_dtype=torch.float32)
    _direct_case(3, 16, 200, torch.float16, True, seed=6, pe_dtype=torch.float32, param_dtype=torch.float32)
    _direct_case(3, 16, 200, torch.float32, True, seed=7, pe_dtype=torch.bfloat16, param_dtype=torch.bfloat16)


def test_ops_direct_edge_cases() -> None:
    """N = 0 (pool of no tokens is zero), B * N large enough for many chunks, pe given as [1, N, D]."""
    x = torch.randn(2, 0, 8)
    w, b = torch.randn(8), torch.randn(8)
    y, stats = torch.ops.mpvg.layer_norm_pool(x, None, w, b, EPS)
    assert y.shape == (2, 8) and torch.equal(y, torch.zeros(2, 8)) and stats.shape == (0,)
    dx, dpe, dw, db = torch.ops.mpvg.layer_norm_pool_backward(torch.randn(2, 8), x, w, stats, True)
    assert dx.shape == (2, 0, 8) and dpe.shape == (0, 8) and torch.equal(dw, torch.zeros(8))
    _direct_case(40, 197, 192, torch.float32, True, seed=11)  # 64 backward chunks
    _direct_case(300, 2, 64, torch.float32, True, seed=12)  # few tokens: dpe summed over b-blocks
    pe3 = torch.randn(1, 16, 8)
    x = torch.randn(3, 16, 8)
    y3 = torch.ops.mpvg.layer_norm_add(x, pe3, w, b, EPS)[0]
    y2 = torch.ops.mpvg.layer_norm_add(x, pe3[0], w, b, EPS)[0]
    assert torch.equal(y3, y2)


def test_nan_and_inf_propagate_per_row() -> None:
    x = torch.randn(2, 4, 16)
    x[0, 1, 3] = float("nan")
    x[1, 2, 0] = float("inf")
    w, b = torch.randn(16), torch.randn(16)
    y = torch.ops.mpvg.layer_norm_add(x, None, w, b, EPS)[0]
    expect = F.layer_norm(x, (16,), w, b, EPS)
    assert torch.equal(torch.isnan(y), torch.isnan(expect))
    ok = torch.isfinite(expect)
    torch.testing.assert_close(y[ok], expect[ok], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ instruction sets


@pytest.mark.parametrize("cap", _CAPS)
def test_every_capability(cap: str) -> None:
    """Each instruction set's kernels (DEFAULT runs anywhere; AVX2/AVX512 where this CPU has them)."""
    assert "DEFAULT" in _C.capabilities()
    with _capability(cap):
        assert _C.capability() == cap
        for dtype in DTYPES:
            for D, N, B, has_pe in ((5, 16, 3, True), (200, 16, 3, False), (1000, 1, 3, True), (192, 197, 1, True)):
                _direct_case(B, N, D, dtype, has_pe, seed=D + N + B)


@pytest.mark.parametrize("env", ["MPVG_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"])
def test_capability_capped_by_environment(env: str) -> None:
    """MPVG_CPU_CAPABILITY=default (or torch's own ATEN_CPU_CAPABILITY=default) selects the baseline kernels."""
    code = (
        "import torch, mpvg_kernels; from mpvg_kernels.ops import _C; "
        "x = torch.randn(3, 5, 40); w = torch.randn(40); "
        "y = torch.ops.mpvg.layer_norm_add(x, None, w, w, 1e-6)[0]; "
        "torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (40,), w, w, 1e-6)); "
        "print(_C.capability())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(**{env: "default"}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "DEFAULT"


def test_set_capability_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown CPU capability"):
        _C.set_capability("sse9")


# ------------------------------------------------------------------------------ gradcheck, determinism


def test_gradcheck_float64_cpp() -> None:
    x = _strided_x(2, 5, 7, torch.float64, seed=20).requires_grad_(True)
    pe = _rand(5, 7, dtype=torch.float64, seed=21).requires_grad_(True)
    w, b, pw, pb = (_rand(7, dtype=torch.float64, seed=s).requires_grad_(True) for s in (22, 23, 24, 25))
    with mk.use_backend("cpp"):
        assert torch.autograd.gradcheck(mk.layer_norm_add, (x, pe, w, b))
        assert torch.autograd.gradcheck(lambda *a: mk.dual_layer_norm(*a)[0], (x, pe, w, b, pw, pb))
        assert torch.autograd.gradcheck(lambda *a: mk.dual_layer_norm(*a)[1], (x, pe, w, b, pw, pb))
        assert torch.autograd.gradcheck(lambda x, w, b, pe: mk.layer_norm_pool(x, w, b, pe), (x, w, b, pe))
        assert torch.autograd.gradcheck(lambda x, w, b: mk.layer_norm_pool(x, w, b), (x, w, b))


@contextlib.contextmanager
def _tuning(**values: int) -> Iterator[None]:
    old = {k: _C._tune(k, v) for k, v in values.items()}
    try:
        yield
    finally:
        for k, v in old.items():
            _C._tune(k, v)


# Tunings that change how the rows are cut into backward chunks (the default plan, and one with many small
# chunks: several b-blocks each with its own dpe partial, several n-blocks, and the max_chunks cap).
PLANS = {"default": {}, "many-chunks": {"chunk_elems": 2048, "pe_block_b": 2, "min_run": 8, "max_chunks": 64}}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize(
    "B,N,D,pe,pool",
    [
        (8, 197, 192, True, False),
        (256, 4, 192, True, False),
        (9, 197, 200, False, False),
        (8, 197, 192, True, True),
        (64, 197, 768, True, False),
    ],
    ids=["add+pe", "add+pe-few-tokens", "add-odd-B", "pool+pe", "add+pe-large"],
)
def test_backward_bit_identical_across_runs_and_threads(
    B: int, N: int, D: int, pe: bool, pool: bool, plan: str
) -> None:
    x = _strided_x(B, N, D, torch.float32, seed=50)
    w = _rand(D, seed=52)
    p = _rand(N, D, seed=51) if pe else None
    fwd = torch.ops.mpvg.layer_norm_pool if pool else torch.ops.mpvg.layer_norm_add
    y, stats = fwd(x, p, w, w, EPS)
    g = _rand(*y.shape, seed=54)
    bwd = torch.ops.mpvg.layer_norm_pool_backward if pool else torch.ops.mpvg.layer_norm_add_backward
    runs = []
    with _tuning(**PLANS[plan]):
        for threads in (2, 2, 1):
            with _threads(threads):
                runs.append(bwd(g, x, w, stats, pe))
    for other in runs[1:]:
        for name, a, c in zip(("dx", "dpe", "dw", "db"), runs[0], other, strict=True):
            assert torch.equal(a, c), f"{name} differs between runs / thread counts"
    ref = LN.reference_backward(g.double(), x.double(), w.double(), stats.double(), pe, pool)
    for name, a, r in zip(("dx", "dpe", "dw", "db"), runs[0], ref, strict=True):
        _assert_close(f"{name} ({plan})", a, r, None, torch.float32)
    # and the forward: rows are independent, any split is exact
    with _threads(1), _tuning(grain_elems=1):
        y1 = fwd(x, p, w, w, EPS)
    assert all(torch.equal(a, c) for a, c in zip(y1, (y, stats), strict=True))


def test_tune_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown tuning parameter"):
        _C._tune("turbo", 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        _C._tune("chunk_elems", 0)


# ------------------------------------------------------------------------------ opcheck, compile


def _fwd_args(pool: bool, dtype: torch.dtype, has_pe: bool) -> tuple:
    x = _strided_x(2, 6, 10, dtype, seed=60).requires_grad_(True)
    pe = _rand(6, 10, dtype=dtype, seed=61).requires_grad_(True) if has_pe else None
    w, b = _rand(10, dtype=dtype, seed=62).requires_grad_(True), _rand(10, dtype=dtype, seed=63).requires_grad_(True)
    return (x, pe, w, b, EPS)


@pytest.mark.parametrize("pool", [False, True], ids=["add", "pool"])
@pytest.mark.parametrize("has_pe", [True, False], ids=["pe", "nope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_forward_ops(pool: bool, has_pe: bool, dtype: torch.dtype) -> None:
    op = torch.ops.mpvg.layer_norm_pool.default if pool else torch.ops.mpvg.layer_norm_add.default
    torch.library.opcheck(op, _fwd_args(pool, dtype, has_pe))


@pytest.mark.parametrize("pool", [False, True], ids=["add", "pool"])
@pytest.mark.parametrize("has_pe", [True, False], ids=["pe", "nope"])
def test_opcheck_backward_ops(pool: bool, has_pe: bool) -> None:
    x = _strided_x(2, 6, 10, torch.float32, seed=70)
    w = _rand(10, seed=71)
    _, stats = torch.ops.mpvg.layer_norm_add(x, None, w, w, EPS)
    g = _rand(*((2, 10) if pool else (2, 6, 10)), seed=72)
    op = torch.ops.mpvg.layer_norm_pool_backward.default if pool else torch.ops.mpvg.layer_norm_add_backward.default
    torch.library.opcheck(op, (g, x, w, stats, has_pe))


def test_cpu_kernels_are_the_cpp_ones() -> None:
    """The dispatcher's CPU entry of each op is registered from csrc/cpu/ops.cpp, not a Python fallback."""
    for name in ("layer_norm_add", "layer_norm_add_backward", "layer_norm_pool", "layer_norm_pool_backward"):
        dump = torch._C._dispatch_dump(f"mpvg::{name}")
        cpu_lines = [line for line in dump.splitlines() if line.startswith("CPU")]
        assert cpu_lines and "ops.cpp" in cpu_lines[0], dump


def test_compile_fullgraph_matches_eager_and_runs_cpp() -> None:
    def block(x, pos, w, b, pw, pb, lw, lb):
        y, pos1 = mk.dual_layer_norm(x, pos, w, b, pw, pb)
        h = x + torch.tanh(y)
        return mk.layer_norm_pool(h, lw, lb, pos1), mk.layer_norm_add(h, pos1, lw, lb)

    args = [
        _strided_x(3, 16, 32, torch.float32, seed=80).requires_grad_(True),
        _rand(16, 32, seed=81).requires_grad_(True),
    ]
    args += [_rand(32, seed=s).requires_grad_(True) for s in range(82, 88)]
    with mk.use_backend("cpp"):
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend="inductor")
        eager_out = block(*args)
        comp_out = compiled(*args)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            comp_out2 = compiled(*args)
            torch.autograd.grad(sum(o.sum() for o in comp_out2), args)
    names = {e.name for e in prof.events()}
    for op in (
        "mpvg::layer_norm_add",
        "mpvg::layer_norm_pool",
        "mpvg::layer_norm_add_backward",
        "mpvg::layer_norm_pool_backward",
    ):
        assert op in names, f"{op} not run by the compiled code"
    # The reference kernels would show their ATen math under the mpvg ops; the C++ kernels do not.
    assert not names & {"aten::rsqrt", "aten::var_mean", "aten::native_layer_norm"}, sorted(names)
    for e, c in zip(eager_out, comp_out, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    ge = torch.autograd.grad(sum(o.sum() for o in eager_out), args)
    gc = torch.autograd.grad(sum(o.sum() for o in comp_out), args)
    for e, c in zip(ge, gc, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ build without a compiler


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MPVG_BACKEND", "TRITON_INTERPRET")}
    env.update(extra)
    return env


@pytest.mark.parametrize("how", ["no-compiler", "MPVG_NO_CPP"])
def test_setup_without_compiler_builds_nothing_and_says_why(how: str) -> None:
    env = _env(CXX="/nonexistent/c++") if how == "no-compiler" else _env(MPVG_NO_CPP="1")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--build-lib", f"{tmp}/lib", "--build-temp", f"{tmp}/tmp"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        expect = "no C++ compiler" if how == "no-compiler" else "MPVG_NO_CPP=1"
        assert expect in proc.stderr and "cpp backend is not built" in proc.stderr, proc.stderr[-2000:]
        assert not list(Path(tmp).rglob("*.so")), "an extension was built"


_NO_C_SCRIPT = r"""
import sys

class _NoExtension:
    # what an install without a compiler looks like: there is no mpvg_kernels.ops._C to import
    def find_spec(self, name, path=None, target=None):
        if name == "mpvg_kernels.ops._C":
            raise ImportError("No module named 'mpvg_kernels.ops._C' (simulated install without a compiler)")
        return None

sys.meta_path.insert(0, _NoExtension())
import torch
import mpvg_kernels as mk
from mpvg_kernels.ops import backends

loaded, why = backends.cpp_status()
assert not loaded and "simulated install" in why, (loaded, why)
assert "cpp" not in mk.available_backends(), mk.available_backends()
try:
    mk.set_backend("cpp")
except RuntimeError as exc:
    assert "not loaded" in str(exc), exc
else:
    raise AssertionError("set_backend('cpp') should fail without the extension")
x, pe, w, b = torch.randn(2, 4, 8, requires_grad=True), torch.randn(4, 8), torch.randn(8), torch.randn(8)
assert backends.resolve_backend(x.device) == "torch"
y = mk.layer_norm_add(x, pe, w, b)
y.sum().backward()
torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,), w, b, 1e-6) + pe)
out = torch.ops.mpvg.layer_norm_add(x.detach(), pe, w, b, 1e-6)[0]  # the reference kernels serve CPU
torch.testing.assert_close(out, y.detach())
print("OK without _C")
"""


def test_package_works_when_extension_import_fails() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _NO_C_SCRIPT], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "OK without _C" in proc.stdout, proc.stdout + proc.stderr
