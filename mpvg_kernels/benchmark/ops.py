"""Op benchmark (the logic of ``benchmarks/bench_ops.py``): the fused ops of every available backend vs eager
PyTorch vs torch.compile, interleaved in one run.

For each op, shape and dtype, three modes are timed: ``fwd`` (inputs without grad), ``bwd`` (the backward of a
retained graph: gradients of x, pe/pos and every LayerNorm parameter) and ``fwd+bwd``. Candidates:

- ``mpvg[<backend>]``: the public op (``mpvg_kernels.layer_norm_add`` / ``dual_layer_norm`` / ``layer_norm_pool``)
  under each backend available for the device (CPU: ``cpp``, ``torch``; CUDA: ``triton``, ``torch``);
- ``eager``: the same math in plain PyTorch with autograd:
  add ``F.layer_norm(x) + pe``, dual ``F.layer_norm(x) + F.layer_norm(pos)``, pool ``(F.layer_norm(x) + pe).mean(1)``;
- ``compile``: ``torch.compile(fullgraph=True)`` of that eager expression;
- ``copy``: ``dst.copy_(src)`` of a tensor the size of x, the device's copy bandwidth in the same rounds.

Bytes (minimal traffic of the op; parameters and the [B*N] statistics neglected), E = bytes per element of x:
fwd = read x + write y + read pe = (2 B N D + N D) E (pool: (B N D + B D + N D) E);
bwd = read x + read dy + write dx + write dpe = (3 B N D + N D) E (pool: (2 B N D + B D + N D) E);
fwd+bwd = the sum. copy = 2 B N D E. GB/s = bytes / median time.

Timing (:func:`harness.time_interleaved`): round-robin over the candidates, each sample the same number of back-to-back
calls for every candidate, medians after warm-up. CPU: the thread count is set (default 1, the steadiest ratios on
shared cores) and, with one thread, the clock is the thread's CPU time (``--clock``), which leaves out time spent
preempted by other processes; the script re-executes itself with the glibc malloc settings of ``harness.MALLOC_ENV``
so outputs are not page-faulted in on every call. CUDA: CUDA events after an L2 flush.

    python benchmarks/bench_ops.py                    # full run: CPU, 1 thread, fp32 + bf16, all shapes
    python benchmarks/bench_ops.py --quick --out /tmp/b   # CI smoke run (< 30 s)
    python benchmarks/bench_ops.py --device cuda       # GPU: triton backend, CUDA-event timing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops as mk
from ..ops import backends
from . import harness as common

#: where ``benchmarks/bench_ops.py`` writes unless --out says otherwise
DEFAULT_OUT = Path("benchmarks") / "results"

#: name -> (N, D); the batch comes from --batch. DeiT at 224/16 without class token (GAP): N = 196.
SHAPES: dict[str, tuple[int, int]] = {
    "deit_ti": (196, 192),
    "deit_s": (196, 384),
    "deit_b": (196, 768),
    "vit_lite": (64, 256),
    "large_d": (196, 1280),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("add", "dual", "pool")
MODES = ("fwd", "bwd", "fwd+bwd")
EPS = 1e-6
#: The op-level targets, checked on op "add" at deit_ti fp32 (CPU, 2 cores, B = 64): candidate -> minimum speedup.
TARGETS = {
    "fwd": {"eager": 2.0, "compile": 1.0},
    "fwd+bwd": {"eager": 1.5, "compile": 1.0},
}
TARGET_COPY_FRACTION = 0.7
CLOCKS = {
    "wall": "time.perf_counter, or CUDA events on GPU",
    "thread": "time.thread_time: CPU time of the one compute thread, leaving out time preempted by other processes",
}


# ------------------------------------------------------------------------------------------------ cases


def make_inputs(op: str, B: int, N: int, D: int, dtype: torch.dtype, device: str, grad: bool) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(B * 7 + N * 13 + D)

    def t(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        v = (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)
        return v.requires_grad_(grad)

    x = t(B, N, D)
    if op == "dual":  # argument order of the expressions: (x, pos, w, b, pw, pb) / (x, pe, w, b)
        pos = t(N, D, scale=0.02)
        return {
            "x": x,
            "pos": pos,
            "w": t(D, scale=0.1, shift=1.0),
            "b": t(D, scale=0.1),
            "pw": t(D, scale=0.1, shift=1.0),
            "pb": t(D, scale=0.1),
        }
    inputs = {"x": x, "pe": t(N, D, scale=0.02), "w": t(D, scale=0.1, shift=1.0), "b": t(D, scale=0.1)}
    return inputs


def mpvg_expr(op: str) -> Callable[..., torch.Tensor]:
    if op == "add":
        return lambda x, pe, w, b: mk.layer_norm_add(x, pe, w, b, EPS)
    if op == "dual":
        return lambda x, pos, w, b, pw, pb: mk.dual_layer_norm(x, pos, w, b, pw, pb, EPS)[0]
    return lambda x, pe, w, b: mk.layer_norm_pool(x, w, b, pe, EPS)


def eager_expr(op: str) -> Callable[..., torch.Tensor]:
    if op == "add":

        def add(x, pe, w, b):
            return F.layer_norm(x, (x.shape[-1],), w, b, EPS) + pe

        return add
    if op == "dual":

        def dual(x, pos, w, b, pw, pb):
            return F.layer_norm(x, (x.shape[-1],), w, b, EPS) + F.layer_norm(pos, (pos.shape[-1],), pw, pb, EPS)

        return dual

    def pool(x, pe, w, b):
        return (F.layer_norm(x, (x.shape[-1],), w, b, EPS) + pe).mean(1)

    return pool


def op_bytes(op: str, mode: str, B: int, N: int, D: int, elem: int) -> int:
    """Minimal bytes moved (see the module docstring)."""
    x, pe = B * N * D * elem, N * D * elem
    if op == "pool":
        fwd, bwd = x + B * D * elem + pe, 2 * x + B * D * elem + pe
    else:
        fwd, bwd = 2 * x + pe, 3 * x + pe
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def with_backend(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*args: torch.Tensor) -> torch.Tensor:
        with mk.use_backend(name):
            return fn(*args)

    return run


def build_candidates(
    op: str, mode: str, inputs_nograd: dict, inputs_grad: dict, fns: dict[str, Callable[..., torch.Tensor]]
) -> dict[str, Callable[[], object]]:
    """No-argument callables, one per candidate, that run ``mode`` of that candidate."""
    cands: dict[str, Callable[[], object]] = {}
    if mode == "fwd":
        args = tuple(inputs_nograd.values())
        for name, fn in fns.items():
            cands[name] = lambda fn=fn: fn(*args)
        return cands
    leaves = tuple(inputs_grad.values())
    for name, fn in fns.items():
        out = fn(*leaves)
        gout = torch.randn_like(out)
        if mode == "bwd":
            cands[name] = lambda out=out, gout=gout: torch.autograd.grad(out, leaves, gout, retain_graph=True)
        else:
            cands[name] = lambda fn=fn, gout=gout: torch.autograd.grad(fn(*leaves), leaves, gout)
    return cands


def check_candidates(fns: dict[str, Callable[..., torch.Tensor]], inputs: dict, dtype: torch.dtype) -> None:
    """Every candidate computes the eager result (a guard against timing something broken)."""
    args = tuple(inputs.values())
    ref = fns["eager"](*args).float()
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for name, fn in fns.items():
        out = fn(*args).float()
        if not torch.allclose(out, ref, rtol=tol, atol=tol):
            raise RuntimeError(f"{name} disagrees with eager: max error {(out - ref).abs().max().item():.3g}")


# ------------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every candidate of every case (see the module docstring); the result dict the reports are built from."""
    with common.recompile_limit(64):  # one compiled expression per op sees every shape and dtype
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    be = backends.available_backends(device)  # fastest first
    mpvg_names = [f"mpvg[{b}]" for b in be]
    fast = mpvg_names[0]
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for shape_name in args.shapes:
        N, D = (8, 64) if shape_name == "tiny" else SHAPES[shape_name]
        B = 2 if shape_name == "tiny" else args.batch
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            for op in args.ops:
                torch._dynamo.reset()
                fns: dict[str, Callable[..., torch.Tensor]] = {
                    n: with_backend(b, mpvg_expr(op)) for n, b in zip(mpvg_names, be, strict=True)
                }
                fns["eager"] = eager_expr(op)
                if not args.no_compile:
                    fns["compile"] = torch.compile(eager_expr(op), fullgraph=True, dynamic=False)
                inputs_nograd = make_inputs(op, B, N, D, dtype, device, grad=False)
                inputs_grad = make_inputs(op, B, N, D, dtype, device, grad=True)
                check_candidates(fns, inputs_nograd, dtype)
                copy_fn, copy_bytes = common.copy_candidate(B * N * D, dtype, device)
                elem = torch.empty(0, dtype=dtype).element_size()
                for mode in args.modes:
                    cands = build_candidates(op, mode, inputs_nograd, inputs_grad, fns)
                    cands["copy"] = copy_fn
                    timings = common.time_interleaved(
                        cands,
                        device,
                        rounds=args.rounds,
                        warmup=args.warmup,
                        min_sample_s=args.min_sample_s,
                        clock=args.clock,
                    )
                    nbytes = op_bytes(op, mode, B, N, D, elem)
                    copy_gbps = common.gbps(copy_bytes, timings["copy"].median_s)
                    eager_s = timings["eager"].median_s
                    compile_s = timings["compile"].median_s if "compile" in timings else float("nan")
                    for name, tm in timings.items():
                        if name == "copy":
                            continue
                        bw = common.gbps(nbytes, tm.median_s)
                        rows.append(
                            {
                                "op": op,
                                "shape": shape_name,
                                "B": B,
                                "N": N,
                                "D": D,
                                "dtype": dtype_name,
                                "mode": mode,
                                "candidate": name,
                                "ms": tm.median_s * 1e3,
                                "p25_ms": tm.p25_s * 1e3,
                                "p75_ms": tm.p75_s * 1e3,
                                "inner": tm.inner,
                                "bytes": nbytes,
                                "gbps": bw,
                                "copy_gbps": copy_gbps,
                                "copy_ms": timings["copy"].median_s * 1e3,
                                "frac_copy": bw / copy_gbps,
                                "vs_eager": eager_s / tm.median_s,
                                "vs_compile": compile_s / tm.median_s,
                            }
                        )
                    fr = next(r for r in rows[::-1] if r["candidate"] == fast and r["mode"] == mode and r["op"] == op)
                    print(
                        f"{op:5s} {shape_name:9s} {dtype_name} {mode:8s} {fast}: {fr['ms']:8.3f} ms "
                        f"{fr['gbps']:6.1f} GB/s ({fr['frac_copy']:.2f} of copy {copy_gbps:.1f}) "
                        f"x{fr['vs_eager']:.2f} eager x{fr['vs_compile']:.2f} compile",
                        flush=True,
                    )
    return {
        "env": common.environment(device),
        "config": {
            "device": device,
            "batch": args.batch,
            "shapes": {s: SHAPES.get(s, (8, 64)) for s in args.shapes},
            "dtypes": args.dtype,
            "ops": args.ops,
            "modes": args.modes,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "min_sample_s": args.min_sample_s,
            "clock": args.clock,
            "threads": torch.get_num_threads() if device == "cpu" else None,
            "cpp_capability": _cpp_capability(),
            "fast_candidate": fast,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "wall_s": round(time.perf_counter() - t_start, 1),
        },
        "bytes_formula": (
            "fwd = read x + write y + read pe; bwd = read x + read dy + write dx + write dpe; fwd+bwd = sum; "
            "pool: y and dy are [B, D]; copy = read + write of a tensor the size of x; params/stats neglected"
        ),
        "rows": rows,
    }


def _cpp_capability() -> str | None:
    try:
        from ..ops import _C

        return _C.capability()
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------ report


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The op-level targets on add / deit_ti / fp32: checked on the CPU run only (they were set for the C++ kernels
    on CPU; a GPU run reports its figures without them)."""
    if result["config"].get("device", "cpu") != "cpu":
        return []
    fast = result["config"]["fast_candidate"]
    out = []
    for r in result["rows"]:
        if (r["op"], r["shape"], r["dtype"], r["candidate"]) != ("add", "deit_ti", "fp32", fast):
            continue
        for ref, need in TARGETS.get(r["mode"], {}).items():
            got = r[f"vs_{ref}"]
            out.append({"what": f"{r['mode']} speedup vs {ref}", "need": need, "got": got, "met": got >= need})
        if r["mode"] in ("fwd", "fwd+bwd"):
            got = r["frac_copy"]
            out.append(
                {
                    "what": f"{r['mode']} GB/s / copy GB/s",
                    "need": TARGET_COPY_FRACTION,
                    "got": got,
                    "met": got >= TARGET_COPY_FRACTION,
                }
            )
    return out


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (op, shape, dtype, mode): every candidate's time, and the fast backend's ratios."""
    fast = result["config"]["fast_candidate"]
    table: dict[tuple, dict[str, Any]] = {}
    for r in result["rows"]:
        key = (r["op"], r["shape"], r["dtype"], r["mode"])
        row = table.setdefault(
            key,
            {
                "op": r["op"],
                "shape": f"{r['B']}x{r['N']}x{r['D']}",
                "dtype": r["dtype"],
                "mode": r["mode"],
                "copy_gbps": r["copy_gbps"],
            },
        )
        row[f"{r['candidate']}_ms"] = r["ms"]
        if r["candidate"] == fast:
            row.update(gbps=r["gbps"], frac_copy=r["frac_copy"], vs_eager=r["vs_eager"], vs_compile=r["vs_compile"])
    return list(table.values())


def write_reports(result: dict[str, Any], out: Path) -> list[Path]:
    device = result["config"]["device"]
    stem = out / f"ops_{device}"
    fast = result["config"]["fast_candidate"]
    candidates = list(dict.fromkeys(r["candidate"] for r in result["rows"]))
    result["targets"] = targets(result)
    paths = [common.write_json(stem.with_suffix(".json"), result)]

    env, cfg = result["env"], result["config"]
    cols = [("op", "op"), ("shape", "B x N x D"), ("dtype", "dtype"), ("mode", "mode")]
    cols += [(f"{c}_ms", f"{c} ms") for c in candidates]
    cols += [
        ("gbps", f"{fast} GB/s"),
        ("copy_gbps", "copy GB/s"),
        ("frac_copy", "of copy"),
        ("vs_eager", "x eager"),
        ("vs_compile", "x compile"),
    ]
    where = env.get("gpu") or f"{env.get('cpu')}, {env.get('threads')} thread(s)"
    lines = [
        f"# Op benchmark ({device})",
        "",
        f"Device: {where}. torch {env['torch']}, triton {env.get('triton')}, commit {env['git_commit']}, "
        f"{env['time_utc']}. C++ kernels: {cfg['cpp_capability']}. Malloc: {env.get('malloc_env')}.",
        "",
        f"Command: `{cfg['command']}` ({cfg['wall_s']} s). Medians of {cfg['rounds']} interleaved rounds after "
        f"{cfg['warmup']} warm-up calls, clock: {cfg['clock']} ({CLOCKS[cfg['clock']]}); ratios are from this one run "
        f"(x eager = eager time / {fast} time).",
        "",
        f"Bytes: {result['bytes_formula']}.",
        "",
    ]
    if result["targets"]:
        lines += ["## Targets (add, deit_ti, fp32)", ""]
        lines.append(
            common.markdown_table(
                [{**t, "met": "yes" if t["met"] else "NO"} for t in result["targets"]],
                [("what", "target"), ("need", "need"), ("got", "measured"), ("met", "met")],
            )
        )
        lines.append("")
    srows = summary_rows(result)
    lines += ["## Results", "", common.markdown_table(srows, cols), ""]
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines))
    paths.append(md)

    # chart: speedup of the fast backend vs eager and vs compile, per case, one panel per mode
    panels = {}
    for mode in cfg["modes"]:
        sel = [r for r in srows if r["mode"] == mode]
        groups = [f"{r['op']} {r['shape']} {r['dtype']}" for r in sel]
        series = {f"{fast} vs eager": [r.get("vs_eager", float("nan")) for r in sel]}
        if any("compile_ms" in r for r in sel):
            series[f"{fast} vs compile"] = [r.get("vs_compile", float("nan")) for r in sel]
        panels[mode] = (groups, series)
    png = common.bar_chart(
        stem.with_suffix(".png"),
        panels,
        title=f"Speedup of {fast} ({where}; > 1 is faster)",
        xlabel="speedup (x)",
        vline=1.0,
    )
    paths.append(png)
    return paths


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None, default_out: Path | str = DEFAULT_OUT) -> argparse.Namespace:
    """The flags of ``benchmarks/bench_ops.py``; ``default_out``: the --out default."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=[*SHAPES, "tiny"])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch", type=int, default=64, help="B of every shape (default 64)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the steadiest ratios)")
    p.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per candidate first")
    p.add_argument("--min-sample-s", type=float, default=2e-3, help="CPU: repeat calls so a sample lasts this long")
    p.add_argument(
        "--clock",
        choices=["auto", "wall", "thread"],
        default="auto",
        help="CPU timer: wall, or thread CPU time (excludes time preempted by other processes); auto = thread when "
        "--threads 1 on CPU, else wall",
    )
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile candidate")
    p.add_argument("--quick", action="store_true", help="tiny smoke run for CI (< 30 s)")
    p.add_argument(
        "--from-json", type=Path, default=None, help="only rewrite the .md/.png reports from a JSON of an earlier run"
    )
    p.add_argument("--out", type=Path, default=Path(default_out), help="directory for ops_<device>.json/.md/.png")
    args = p.parse_args(argv)
    if args.clock == "auto":
        args.clock = "thread" if args.device == "cpu" and args.threads == 1 else "wall"
    if args.device == "cuda":
        args.clock = "wall"  # CUDA events
    if args.quick:
        args.shapes, args.dtype, args.ops = ["tiny"], ["fp32"], ["add", "pool"]
        args.rounds, args.warmup, args.min_sample_s = 3, 1, 2e-4
    return args


def main(argv: list[str] | None = None, default_out: Path | str = DEFAULT_OUT) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, write the reports; the exit status."""
    args = parse_args(argv, default_out)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        for path in write_reports(result, args.out):
            print(f"wrote {path}")
        return 0
    if args.device == "cpu":
        # re-executes this script once with the malloc settings (docs/design.md#measuring-performance)
        common.ensure_malloc_env()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device available", file=sys.stderr)
        return 2
    result = run(args)
    for path in write_reports(result, args.out):
        print(f"wrote {path}")
    for t in result.get("targets", []):
        print(f"target {t['what']}: need {t['need']}, got {t['got']:.2f} -> {'met' if t['met'] else 'MISSED'}")
    return 0

