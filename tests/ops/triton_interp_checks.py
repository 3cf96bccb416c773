"""Triton kernels under the Triton interpreter (CPU tensors), checked against the float64 reference.

Not collected by a plain ``pytest`` run (the file name does not match ``test_*.py``): it must run in a process
where ``TRITON_INTERPRET=1`` was set before triton and mpvg_kernels were imported. ``test_triton_interpreter.py``
starts that process; to run it by hand::

    TRITON_INTERPRET=1 python -m pytest tests/ops/triton_interp_checks.py -q

What it covers (see ``_direct_cases`` for the exact list):
- the kernels called directly (the launchers ``triton_kernels.forward`` / ``backward``), forward (output and the
  one statistics buffer: means, then rstds) and every gradient, for
  D in {3, 5, 192, 200, 384, 768, 1000, 1280}, N in {1, 16, 197}, B in {0, 1, 3}, with and without pe,
  per-token and pooled, float32 and float16 (plus a few bfloat16 and float64 cases), x contiguous or
  row-strided (last-dim slice of a wider tensor, every other token, batch/token dims transposed); also D = 1,
  fp16 params with fp32 x and the reverse, and eps in {1e-6, 1e-5, 0.1} on rows whose variance is ~eps;
- uneven work splits (several batch elements per backward program, several token tiles per pooled program,
  a short last chunk), forced by lowering the split target;
- the public ops through the ``mpvg::`` custom ops with ``set_backend("triton")``: ``layer_norm_add`` (pe as
  [N, D] and [1, N, D]), ``dual_layer_norm`` (the pos gradient flows through both branches),
  ``layer_norm_pool`` with and without pe, float32 and float16 (fp32 params), 2-D/3-D/4-D and strided x;
- bitwise determinism of the backward, and the B = 0 / empty cases;
- misaligned inputs (a view one element into its storage, rows D + 1 elements apart): the launcher picks
  scalar accesses (``VEC = 1``) and the results still match;
- float arguments rounded to fp32 before the launch, as a GPU receives them: float64 results still match the
  float64 reference to 1e-12 (``1 / N`` and ``eps`` are formed in the accumulation dtype inside the kernels).

Every buffer a kernel writes is filled with NaN just before its launch (``poison`` fixture, around
``triton_kernels.run_kernel``), so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    _WHY = "run through tests/ops/test_triton_interpreter.py (needs TRITON_INTERPRET=1 before importing triton)"
    pytest.skip(reason=_WHY, allow_module_level=True)

import mpvg_kernels  # noqa: E402
from mpvg_kernels.ops import backends  # noqa: E402
from mpvg_kernels.ops import layer_norm as LN  # noqa: E402
from mpvg_kernels.ops import triton_kernels as tk  # noqa: E402

DS = (3, 5, 192, 200, 384, 768, 1000, 1280)
EPS = 1e-6
LAYOUTS = ("contiguous", "slice", "every_other", "transposed")
ATOL_LOW = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: The autograd node the eager fast path records (the op's Function); the registered ops record torch.library's.
EAGER_NODE = f"{LN._LayerNormFn.__name__}Backward"
#: The buffers each kernel writes (its output arguments), which the ``poison`` fixture fills with NaN.
WRITTEN_ARGS = {
    tk._ln_fwd_kernel: ("Y", "Mean"),  # Rstd is the second half of Mean's statistics buffer
    tk._ln_bwd_kernel: ("DX", "Part"),
    tk._sum_partials_kernel: ("O0", "O1", "O2"),
}


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fill every output/partial buffer a kernel writes with NaN just before its launch (every launch of the
    launchers' default ``launch``, ``run_kernel``: direct calls, the registered ops and the eager fast path)."""
    run = tk.run_kernel
    seen = {"launches": 0}

    def poisoned(kernel, grid, args, meta):
        for name in WRITTEN_ARGS[kernel]:
            args[kernel.arg_names.index(name)].fill_(math.nan)
        seen["launches"] += 1
        run(kernel, grid, args, meta)

    monkeypatch.setattr(tk, "run_kernel", poisoned)
    return seen


def stats_halves(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) of one statistics buffer [2 * B * N]: the means, then the reciprocal stds."""
    n = stats.numel() // 2
    assert stats.dim() == 1 and stats.numel() == 2 * n, tuple(stats.shape)
    return stats[:n], stats[n:]


def recorded(launcher, *args) -> list[tk.Launch]:
    """The launches ``launcher(*args)`` (``tk.forward`` or ``tk.backward``) makes, recorded instead of run."""
    launches: list[tk.Launch] = []
    launcher(*args, launch=lambda k, g, a, m: launches.append(tk.Launch(k, g, a, m)))
    return launches


def make_x(
    B: int, N: int, D: int, dtype: torch.dtype, layout: str, gen: torch.Generator, scale: float = 2.0
) -> torch.Tensor:
    """Random x of shape [B, N, D] (values ~ scale * randn + 0.25 * scale) in the given memory layout."""

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + 0.25 * scale).to(dtype)

    if layout == "contiguous":
        x = rnd(B, N, D)
    elif layout == "slice":  # rows D + 24 elements apart
        x = rnd(B, N, D + 24)[:, :, :D]
    elif layout == "every_other":  # x_big[:, ::2, :]
        x = rnd(B, 2 * N, D)[:, ::2, :]
    elif layout == "transposed":  # batch stride D, token stride B * D
        x = rnd(N, B, D).transpose(0, 1)
    elif layout == "offset1":  # contiguous strides, but the data starts one element into its storage
        x = rnd(B * N * D + 1)[1:].view(B, N, D)
    elif layout == "odd_stride":  # rows D + 1 elements apart: no row start is vector aligned
        x = rnd(B, N, D + 1)[:, :, :D]
    else:
        raise ValueError(layout)
    assert x.shape == (B, N, D) and (D == 1 or x.stride(2) == 1)
    return x


def make_params(N: int, D: int, dtype: torch.dtype, param_dtype: torch.dtype, gen: torch.Generator):
    """Random gamma (around 1), beta, pe (not the 1/0 defaults)."""
    w = (1 + 0.5 * torch.randn(D, generator=gen, dtype=torch.float64)).to(param_dtype)
    b = (0.5 * torch.randn(D, generator=gen, dtype=torch.float64)).to(param_dtype)
    pe = (0.5 * torch.randn(N, D, generator=gen, dtype=torch.float64)).to(dtype)
    return w, b, pe


def assert_close(name: str, out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor | None, low: bool):
    """fp32/fp64: |out - ref| <= rtol * |ref| + rtol * max|ref|. fp16/bf16: |out - ref| <= 2 |same - ref| + atol.

    ``ref64`` is the float64 reference; ``same_dtype`` the reference evaluated on the low-precision inputs.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    if out.numel() == 0:
        return
    o = out.double()
    finite = torch.isfinite(o)
    assert finite.all(), f"{name}: non-finite values (unwritten output?) at {(~finite).nonzero()[:5].tolist()}"
    err = (o - ref64).abs()
    if low:
        assert same_dtype is not None
        atol = ATOL_LOW[same_dtype.dtype] if same_dtype.dtype in ATOL_LOW else ATOL_LOW[torch.float16]
        bound = 2 * (same_dtype.double() - ref64).abs() + atol
    else:
        rtol = 1e-12 if out.dtype == torch.float64 else 1e-5
        bound = rtol * ref64.abs() + rtol * max(1.0, ref64.abs().max().item())
    bad = err > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; max err {err.max().item():.3e}; "
            f"first at {i}: got {o[tuple(i)].item():.6g}, ref {ref64[tuple(i)].item():.6g}, "
            f"bound {bound[tuple(i)].item():.3e}"
        )


def check_kernels(B, N, D, dtype, layout, has_pe, pool, seed=0, param_dtype=torch.float32, eps=EPS, scale=2.0):
    """Direct launcher calls vs LN.reference_forward/backward (float64, and in x's dtype for fp16/bf16)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + B * 10_007 + N * 101 + D)
    x = make_x(B, N, D, dtype, layout, gen, scale)
    w, b, pe = make_params(N, D, dtype, param_dtype, gen)
    pe = pe if has_pe else None
    low = dtype in (torch.float16, torch.bfloat16)

    out, stats, _ = tk.forward(x, pe, w, b, eps, pool, True)
    assert out.dtype == dtype and out.is_contiguous()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.dtype == acc and stats.shape == (2 * B * N,)
    mean, rstd = stats_halves(stats)

    f64 = (x.double(), None if pe is None else pe.double(), w.double(), b.double())
    r_out, r_stats = LN.reference_forward(*f64, eps, pool)
    r_mean, r_rstd = stats_halves(r_stats)
    s_out = LN.reference_forward(x, pe, w, b, eps, pool)[0] if low else None
    tag = f"B={B} N={N} D={D} {dtype} {layout} pe={has_pe} pool={pool}"
    assert_close(f"out [{tag}]", out, r_out, s_out, low)
    assert_close(f"mean [{tag}]", mean, r_mean, None, False)
    assert_close(f"rstd [{tag}]", rstd, r_rstd, None, False)

    gen_g = torch.Generator().manual_seed(seed + 7)
    grad = torch.randn(out.shape, generator=gen_g, dtype=torch.float64).to(dtype)
    dx, dpe, dw, db = tk.backward(grad, x, w, stats, has_pe, pool)
    assert dx.dtype == dtype and dx.is_contiguous() and dx.shape == (B, N, D)
    assert dw.dtype == acc and db.dtype == acc and dw.shape == (D,) and db.shape == (D,)
    if has_pe:
        assert dpe is not None and dpe.dtype == acc and dpe.shape == (N, D)
    else:
        assert dpe is None
    refs = LN.reference_backward(grad.double(), x.double(), w.double(), r_stats, has_pe, pool)
    sames = LN.reference_backward(grad, x, w, stats, has_pe, pool) if low else (None,) * 4
    for name, got, ref, same in zip(("dx", "dpe", "dweight", "dbias"), (dx, dpe, dw, db), refs, sames, strict=True):
        if name == "dpe" and not has_pe:
            continue
        assert_close(f"{name} [{tag}]", got, ref, same, low)
    return x, w, stats, grad


def _direct_cases():
    """The sweep: (B, N, D, dtype, layout, has_pe, pool), chosen to cover every axis value and the risky mixes."""
    cases = []
    f32, f16 = torch.float32, torch.float16
    # 1. Every D x {pe, no pe} x {per-token, pool} x {fp32, fp16} at B=3, N=16; layouts rotate.
    i = 0
    for D in DS:
        for dtype in (f32, f16):
            for has_pe in (True, False):
                for pool in (False, True):
                    cases.append((3, 16, D, dtype, LAYOUTS[i % len(LAYOUTS)], has_pe, pool))
                    i += 1
    # 2. N = 197 (a partial last token tile for every ROWS > 1): every D, fp32, with pe, both modes. B=3 where
    #    a program holds several rows, B=1 for the wide D (one or two rows per program) to bound interpreter time.
    for j, D in enumerate(DS):
        B = 3 if D <= 200 else 1
        for pool in (False, True):
            cases.append((B, 197, D, f32, LAYOUTS[(j + pool) % len(LAYOUTS)], True, pool))
    # 3. N = 197 in fp16, strided.
    cases += [(3, 197, 200, f16, "every_other", True, False), (1, 197, 768, f16, "slice", True, True)]
    # 4. N = 1 (one token: pool is the identity up to the mean) for every D.
    for j, D in enumerate(DS):
        cases.append((3, 1, D, (f32, f16)[j % 2], LAYOUTS[j % len(LAYOUTS)], j % 3 != 0, j % 2 == 0))
    # 5. B = 1 with N = 16.
    cases += [(1, 16, D, f32, "slice", True, D % 2 == 0) for D in (5, 384, 1000)]
    # 6. B = 0 (nothing launched; correctly shaped results) for every D and N.
    for D in DS:
        for N in (1, 16, 197):
            cases.append((0, N, D, f32, "contiguous", True, N != 16))
    # 7. bfloat16 and float64 spot checks; D = 1 (constant rows: y = bias + pe).
    cases += [
        (3, 16, 1, f32, "every_other", True, False),
        (3, 16, 1, f16, "contiguous", True, True),
        (3, 16, 200, torch.bfloat16, "slice", True, False),
        (3, 16, 768, torch.bfloat16, "transposed", True, True),
        (3, 16, 200, torch.float64, "every_other", True, False),
        (3, 37, 192, torch.float64, "contiguous", True, True),
    ]
    return cases


def _case_id(c):
    B, N, D, dtype, layout, has_pe, pool = c
    dt = str(dtype).split(".")[-1]
    return f"B{B}-N{N}-D{D}-{dt}-{layout}-{'pe' if has_pe else 'nope'}-{'pool' if pool else 'tok'}"


# ----------------------------------------------------------------------------------------------- tests


def test_interpreter_is_active():
    from triton.runtime.interpreter import InterpretedFunction

    assert backends.TRITON_INTERPRET
    assert isinstance(tk._ln_fwd_kernel, InterpretedFunction) and isinstance(tk._ln_bwd_kernel, InterpretedFunction)


def test_poison_reaches_every_launch(poison):
    """The poison fixture sees the launches (a check that it wraps what the launchers call)."""
    check_kernels(2, 3, 8, torch.float32, "contiguous", True, True)
    assert poison["launches"] >= 3  # forward (+ finish when split), backward and its finish


@pytest.mark.parametrize("case", _direct_cases(), ids=_case_id)
def test_kernels_vs_reference(case):
    check_kernels(*case)


@pytest.mark.parametrize(
    "B,N,D,pool,target",
    [(7, 61, 200, False, 16), (7, 61, 200, True, 16), (5, 37, 768, True, 8), (9, 16, 3, False, 2)],
)
def test_uneven_splits(monkeypatch, B, N, D, pool, target):
    """Several batch elements per backward program, several token tiles per pooled program, short last chunks."""
    monkeypatch.setattr(tk, "_TARGET_PROGRAMS", target)
    cfg = tk.backward_config(D, torch.float32)
    b_per_prog, splits = tk._bwd_split(B, -(-N // cfg.rows), 4, 4)
    assert b_per_prog > 1 and splits * b_per_prog >= B
    check_kernels(B, N, D, torch.float32, "every_other", True, pool, seed=3)


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1])
def test_eps_matters(eps):
    """Rows with variance ~1e-6: eps changes rstd by a large factor, so a dropped or misplaced eps fails."""
    check_kernels(3, 16, 200, torch.float32, "slice", True, False, eps=eps, scale=1e-3)
    check_kernels(2, 16, 768, torch.float32, "contiguous", True, True, eps=eps, scale=1e-3)


def test_fp16_params_with_fp32_x_and_fp32_params_with_fp16_x():
    check_kernels(3, 16, 200, torch.float32, "slice", True, False, param_dtype=torch.float16)
    check_kernels(3, 16, 200, torch.float16, "slice", True, True, param_dtype=torch.float32)


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("D,N,B", [(200, 61, 3), (768, 16, 5)])
def test_backward_is_bitwise_deterministic(D, N, B, pool):
    gen = torch.Generator().manual_seed(11)
    x = make_x(B, N, D, torch.float32, "slice", gen)
    w, b, pe = make_params(N, D, torch.float32, torch.float32, gen)
    out, stats, _ = tk.forward(x, pe, w, b, EPS, pool, True)
    out2, stats2, _ = tk.forward(x, pe, w, b, EPS, pool, True)
    assert torch.equal(out, out2) and torch.equal(stats, stats2)
    grad = torch.randn(out.shape, generator=gen)
    first = tk.backward(grad, x, w, stats, True, pool)
    second = tk.backward(grad, x, w, stats, True, pool)
    for name, a, c in zip(("dx", "dpe", "dweight", "dbias"), first, second, strict=True):
        assert torch.equal(a, c), f"{name} differs between two identical backward runs"


def test_empty_batch_results():
    for pool in (False, True):
        x = torch.empty(0, 16, 200)
        w, b = torch.ones(200), torch.zeros(200)
        out, stats, _ = tk.forward(x, torch.zeros(16, 200), w, b, EPS, pool, True)
        assert out.shape == ((0, 200) if pool else (0, 16, 200)) and stats.shape == (0,)
        grad = torch.empty(out.shape)
        dx, dpe, dw, db = tk.backward(grad, x, w, stats, True, pool)
        assert dx.shape == (0, 16, 200) and dpe.shape == (16, 200) and not dpe.any()
        assert dw.shape == (200,) and not dw.any() and db.shape == (200,) and not db.any()
        _, dpe0, _, _ = tk.backward(grad, x, w, stats, False, pool)
        assert dpe0 is None


# ------------------------------------------------------------------------------ public API (torch.ops path)


@pytest.fixture
def triton_backend(monkeypatch):
    """Select the triton backend and count kernel calls, to prove the public ops reached the Triton kernels (the
    registered ops' launchers and the eager fast path's alike)."""
    calls = {"forward": 0, "backward": 0}

    def counted(kind, fn):
        def wrapper(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)

        return wrapper

    for kind in calls:  # one launcher per direction serves every route
        monkeypatch.setattr(tk, kind, counted(kind, getattr(tk, kind)))
    with mpvg_kernels.use_backend("triton"):
        assert backends.resolve_backend(torch.device("cpu")) == "triton"
        yield calls


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _compare_autograd(name, outs, ref_outs, same_outs, inputs, ref_inputs, same_inputs, low, gen):
    """Backprop the same random cotangents through both graphs; compare outputs and every input gradient."""
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    torch.autograd.backward(outs, [c.to(o.dtype) for c, o in zip(cots, outs, strict=True)])
    torch.autograd.backward(ref_outs, cots)
    if low:
        torch.autograd.backward(same_outs, [c.to(o.dtype) for c, o in zip(cots, same_outs, strict=True)])
    for k, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
        assert_close(f"{name} output {k}", o.detach(), r.detach(), same_outs[k].detach() if low else None, low)
    for k, (i, r) in enumerate(zip(inputs, ref_inputs, strict=True)):
        assert i.grad is not None, f"{name}: input {k} got no gradient"
        assert i.grad.dtype == i.dtype and i.grad.shape == i.shape
        assert_close(f"{name} grad of input {k}", i.grad, r.grad, same_inputs[k].grad if low else None, low)


def _inputs(shape, dtype, layout, gen, pe_shape, param_dtype):
    N, D = shape[-2], shape[-1]
    lead = math.prod(shape[:-2])
    x = make_x(lead, N, D, dtype, layout, gen)
    x = x.reshape(shape) if len(shape) != 3 else x  # 2-D / 4-D views of the 3-D layout (view when possible)
    w, b, pe = make_params(N, D, dtype, param_dtype, gen)
    return x, w, b, pe.reshape(pe_shape)


API_CASES = [
    # (shape, dtype, layout, pe as [1, N, D]?, param dtype)
    ((2, 197, 192), torch.float32, "slice", False, torch.float32),
    ((3, 16, 768), torch.float32, "every_other", True, torch.float32),
    ((2, 2, 16, 200), torch.float32, "contiguous", False, torch.float32),
    ((16, 1000), torch.float32, "contiguous", True, torch.float32),
    ((3, 16, 384), torch.float16, "transposed", False, torch.float32),
    ((3, 16, 5), torch.float16, "contiguous", True, torch.float16),
]


def _api_id(c):
    shape, dtype, layout, pe3, pdt = c
    dt, pdt_name = str(dtype).split(".")[-1], str(pdt).split(".")[-1]
    return f"{'x'.join(map(str, shape))}-{dt}-{layout}-pe{'1ND' if pe3 else 'ND'}-params_{pdt_name}"


@pytest.mark.parametrize("case", API_CASES, ids=_api_id)
def test_layer_norm_add_api(triton_backend, case):
    shape, dtype, layout, pe3, pdt = case
    gen = torch.Generator().manual_seed(21)
    N, D = shape[-2], shape[-1]
    x, w, b, pe = _inputs(shape, dtype, layout, gen, (1, N, D) if pe3 else (N, D), pdt)
    low = dtype in ATOL_LOW
    ins = [_leaf(t) for t in (x, pe, w, b)]
    refs = [_leaf(t.double()) for t in (x, pe, w, b)]
    sames = [_leaf(t) for t in (x, pe, w, b)]
    y = mpvg_kernels.layer_norm_add(*ins, eps=EPS)
    assert y.shape == x.shape and y.dtype == x.dtype
    r = LN.reference_layer_norm_add(*refs, eps=EPS)
    s = LN.reference_layer_norm_add(*sames, eps=EPS)
    _compare_autograd(f"layer_norm_add {case}", [y], [r], [s], ins, refs, sames, low, gen)
    assert triton_backend["forward"] >= 1 and triton_backend["backward"] >= 1


@pytest.mark.parametrize("case", API_CASES[:2] + API_CASES[4:5], ids=_api_id)
def test_dual_layer_norm_api(triton_backend, case):
    """pos_norm is used twice (added to LN(x) and returned for the next layer): its gradient sums both."""
    shape, dtype, layout, pe3, pdt = case
    gen = torch.Generator().manual_seed(22)
    N, D = shape[-2], shape[-1]
    x, w, b, pos = _inputs(shape, dtype, layout, gen, (1, N, D) if pe3 else (N, D), pdt)
    pw = (1 + 0.3 * torch.randn(D, generator=gen, dtype=torch.float64)).to(pdt)
    pb = (0.3 * torch.randn(D, generator=gen, dtype=torch.float64)).to(pdt)
    low = dtype in ATOL_LOW
    ins = [_leaf(t) for t in (x, pos, w, b, pw, pb)]
    refs = [_leaf(t.double()) for t in (x, pos, w, b, pw, pb)]
    sames = [_leaf(t) for t in (x, pos, w, b, pw, pb)]
    y, pos_n = mpvg_kernels.dual_layer_norm(*ins, eps=EPS)
    assert y.shape == x.shape and pos_n.shape == pos.shape
    ry, rp = LN.reference_dual_layer_norm(*refs, eps=EPS)
    sy, sp = LN.reference_dual_layer_norm(*sames, eps=EPS)
    _compare_autograd(f"dual_layer_norm {case}", [y, pos_n], [ry, rp], [sy, sp], ins, refs, sames, low, gen)
    assert triton_backend["forward"] >= 2 and triton_backend["backward"] >= 2


@pytest.mark.parametrize("with_pe", [False, True])
@pytest.mark.parametrize("case", API_CASES, ids=_api_id)
def test_layer_norm_pool_api(triton_backend, case, with_pe):
    shape, dtype, layout, pe3, pdt = case
    gen = torch.Generator().manual_seed(23)
    N, D = shape[-2], shape[-1]
    x, w, b, pe = _inputs(shape, dtype, layout, gen, (1, N, D) if pe3 else (N, D), pdt)
    low = dtype in ATOL_LOW
    tensors = (x, w, b, pe) if with_pe else (x, w, b)
    ins = [_leaf(t) for t in tensors]
    refs = [_leaf(t.double()) for t in tensors]
    sames = [_leaf(t) for t in tensors]
    out = mpvg_kernels.layer_norm_pool(*ins, eps=EPS)
    assert out.shape == (*shape[:-2], D) and out.dtype == dtype
    r = LN.reference_layer_norm_pool(*refs, eps=EPS)
    s = LN.reference_layer_norm_pool(*sames, eps=EPS)
    _compare_autograd(f"layer_norm_pool {case} pe={with_pe}", [out], [r], [s], ins, refs, sames, low, gen)
    assert triton_backend["forward"] >= 1 and triton_backend["backward"] >= 1


def test_double_backward_is_exact(triton_backend):
    """create_graph=True through the Triton-backed ops: gradgradcheck in float64 (second-order terms kept)."""
    g = torch.Generator().manual_seed(50)
    x = torch.randn(2, 5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    pe = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    w, b = (torch.randn(7, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    assert torch.autograd.gradgradcheck(mpvg_kernels.layer_norm_add, (x, pe, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b, pe: mpvg_kernels.layer_norm_pool(x, w, b, pe), (x, w, b, pe))
    assert triton_backend["forward"] > 0


# ------------------------------------------------------------------------------ eager fast path == registered ops

EAGER_CASES = [
    # (shape, x dtype, layout, param dtype, with pe)
    ((3, 16, 200), torch.float32, "slice", torch.float32, True),
    ((2, 2, 16, 192), torch.float16, "contiguous", torch.float32, True),
    ((3, 16, 384), torch.bfloat16, "transposed", torch.bfloat16, False),
    ((3, 17, 5), torch.float64, "every_other", torch.float64, True),
]


def _both_paths(fn, tensors, gen_seed):
    """fn(*leaves) on the registered ops and on the eager path: (outputs, input gradients) of each, and the
    autograd node types seen (to prove which path ran)."""
    results, nodes = [], []
    for fast in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        with backends.use_eager_fast_path(fast):
            outs = fn(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            nodes.append({type(o.grad_fn).__name__ for o in outs})
            gen = torch.Generator().manual_seed(gen_seed)
            cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
            grads = torch.autograd.grad(outs, leaves, cots)
            with torch.no_grad():
                inference = fn(*leaves)
        inference = inference if isinstance(inference, tuple) else (inference,)
        results.append([o.detach() for o in outs] + list(inference) + list(grads))
    return results, nodes


def _assert_bitwise(name, a, b):
    assert len(a) == len(b)
    for k, (u, v) in enumerate(zip(a, b, strict=True)):
        assert u.dtype == v.dtype and u.shape == v.shape, (name, k)
        assert torch.equal(u, v), (
            f"{name}: result {k} differs between the registered ops and the eager path "
            f"(max diff {(u.double() - v.double()).abs().max().item():.3e})"
        )


@pytest.mark.parametrize("case", EAGER_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}-{c[2]}")
def test_eager_path_is_bitwise_the_registered_path(triton_backend, case):
    """layer_norm_add, layer_norm_pool and dual_layer_norm: outputs (with and without grad) and every gradient
    are bitwise equal on both paths; the eager path really ran (its autograd node, its launchers)."""
    shape, dtype, layout, pdt, with_pe = case
    gen = torch.Generator().manual_seed(31)
    N, D = shape[-2], shape[-1]
    x, w, b, pe = _inputs(shape, dtype, layout, gen, (N, D), pdt)
    pw = (1 + 0.3 * torch.randn(D, generator=gen, dtype=torch.float64)).to(pdt)
    pb = (0.3 * torch.randn(D, generator=gen, dtype=torch.float64)).to(pdt)
    fns = {
        "layer_norm_add": (lambda x, pe, w, b: mpvg_kernels.layer_norm_add(x, pe, w, b, eps=EPS), (x, pe, w, b)),
        "layer_norm_pool": (
            (lambda x, w, b, pe: mpvg_kernels.layer_norm_pool(x, w, b, pe, eps=EPS), (x, w, b, pe))
            if with_pe
            else (lambda x, w, b: mpvg_kernels.layer_norm_pool(x, w, b, eps=EPS), (x, w, b))
        ),
        "dual_layer_norm": (
            lambda x, pe, w, b, pw, pb: mpvg_kernels.dual_layer_norm(x, pe, w, b, pw, pb, eps=EPS),
            (x, pe, w, b, pw, pb),
        ),
    }
    for seed, (name, (fn, tensors)) in enumerate(fns.items()):
        before = dict(triton_backend)
        (registered, fast), nodes = _both_paths(fn, tensors, gen_seed=seed)
        _assert_bitwise(f"{name} {case}", registered, fast)
        assert not any(EAGER_NODE in n for n in nodes[0]), nodes
        assert any(EAGER_NODE in n or "View" in n for n in nodes[1]), nodes
        assert triton_backend["forward"] > before["forward"] and triton_backend["backward"] > before["backward"]


@pytest.mark.parametrize("pool", [False, True])
def test_eager_backward_is_bitwise_deterministic(pool):
    """Two identical training steps through the eager path give identical gradients (no atomics, fixed splits)."""
    gen = torch.Generator().manual_seed(12)
    x = make_x(5, 61, 200, torch.float32, "slice", gen)
    w, b, pe = make_params(61, 200, torch.float32, torch.float32, gen)
    runs = []
    with mpvg_kernels.use_backend("triton"), backends.use_eager_fast_path(True):
        for _ in range(2):
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, pe, w, b)]
            out = (
                mpvg_kernels.layer_norm_pool(leaves[0], leaves[2], leaves[3], leaves[1])
                if pool
                else mpvg_kernels.layer_norm_add(*leaves)
            )
            assert type(out.grad_fn).__name__ == EAGER_NODE
            runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for name, a, c in zip(("dx", "dpe", "dweight", "dbias"), *runs, strict=True):
        assert torch.equal(a, c), f"{name} differs between two identical eager backward runs"


def test_eager_double_backward_is_exact():
    """create_graph=True through the eager path: gradgradcheck in float64 (the reference's differentiable math)."""
    g = torch.Generator().manual_seed(51)
    x = torch.randn(2, 5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    pe = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    w, b = (torch.randn(7, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    with mpvg_kernels.use_backend("triton"), backends.use_eager_fast_path(True):
        assert type(mpvg_kernels.layer_norm_add(x, pe, w, b).grad_fn).__name__ == EAGER_NODE
        assert torch.autograd.gradgradcheck(mpvg_kernels.layer_norm_add, (x, pe, w, b))
        assert torch.autograd.gradgradcheck(
            lambda x, w, b, pe: mpvg_kernels.layer_norm_pool(x, w, b, pe), (x, w, b, pe)
        )


@pytest.mark.parametrize("pool", [False, True])
def test_triton_op_bodies_launch_the_same_kernels(poison, pool):
    """The triton_op design's CUDA branch (the launchers with ``launch=`` its ``wrap_triton`` launch), run eagerly on
    CPU tensors here: bitwise what the default launches give, forward and backward; and the bodies as they run on
    CPU (the ``mpvg::`` ops) give the same."""
    from mpvg_kernels.ops import triton_ops

    gen = torch.Generator().manual_seed(14)
    x = make_x(3, 17, 200, torch.float32, "slice", gen)
    w, b, pe = make_params(17, 200, torch.float32, torch.float32, gen)
    want = tk.forward(x, pe, w, b, EPS, pool, True)[:2]
    grad = torch.randn(want[0].shape, generator=gen)
    want_grads = tk.backward(grad, x, w, want[1], True, pool)
    before = poison["launches"]
    got = tk.forward(x, pe, w, b, EPS, pool, True, triton_ops._wrap_launch)[:2]
    got_grads = tk.backward(grad, x, w, want[1], True, pool, None, triton_ops._wrap_launch)
    assert poison["launches"] == before  # every launch went through wrap_triton, none through run_kernel
    for a, c in zip(got + got_grads, want + want_grads, strict=True):
        assert torch.equal(a, c)
    got = triton_ops._forward(x, pe, w, b, EPS, pool) + triton_ops._backward(grad, x, w, want[1], True, pool)
    for a, c in zip(got, want + want_grads, strict=True):
        assert torch.equal(a, c)


# ------------------------------------------------------------------------------ alignment and float arguments


@pytest.mark.parametrize("layout", ["offset1", "odd_stride"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("pool", [False, True])
def test_misaligned_inputs_take_the_scalar_path(layout, dtype, pool):
    """A view one element into its storage (or rows D + 1 apart) must not get vector accesses, and still match."""
    B, N, D = 3, 16, 200
    gen = torch.Generator().manual_seed(5)
    x = make_x(B, N, D, dtype, layout, gen)
    w, b, pe = make_params(N, D, dtype, torch.float32, gen)
    assert recorded(tk.forward, x, pe, w, b, EPS, pool, True)[0].meta["VEC"] == 1
    grad_shape = (B, D) if pool else (B, N, D)
    stats = torch.empty(2 * B * N)
    grad = torch.empty(grad_shape, dtype=dtype)
    assert recorded(tk.backward, grad, x, w, stats, True, pool)[0].meta["VEC"] == 1
    aligned = make_x(B, N, D, dtype, "contiguous", gen)
    vec = recorded(tk.forward, aligned, pe, w, b, EPS, pool, True)[0].meta["VEC"]
    assert vec == 16 // aligned.element_size()
    check_kernels(B, N, D, dtype, layout, True, pool, seed=9)


def test_vector_width_rule():
    assert tk.vector_width(2, (200, 200 * 16), (0,)) == 8
    assert tk.vector_width(2, (1000,), (0, 0)) == 8
    assert tk.vector_width(4, (1000,), (0,)) == 4
    assert tk.vector_width(2, (201,), (0,)) == 1
    assert tk.vector_width(2, (204,), (0,)) == 4
    assert tk.vector_width(2, (200,), (2,)) == 1  # start address 2 bytes off: one element
    assert tk.vector_width(2, (200,), (8,)) == 4
    assert tk.vector_width(8, (), (0,)) == 2


@pytest.fixture
def fp32_float_args(monkeypatch):
    """Round every Python float a kernel receives to fp32, as a GPU launch does (the interpreter keeps doubles)."""
    run = tk.run_kernel
    rounded = {"n": 0}

    def to_fp32(v):
        if isinstance(v, float):
            rounded["n"] += 1
            return float(torch.tensor(v, dtype=torch.float32).item())
        return v

    def launch(kernel, grid, args, meta):
        run(kernel, grid, tuple(to_fp32(a) for a in args), meta)

    monkeypatch.setattr(tk, "run_kernel", launch)
    return rounded


@pytest.mark.parametrize("pool", [False, True])
def test_float64_exact_with_fp32_float_arguments(fp32_float_args, pool):
    """float64 to 1e-12 although floats arrive as fp32: an fp32 ``1 / N`` or ``eps`` would be ~1e-8 off here."""
    B, N, D, eps = 3, 3, 200, 1e-6  # 1 / 3 and 1e-6 are not fp32 numbers; rows with variance ~ eps
    eps32 = float(torch.tensor(eps, dtype=torch.float32).item())
    gen = torch.Generator().manual_seed(17)
    x = make_x(B, N, D, torch.float64, "contiguous", gen, scale=1e-3)
    w, b, pe = make_params(N, D, torch.float64, torch.float64, gen)
    # The test has teeth: eps rounded to fp32 moves the float64 result by more than the 1e-12 tolerance.
    r = LN.reference_forward(x, pe, w, b, eps, pool)[0]
    r32 = LN.reference_forward(x, pe, w, b, eps32, pool)[0]
    assert ((r - r32).abs() / r.abs().max()).max() > 1e-10
    third = torch.tensor(1 / 3, dtype=torch.float32).double().item()
    assert abs(third - 1 / 3) * 3 > 1e-9
    check_kernels(B, N, D, torch.float64, "contiguous", True, pool, seed=17, param_dtype=torch.float64, eps=eps,
                  scale=1e-3)  # fmt: skip
    assert fp32_float_args["n"] > 0
