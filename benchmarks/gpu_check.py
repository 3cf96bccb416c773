"""One-command GPU check of the Triton kernels: environment, copy bandwidth, the GPU test tier, op benchmark.

    python benchmarks/gpu_check.py             # on a machine with a CUDA GPU (about 5-8 minutes on an H100/H200)
    python benchmarks/gpu_check.py --dry-run   # the same code path on CPU (Triton interpreter, tiny sizes)

Needs torch, triton, pytest and numpy, nothing built and no network (it puts the checkout on ``sys.path``).
Steps:

1. environment: GPU, SM count, memory, driver/CUDA, torch, triton, Python, the git commit;
2. copy bandwidth: ``dst.copy_(src)`` of a large buffer (read + write bytes / time);
3. the GPU test tier: ``pytest tests/gpu -m gpu`` in a subprocess (summary line kept);
4. op benchmark, for each op (``layer_norm_add``, ``dual_layer_norm``, ``layer_norm_pool`` with pe), D in
   {192, 384, 768, 1000, 1280}, B in {1, 256}, N = 197, bf16 and fp32: forward, backward and forward+backward as
   kernel time (``triton.testing.do_bench``: CUDA events, L2 flushed) and eager wall time per call (back-to-back
   calls through the public function and autograd, host overhead included); GB/s of the minimal bytes (x read,
   y written; for the backward x and dy read, dx written), that rate as a share of the copy bandwidth, and the
   ratios of the time of eager ``F.layer_norm(x) + pe`` (the op's plain PyTorch expression) and of
   ``torch.compile`` of that expression to ours (> 1 means ours is faster);
5. host overhead per call: wall time of back-to-back calls at a tiny shape, where the GPU work is negligible, on
   the eager fast path and through the registered ops;
6. op designs: each op compiled (forward+backward) with the opaque ``mpvg::`` ops and with the ``triton_op`` route.

Writes ``benchmarks/results/gpu_<device>.json`` and ``.md`` (``--out`` to choose the folder) and prints a
summary whose last line says which targets were met: forward >= 90% and backward >= 80% of copy bandwidth at
B = 256, N = 197, D >= 384 in bf16; every op >= 1.0x torch.compile and >= 2x eager (forward+backward, B = 256).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _reexec_for_dry_run(argv: list[str]) -> None:
    """The interpreter must be chosen before triton and mpvg_kernels are imported: restart with it set."""
    if "--dry-run" in argv and os.environ.get("TRITON_INTERPRET") != "1":
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env)
        raise SystemExit(proc.returncode)


if __name__ == "__main__":
    _reexec_for_dry_run(sys.argv[1:])

sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mpvg_kernels  # noqa: E402

OPS = ("layer_norm_add", "dual_layer_norm", "layer_norm_pool")
EPS = 1e-6


class Setup:
    """Sizes and device of one run: the real one, or the dry run on CPU through the Triton interpreter."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        if dry:
            self.ds, self.bs, self.n, self.dtypes = (24,), (1, 2), 3, (torch.bfloat16, torch.float32)
            self.copy_bytes = 1 << 20
        else:
            self.ds, self.bs, self.n = (192, 384, 768, 1000, 1280), (1, 256), 197
            self.dtypes = (torch.bfloat16, torch.float32)
            self.copy_bytes = 1 << 30
        self.target_b = max(self.bs)


# ------------------------------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kernel_ms(fn, setup: Setup) -> float:
    """Device time per call in ms: triton.testing.do_bench on a GPU, a short wall-clock loop in the dry run."""
    if setup.dry:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40))


def wall_ms(fn, setup: Setup, iters: int = 50) -> float:
    """Wall time per back-to-back call in ms (host work included): what an eager training step pays."""
    iters = 1 if setup.dry else iters
    fn()
    _sync(setup.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(setup.device)
    return (time.perf_counter() - t0) / iters * 1e3


# ------------------------------------------------------------------------------------------------- steps


def environment(setup: Setup) -> dict:
    import triton

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda_runtime": torch.version.cuda,
        "dry_run": setup.dry,
    }
    try:
        env["commit"] = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    if setup.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, memory_gb=round(p.total_memory / 1e9, 1),
                   capability=f"{p.major}.{p.minor}")  # fmt: skip
    else:
        env.update(gpu="none (dry run on CPU, Triton interpreter)", sm_count=0, memory_gb=0, capability="-")
    return env


def copy_bandwidth(setup: Setup) -> float:
    """GB/s of dst.copy_(src): bytes read + bytes written per second."""
    n = setup.copy_bytes // 4
    src = torch.empty(n, dtype=torch.float32, device=setup.device).uniform_()
    dst = torch.empty_like(src)
    ms = kernel_ms(lambda: dst.copy_(src), setup)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def test_tier(setup: Setup, timeout_s: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "gpu"), "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "-rfEs", "--tb=short"]  # fmt: skip
    if setup.dry:  # a slice of the tier: the whole dry tier is test_gpu_tier_dry_run's job
        cmd += ["-k", "test_ops_vs_reference and layer_norm_add and float32 and 192"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out, rc = out + f"\n(timed out after {timeout_s} s)", -1
    lines = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    failures = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"command": " ".join(cmd[1:]), "returncode": rc, "summary": lines[-1] if lines else out[-300:],
            "failures": failures[:50], "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def _inputs(op: str, B: int, N: int, D: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device="cpu").manual_seed(B * 31 + D)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).to(device).requires_grad_(True)

    x, pe = rnd(B, N, D), rnd(N, D)
    w, b = rnd(D, dt=torch.float32), rnd(D, dt=torch.float32)
    if op == "dual_layer_norm":
        return (x, pe, w, b, rnd(D, dt=torch.float32), rnd(D, dt=torch.float32))
    return (x, pe, w, b)


def ours(op: str):
    if op == "layer_norm_add":
        return lambda x, pe, w, b: mpvg_kernels.layer_norm_add(x, pe, w, b, EPS)
    if op == "dual_layer_norm":
        return lambda x, pos, w, b, pw, pb: mpvg_kernels.dual_layer_norm(x, pos, w, b, pw, pb, EPS)[0]
    return lambda x, pe, w, b: mpvg_kernels.layer_norm_pool(x, w, b, pe, EPS)


def plain(op: str):
    """The op as plain PyTorch (what a model would write without the fused kernels)."""
    if op == "layer_norm_add":
        return lambda x, pe, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS) + pe
    if op == "dual_layer_norm":

        def dual(x, pos, w, b, pw, pb):
            return F.layer_norm(x, (x.shape[-1],), w, b, EPS) + F.layer_norm(pos, (pos.shape[-1],), pw, pb, EPS)

        return dual
    return lambda x, pe, w, b: (F.layer_norm(x, (x.shape[-1],), w, b, EPS) + pe).mean(-2)


def min_bytes(op: str, B: int, N: int, D: int, es: int) -> dict[str, int]:
    """Bytes each pass must move at least: the op benchmark's count (``mpvg_kernels.benchmark.ops.op_bytes``)."""
    from mpvg_kernels.benchmark.ops import op_bytes

    short = {"layer_norm_add": "add", "dual_layer_norm": "dual", "layer_norm_pool": "pool"}[op]
    return {m: op_bytes(short, m, B, N, D, es) for m in ("fwd", "bwd", "fwd+bwd")}


def _passes(fn, inputs):
    """Callables for the three timed passes of fn on inputs: forward (no grad), backward, forward+backward."""
    with torch.no_grad():
        shape = fn(*inputs).shape
    gy = torch.randn(shape, device=inputs[0].device).to(inputs[0].dtype)
    y = fn(*inputs)

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def bwd():
        torch.autograd.grad(y, inputs, gy, retain_graph=True)

    def both():
        torch.autograd.grad(fn(*inputs), inputs, gy)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def bench_ops(setup: Setup, copy_gbs: float, deadline: float) -> list[dict]:
    rows: list[dict] = []
    compiled: dict[str, object] = {}
    # B = 256 first: the targets are defined there, and torch.compile baselines stop when the time budget is spent.
    for B in sorted(setup.bs, reverse=True):
        for op in OPS:
            for dtype in setup.dtypes:
                for D in setup.ds:
                    inputs = _inputs(op, B, setup.n, D, dtype, setup.device)
                    es = inputs[0].element_size()
                    nbytes = min_bytes(op, B, setup.n, D, es)
                    row = {"op": op, "dtype": str(dtype).split(".")[-1], "D": D, "B": B, "N": setup.n}
                    mine = _passes(ours(op), inputs)
                    eager = _passes(plain(op), inputs)
                    comp = None
                    if setup.dry:
                        row["compile_note"] = "torch.compile skipped in the dry run (CPU inductor build too slow)"
                    elif time.perf_counter() > deadline:
                        row["compile_note"] = "torch.compile skipped: time budget spent"
                    else:
                        key = op
                        if key not in compiled:
                            compiled[key] = torch.compile(plain(op), dynamic=False)
                        try:
                            comp = _passes(compiled[key], inputs)
                        except Exception as exc:  # noqa: BLE001  (report, do not abort the run)
                            row["compile_note"] = f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]
                    for name in ("fwd", "bwd", "fwd+bwd"):
                        k = kernel_ms(mine[name], setup)
                        row[f"{name}_ms"] = k
                        row[f"{name}_eager_call_ms"] = wall_ms(mine[name], setup)
                        row[f"{name}_gbs"] = nbytes[name] / (k * 1e-3) / 1e9
                        row[f"{name}_copy_share"] = row[f"{name}_gbs"] / copy_gbs
                        row[f"{name}_x_eager"] = kernel_ms(eager[name], setup) / k
                        if comp is not None:
                            row[f"{name}_x_compile"] = kernel_ms(comp[name], setup) / k
                    rows.append(row)
                    print(_row_line(row), flush=True)
    return rows


def host_overhead(setup: Setup) -> dict[str, float]:
    """Microseconds per back-to-back call at a tiny shape (host-bound), real launches: forward, backward and
    forward+backward on the eager fast path (the default), and the same through the registered ``mpvg::`` ops
    (``registered_*``, the fast path switched off)."""
    from mpvg_kernels.ops import use_eager_fast_path

    inputs = _inputs("layer_norm_add", 1, 1, 64, torch.float32, setup.device)
    iters = 3 if setup.dry else 2000
    out: dict[str, float] = {}
    for prefix, fast in (("", True), ("registered_", False)):
        with use_eager_fast_path(fast):
            p = _passes(ours("layer_norm_add"), inputs)
            out[f"{prefix}forward_us"] = wall_ms(p["fwd"], setup, iters) * 1e3
            out[f"{prefix}backward_us"] = wall_ms(p["bwd"], setup, iters) * 1e3
            out[f"{prefix}forward_backward_us"] = wall_ms(p["fwd+bwd"], setup, iters) * 1e3
    return out


def op_designs(setup: Setup) -> list[dict]:
    """The two op designs under ``torch.compile`` (``backends.set_op_design``): forward+backward device time of
    each op compiled with the opaque ``mpvg::`` ops and with the ``triton_op`` route (Inductor sees the Triton
    kernels), bf16, the largest D and B; ``triton_op_over_opaque`` > 1 means the triton_op route is slower. The
    dry run compiles with ``aot_eager`` (no Inductor on the interpreter), which checks the path, not the speed."""
    from mpvg_kernels.ops import use_op_design

    B, D = max(setup.bs), max(setup.ds)
    rows = []
    for op in OPS:
        row: dict = {"op": op, "B": B, "D": D, "N": setup.n, "dtype": "bfloat16"}
        inputs = _inputs(op, B, setup.n, D, torch.bfloat16, setup.device)
        for design in ("opaque", "triton_op"):
            torch._dynamo.reset()
            try:
                with use_op_design(design):
                    fn = torch.compile(ours(op), fullgraph=True, backend="aot_eager" if setup.dry else "inductor")
                    row[f"{design}_ms"] = kernel_ms(_passes(fn, inputs)["fwd+bwd"], setup)
            except Exception as exc:  # noqa: BLE001  (report, do not abort the run)
                row[f"{design}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if "opaque_ms" in row and "triton_op_ms" in row:
            row["triton_op_over_opaque"] = row["triton_op_ms"] / row["opaque_ms"]
        rows.append(row)
        print(f"op design {op}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k.endswith(("_ms", "_opaque"))))
    torch._dynamo.reset()
    return rows


# ------------------------------------------------------------------------------------------------- report


def _row_line(r: dict) -> str:
    parts = [f"{r['op']:<16} {r['dtype']:<8} D={r['D']:<5} B={r['B']:<4}"]
    for name in ("fwd", "bwd", "fwd+bwd"):
        comp = r.get(f"{name}_x_compile")
        parts.append(
            f"{name} {r[f'{name}_ms'] * 1e3:8.1f}us {r[f'{name}_gbs']:7.1f}GB/s {r[f'{name}_copy_share']:5.0%} "
            f"x{r[f'{name}_x_eager']:.2f}eager " + (f"x{comp:.2f}compile" if comp is not None else "")
        )
    return " | ".join(parts)


def targets(rows: list[dict], setup: Setup) -> dict[str, dict]:
    big = [r for r in rows if r["B"] == setup.target_b]
    bw = [r for r in big if r["dtype"] == "bfloat16" and r["D"] >= (384 if not setup.dry else 0)]
    out: dict[str, dict] = {}

    def worst(rs, key):
        vals = [(r[key], f"{r['op']} {r['dtype']} D={r['D']}") for r in rs if key in r]
        return min(vals) if vals else (float("nan"), "not measured")

    v, at = worst(bw, "fwd_copy_share")
    out["forward >= 90% of copy bandwidth"] = {"met": v >= 0.90, "worst": v, "at": at}
    v, at = worst(bw, "bwd_copy_share")
    out["backward >= 80% of copy bandwidth"] = {"met": v >= 0.80, "worst": v, "at": at}
    v, at = worst(big, "fwd+bwd_x_compile")
    out["every op >= 1.0x torch.compile"] = {"met": v >= 1.0, "worst": v, "at": at}
    v, at = worst(big, "fwd+bwd_x_eager")
    out["every op >= 2x eager"] = {"met": v >= 2.0, "worst": v, "at": at}
    return out


def _design_line(r: dict) -> str:
    cells = [f"{d} " + (f"{r[d + '_ms']:.3f}" if d + "_ms" in r else f"failed ({r.get(d + '_error', '?')})")
             for d in ("opaque", "triton_op")]  # fmt: skip
    return f"{r['op']}: " + ", ".join(cells)


def write_markdown(path: Path, res: dict) -> None:
    env, t = res["environment"], res["targets"]
    lines = [f"# GPU check: {env['gpu']}", "", f"Commit {env['commit']}, {env['date_utc']}; torch {env['torch']}, "
             f"triton {env['triton']}, Python {env['python']}, CUDA {env['cuda_runtime']}, {env['sm_count']} SMs.", "",
             f"Copy bandwidth: {res['copy_gbs']:.1f} GB/s.", "", f"GPU test tier: `{res['tests'].get('summary', '')}`",
             "", "Host overhead per call (tiny shape, back to back; eager fast path, then registered ops): "
             + ", ".join(f"{k} {v:.1f} us" for k, v in res["host_overhead"].items()), "",
             "Op designs under torch.compile (fwd+bwd ms): " + "; ".join(_design_line(r) for r in res["op_designs"]),
             "", "## Targets", ""]  # fmt: skip
    for name, v in t.items():
        lines.append(f"- {name}: {'met' if v['met'] else 'NOT met'} (worst {v['worst']:.2f} at {v['at']})")
    lines += ["", "## Ops (kernel time; GB/s of minimal bytes; share of copy bandwidth; speed-up vs eager and "
              "torch.compile of the plain expression)", "",
              "| op | dtype | D | B | pass | us | GB/s | copy share | eager call us | x eager | x compile |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["ops"]:
        for name in ("fwd", "bwd", "fwd+bwd"):
            comp = r.get(f"{name}_x_compile")
            lines.append(
                f"| {r['op']} | {r['dtype']} | {r['D']} | {r['B']} | {name} | {r[f'{name}_ms'] * 1e3:.1f} | "
                f"{r[f'{name}_gbs']:.0f} | {r[f'{name}_copy_share']:.0%} | {r[f'{name}_eager_call_ms'] * 1e3:.1f} | "
                f"{r[f'{name}_x_eager']:.2f} | {'-' if comp is None else f'{comp:.2f}'} |"
            )
    lines += ["", "Model-level images/s: not measured by this script."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes (for CI)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the json/md results")
    ap.add_argument("--skip-tests", action="store_true", help="leave out the GPU test tier")
    ap.add_argument("--budget-s", type=float, default=360.0, help="after this, torch.compile baselines are skipped")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    if not a.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --dry-run to exercise this script on CPU")
        return 2
    setup = Setup(a.dry_run)
    mpvg_kernels.set_backend("triton")
    res: dict = {"environment": environment(setup)}
    print("environment:", json.dumps(res["environment"]), flush=True)
    res["copy_gbs"] = copy_bandwidth(setup)
    print(f"copy bandwidth: {res['copy_gbs']:.1f} GB/s", flush=True)
    if a.skip_tests:
        res["tests"] = {"summary": "skipped (--skip-tests)"}
    else:
        res["tests"] = test_tier(setup, timeout_s=120 if setup.dry else 240)
    print(f"GPU test tier: {res['tests']['summary']}", flush=True)
    from mpvg_kernels.benchmark.harness import recompile_limit

    # one compiled function per op sees every shape and dtype: allow the recompiles
    with recompile_limit(1024):
        res["ops"] = bench_ops(setup, res["copy_gbs"], t_start + a.budget_s)
    res["host_overhead"] = host_overhead(setup)
    print("host overhead per call: " + ", ".join(f"{k} {v:.1f}" for k, v in res["host_overhead"].items()))
    with recompile_limit(1024):
        res["op_designs"] = op_designs(setup)
    res["targets"] = targets(res["ops"], setup)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    name = re.sub(r"[^A-Za-z0-9]+", "_", res["environment"]["gpu"] if not setup.dry else "dry_run").strip("_").lower()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    write_markdown(out / f"gpu_{name}.md", res)
    print(f"wrote {out / f'gpu_{name}.json'} and .md in {res['seconds']} s")
    met = [k for k, v in res["targets"].items() if v["met"]]
    missed = [k for k, v in res["targets"].items() if not v["met"]]
    tests_ok = res["tests"].get("returncode", 0) == 0
    print(f"targets met: {', '.join(met) or 'none'}; not met: {', '.join(missed) or 'none'}; "
          f"GPU tests {'passed' if tests_ok else 'FAILED'}")  # fmt: skip
    return 0 if tests_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
