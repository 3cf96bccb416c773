"""GPU tier: the public ops on a CUDA device through the Triton kernels, against the float64 reference.

Three ways this file runs:

- on a machine with CUDA: every test marked ``gpu`` runs on ``cuda`` tensors at ViT sizes
  (``python -m pytest tests/gpu -m gpu``; ``benchmarks/gpu_check.py`` runs it too);
- in CI without CUDA: ``test_gpu_tier_dry_run`` starts this file again in a subprocess with ``TRITON_INTERPRET=1``,
  where the same tests run on CPU tensors through the Triton interpreter at small sizes (the dry mode), so the
  code of this tier cannot rot; tests that need real hardware (CUDA graphs, torch.compile of the CUDA path,
  CUDA autocast, tensors over 2^31 elements) skip there with the reason;
- without CUDA and without the interpreter (a plain ``pytest`` process): the ``gpu`` tests skip, saying so.

What it checks: each op's forward and backward vs the float64 reference in fp32/fp16/bf16 for D in
{192, 384, 768, 1000, 1280} and odd D; strided and misaligned inputs; int64 offsets (a tensor over 2^31
elements, sampled rows compared); B = 0, N = 1, D = 1; ``torch.library.opcheck``; bitwise-deterministic backward;
CUDA graph capture and replay; ``torch.compile(fullgraph=True)``; autocast bf16; the eager fast path bitwise
equal to the registered ops (and under autocast); the ``triton_op`` design compiled by Inductor.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

import mpvg_kernels  # noqa: E402
from mpvg_kernels.ops import backends, use_eager_fast_path  # noqa: E402
from mpvg_kernels.ops import layer_norm as LN  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
DRY = not CUDA and backends.TRITON_INTERPRET
if CUDA:
    DEVICE = "cuda"
elif DRY:
    DEVICE = "cpu"
else:
    DEVICE = None

gpu = pytest.mark.gpu
needs_device = pytest.mark.skipif(
    DEVICE is None,
    reason="no CUDA device (and TRITON_INTERPRET=1 not set): this tier runs on a GPU; test_gpu_tier_dry_run runs it "
    "on CPU through the Triton interpreter",
)
hardware_only = pytest.mark.skipif(not CUDA, reason="needs a real CUDA device (not covered by the interpreter dry run)")

# Sizes: ViT-like on a GPU, tiny in the dry run (the interpreter runs a kernel program by program in Python).
if CUDA:
    DS = (192, 384, 768, 1000, 1280, 7, 999)
    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    B_, N_ = 8, 197
else:
    DS = (192, 1000, 7)
    DTYPES = (torch.float32, torch.bfloat16)
    B_, N_ = 2, 5
EPS = 1e-6
ATOL_LOW = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
OPS = ("layer_norm_add", "dual_layer_norm", "layer_norm_pool")
#: The plain PyTorch reference under the public functions' names and signatures (``_run``'s ``fn_mod``).
reference = SimpleNamespace(
    layer_norm_add=LN.reference_layer_norm_add,
    dual_layer_norm=LN.reference_dual_layer_norm,
    layer_norm_pool=LN.reference_layer_norm_pool,
)


@pytest.fixture(autouse=True)
def _triton_backend():
    if DEVICE is None:
        yield
        return
    with mpvg_kernels.use_backend("triton"):
        yield


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def _close(
    name: str,
    out: torch.Tensor,
    ref64: torch.Tensor,
    same: torch.Tensor | None,
    x_dtype: torch.dtype | None = None,
    slack: float = 1.0,
) -> None:
    """fp32/fp64 x: relative 1e-5 (1e-10); fp16/bf16 x: |out - ref| <= 2 |same_dtype_torch - ref| + atol."""
    x_dtype = x_dtype or out.dtype
    assert out.shape == ref64.shape, (name, out.shape, ref64.shape)
    if out.numel() == 0:
        return
    o, r = out.detach().double().cpu(), ref64.detach().double().cpu()
    assert torch.isfinite(o).all(), f"{name}: non-finite values"
    err = (o - r).abs()
    if x_dtype in ATOL_LOW:
        assert same is not None
        bound = slack * (2 * (same.detach().double().cpu() - r).abs() + ATOL_LOW[x_dtype])
    else:
        rtol = 1e-10 if out.dtype == torch.float64 else 1e-5
        bound = rtol * r.abs() + rtol * max(1.0, r.abs().max().item())
    bad = err > bound
    assert not bad.any(), f"{name}: {int(bad.sum())}/{bad.numel()} out of tolerance, max err {err.max().item():.3e}"


def _make(B, N, D, dtype, layout="contiguous", seed=0, device=None):
    device = device or DEVICE
    g = torch.Generator().manual_seed(seed * 7919 + B * 101 + N * 13 + D)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)

    if layout == "contiguous":
        x = rnd(B, N, D, scale=2.0, shift=0.5)
    elif layout == "slice":
        x = rnd(B, N, D + 24, scale=2.0, shift=0.5)[:, :, :D]
    elif layout == "transposed":
        x = rnd(N, B, D, scale=2.0, shift=0.5).transpose(0, 1)
    elif layout == "offset1":  # starts one element into its storage: no vector alignment
        x = rnd(B * N * D + 1, scale=2.0, shift=0.5)[1:].view(B, N, D)
    elif layout == "odd_stride":
        x = rnd(B, N, D + 1, scale=2.0, shift=0.5)[:, :, :D]
    else:
        raise ValueError(layout)
    params = dict(
        pe=rnd(N, D, scale=0.5),
        w=(1 + 0.5 * torch.randn(D, generator=g, dtype=torch.float64)).float().to(device),
        b=(0.5 * torch.randn(D, generator=g, dtype=torch.float64)).float().to(device),
        pw=(1 + 0.3 * torch.randn(D, generator=g, dtype=torch.float64)).float().to(device),
        pb=(0.3 * torch.randn(D, generator=g, dtype=torch.float64)).float().to(device),
    )
    return x, params


def _run(op: str, x, p, fn_mod=mpvg_kernels):
    if op == "layer_norm_add":
        return (fn_mod.layer_norm_add(x, p["pe"], p["w"], p["b"], eps=EPS),)
    if op == "dual_layer_norm":
        return fn_mod.dual_layer_norm(x, p["pe"], p["w"], p["b"], p["pw"], p["pb"], eps=EPS)
    return (fn_mod.layer_norm_pool(x, p["w"], p["b"], p["pe"], eps=EPS),)


def _leaves(x, p, conv):
    return conv(x).detach().requires_grad_(True), {k: conv(v).detach().requires_grad_(True) for k, v in p.items()}


def check_op(op: str, B: int, N: int, D: int, dtype: torch.dtype, layout: str = "contiguous", seed: int = 0):
    """Forward and every gradient of one op vs the float64 reference (and same-dtype PyTorch for fp16/bf16)."""
    x0, p0 = _make(B, N, D, dtype, layout, seed)
    x, p = _leaves(x0, p0, lambda t: t)
    xr, pr = _leaves(x0, p0, lambda t: t.double().cpu())
    xs, ps = _leaves(x0, p0, lambda t: t.cpu())
    outs, refs = _run(op, x, p), _run(op, xr, pr, reference)
    sames = _run(op, xs, ps, reference)
    g = torch.Generator().manual_seed(seed + 1)
    cots = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in refs]
    torch.autograd.backward(outs, [c.to(o.dtype).to(o.device) for c, o in zip(cots, outs, strict=True)])
    torch.autograd.backward(refs, cots)
    torch.autograd.backward(sames, [c.to(o.dtype) for c, o in zip(cots, sames, strict=True)])
    tag = f"{op} B={B} N={N} D={D} {_dt(dtype)} {layout}"
    for k, (o, r, s) in enumerate(zip(outs, refs, sames, strict=True)):
        assert o.dtype == x.dtype and o.device == x.device
        _close(f"{tag} out{k}", o, r, s)
    _close(f"{tag} dx", x.grad, xr.grad, xs.grad)
    used = ("pe", "w", "b", "pw", "pb") if op == "dual_layer_norm" else ("pe", "w", "b")
    for k in used:
        assert p[k].grad is not None and p[k].grad.dtype == p[k].dtype, (tag, k)
        # dual_layer_norm's pos gradient is rounded to pos's low-precision dtype between its two uses and then
        # goes through LN' backward: a second rounding the same-dtype PyTorch reference does elsewhere.
        slack = 2.0 if op == "dual_layer_norm" and k == "pe" else 1.0
        _close(f"{tag} d{k}", p[k].grad, pr[k].grad, ps[k].grad, dtype, slack)


# ----------------------------------------------------------------------------------------------- tests


@gpu
@needs_device
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("op", OPS)
def test_ops_vs_reference(op, dtype, D):
    check_op(op, B_, N_, D, dtype)


@gpu
@needs_device
@pytest.mark.parametrize("layout", ["slice", "transposed", "offset1", "odd_stride"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("op", ["layer_norm_add", "layer_norm_pool"])
def test_strided_and_misaligned_inputs(op, dtype, layout):
    check_op(op, B_, N_, 200, dtype, layout, seed=3)


@gpu
@needs_device
@pytest.mark.parametrize("B,N,D", [(0, N_, 192), (B_, 1, 192), (B_, N_, 1), (1, 1, 1)])
@pytest.mark.parametrize("op", OPS)
def test_edge_shapes(op, B, N, D):
    check_op(op, B, N, D, torch.float32, seed=5)


@gpu
@needs_device
@pytest.mark.parametrize("op", OPS)
def test_backward_is_bitwise_deterministic(op):
    x0, p0 = _make(B_ * 4, N_, 1000, torch.bfloat16, seed=7)
    grads = []
    for _ in range(2):
        x, p = _leaves(x0, p0, lambda t: t)
        outs = _run(op, x, p)
        torch.autograd.backward(outs, [torch.ones_like(o) * 0.01 for o in outs])
        grads.append([x.grad] + [p[k].grad for k in ("pe", "w", "b")])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@gpu
@needs_device
@pytest.mark.parametrize("op", ["layer_norm_add", "layer_norm_pool"])
def test_opcheck(op):
    x, p = _make(2, 3, 8 if DRY else 192, torch.float32, seed=9)
    args = [x.requires_grad_(True), p["pe"].float().requires_grad_(True), p["w"].requires_grad_(True)]
    b = p["b"].requires_grad_(True)
    if op == "layer_norm_add":
        torch.library.opcheck(torch.ops.mpvg.layer_norm_add.default, (args[0], args[1], args[2], b, EPS))
    else:
        torch.library.opcheck(torch.ops.mpvg.layer_norm_pool.default, (args[0], args[1], args[2], b, EPS))


@gpu
@needs_device
@hardware_only
def test_int64_offsets():
    """x with more than 2^31 elements: rows past the 2^31-th element are right (sampled rows compared)."""
    free, _ = torch.cuda.mem_get_info()
    B, N, D = 2, 1_100_000, 1000  # 2.2e9 elements; bf16: 4.4 GB per [B, N, D] tensor
    need = 40e9  # x, pe, y, grad, dx, dpe and the backward's partials
    if free < need:
        pytest.skip(reason=f"the >2^31-element tensors need ~{need / 1e9:.0f} GB of free GPU memory; "
                    f"only {free / 1e9:.0f} GB are free on this device")
    x = torch.randn(B, N, D, dtype=torch.bfloat16, device="cuda")
    pe = torch.randn(N, D, dtype=torch.bfloat16, device="cuda")
    w, b = torch.randn(D, device="cuda"), torch.randn(D, device="cuda")
    assert x.numel() > 2**31
    y, stats = torch.ops.mpvg.layer_norm_add(x, pe, w, b, EPS)  # stats: the B * N means, then the rstds
    rows = [(0, 0), (1, N - 1), (1, (2**31 - N * D) // D + 7), (B - 1, N // 2)]
    f64 = (w.double().cpu(), b.double().cpu())
    for bi, ni in rows:
        xr, per = x[bi, ni].cpu()[None, None], pe[ni].cpu()[None]
        r = reference.layer_norm_add(xr.double(), per.double(), *f64)
        s = reference.layer_norm_add(xr, per, w.cpu(), b.cpu())
        _close(f"y row ({bi}, {ni})", y[bi, ni][None, None], r, s)
    del y
    g = torch.randn_like(x)
    dx, _, _, _ = torch.ops.mpvg.layer_norm_add_backward(g, x, w, stats, True)
    for bi, ni in rows:
        k = bi * N + ni
        gr, xr = g[bi, ni].cpu()[None, None], x[bi, ni].cpu()[None, None]
        st = stats[[k, B * N + k]].cpu()  # the row's (mean, rstd): its one-row statistics buffer
        r = LN.reference_backward(gr.double(), xr.double(), f64[0], st.double(), True, False)[0]
        s = LN.reference_backward(gr, xr, w.cpu(), st, True, False)[0]
        _close(f"dx row ({bi}, {ni})", dx[bi, ni][None, None], r, s)


@gpu
@needs_device
@hardware_only
def test_cuda_graph_capture_and_replay():
    x0, p = _make(B_, N_, 768, torch.bfloat16, seed=11)
    x = x0.clone()
    out = {}
    for _ in range(2):  # warm up (compiles, allocator) outside the capture
        out["y"] = mpvg_kernels.layer_norm_add(x, p["pe"], p["w"], p["b"])
        out["pool"] = mpvg_kernels.layer_norm_pool(x, p["w"], p["b"], p["pe"])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out["y"] = mpvg_kernels.layer_norm_add(x, p["pe"], p["w"], p["b"])
        out["pool"] = mpvg_kernels.layer_norm_pool(x, p["w"], p["b"], p["pe"])
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out["y"], mpvg_kernels.layer_norm_add(x, p["pe"], p["w"], p["b"]))
    assert torch.equal(out["pool"], mpvg_kernels.layer_norm_pool(x, p["w"], p["b"], p["pe"]))


@gpu
@needs_device
@hardware_only
@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(op):
    torch._dynamo.reset()
    x0, p0 = _make(B_, N_, 384, torch.bfloat16, seed=13)
    x, p = _leaves(x0, p0, lambda t: t)
    xe, pe_ = _leaves(x0, p0, lambda t: t)
    compiled = torch.compile(lambda x, p: _run(op, x, p), fullgraph=True)
    outs, eager = compiled(x, p), _run(op, xe, pe_)
    for o, e in zip(outs, eager, strict=True):
        assert torch.equal(o, e)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    torch.autograd.backward(eager, [torch.ones_like(o) for o in eager])
    assert torch.equal(x.grad, xe.grad) and torch.equal(p["pe"].grad, pe_["pe"].grad)


@gpu
@needs_device
@hardware_only
@pytest.mark.parametrize("op", OPS)
def test_autocast_bf16(op):
    """Under CUDA autocast the ops compute in float32 and return float32, as F.layer_norm does (B = 0 too)."""
    for B in (B_, 0):
        x, p = _make(B, N_, 384, torch.float32, seed=15)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = _run(op, x.bfloat16(), p)
        assert all(o.dtype == torch.float32 for o in outs), [o.dtype for o in outs]
        ref = _run(op, x.bfloat16().float(), p)
        for o, r in zip(outs, ref, strict=True):
            torch.testing.assert_close(o, r)


# ------------------------------------------------------------------------------ eager fast path, op designs


def _both_paths(op: str, x0, p0, autocast: bool = False):
    """Outputs and every gradient of one op on the registered ops and on the eager fast path."""
    res = []
    for fast in (False, True):
        x, p = _leaves(x0, p0, lambda t: t)
        with use_eager_fast_path(fast), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            outs = _run(op, x, p)
        torch.autograd.backward(outs, [torch.full_like(o, 0.01) for o in outs])
        used = ("pe", "w", "b", "pw", "pb") if op == "dual_layer_norm" else ("pe", "w", "b")
        res.append([o.detach() for o in outs] + [x.grad] + [p[k].grad for k in used])
    return res


@gpu
@needs_device
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_eager_path_is_bitwise_the_registered_path(op, dtype):
    """The eager fast path (cached launch plans, no torch.library layers) launches the same kernels with the same
    splits as the registered ops: outputs and gradients are bitwise equal."""
    x0, p0 = _make(B_, N_, DS[0], dtype, "slice", seed=21)
    registered, fast = _both_paths(op, x0, p0)
    for k, (a, c) in enumerate(zip(registered, fast, strict=True)):
        assert a.dtype == c.dtype and torch.equal(a, c), f"{op} {_dt(dtype)}: result {k} differs"


@gpu
@needs_device
@hardware_only
@pytest.mark.parametrize("op", OPS)
def test_eager_path_under_autocast(op):
    """Under CUDA autocast the eager path casts as the registered autocast rule does: float32, bitwise equal."""
    x0, p0 = _make(B_, N_, 384, torch.bfloat16, seed=23)
    registered, fast = _both_paths(op, x0, p0, autocast=True)
    for k, (a, c) in enumerate(zip(registered, fast, strict=True)):
        assert torch.equal(a, c), f"{op}: result {k} differs under autocast"
    assert all(o.dtype == torch.float32 for o in fast[: 2 if op == "dual_layer_norm" else 1])


@gpu
@needs_device
@hardware_only
@pytest.mark.parametrize("op", OPS)
def test_triton_op_design_under_inductor(op):
    """set_op_design("triton_op"): Inductor compiles the Triton kernels into its own code (no opaque mpvg::
    call), with the eager results, forward and backward."""
    from torch._inductor.utils import run_and_get_code

    from mpvg_kernels.ops import use_op_design

    torch._dynamo.reset()
    x0, p0 = _make(B_, N_, 384, torch.bfloat16, seed=25)
    x, p = _leaves(x0, p0, lambda t: t)
    xe, pe_ = _leaves(x0, p0, lambda t: t)
    with use_op_design("triton_op"):
        compiled = torch.compile(lambda x, p: _run(op, x, p), fullgraph=True)
        outs, codes = run_and_get_code(compiled, x, p)
    eager_outs = _run(op, xe, pe_)
    code = "\n".join(codes)
    assert "_ln_fwd_kernel" in code and "mpvg.layer_norm" not in code, code[-3000:]
    for o, e in zip(outs, eager_outs, strict=True):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    torch.autograd.backward(eager_outs, [torch.ones_like(o) for o in eager_outs])
    torch.testing.assert_close(x.grad, xe.grad, rtol=0, atol=0)
    torch.testing.assert_close(p["pe"].grad, pe_["pe"].grad, rtol=0, atol=0)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ dry run in CI


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="a CUDA device is present: the tier above runs for real")
@pytest.mark.skipif(DRY, reason="already inside the dry run")
def test_gpu_tier_dry_run():
    """Run this file's gpu tests on CPU tensors through the Triton interpreter (small sizes), in a subprocess."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("MPVG_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", "--tb=short"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    print(summary[-1] if summary else out[-2000:])
    assert proc.returncode == 0, out[-20000:]
    passed = int(re.search(r"(\d+) passed", summary[-1]).group(1))
    assert passed >= 40, out[-5000:]
