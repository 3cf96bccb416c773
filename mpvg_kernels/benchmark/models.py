"""Model-level benchmark: training and inference images/s of every PE mode, fused vs unfused, eager vs compiled.

One run measures, for each model and PE mode (``default``, ``lape``, ``pvg``, ``mpvg``):

- ``infer_b1``: inference at batch 1 (latency; reported as images/s = 1 / median seconds per call),
- ``infer_bN``: inference at a large batch (throughput),
- ``train``: one optimisation step (forward + backward + AdamW step) at the training batch,

under each implementation (``fused``: the configured fast backend, ``cpp`` on CPU when built, with the inference
PE cache; ``unfused``: backend ``torch`` and the PE cache switched off, the way the LaPE reference code computes
LN'(pos) at every forward) and each execution mode (``eager``, ``compile`` = ``torch.compile``).

All cases of one model are built first, warmed up, then timed in interleaved rounds (case A, B, C, ..., A, B, C,
...), so machine noise lands on every case alike; the reported figure is the median over all timed calls.
Results go to ``<out>/<name>.json``, ``.md`` and ``.png``. ``benchmarks/bench_models.py`` is the script form of
``mpvg bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..ops import backends

MODES = ("default", "lape", "pvg", "mpvg")
IMPLS = ("fused", "unfused")
EXECS = ("eager", "compile")
TASKS = ("infer_b1", "infer_bN", "train")
DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "vit_lite_7_4_32")
SHORT_NAMES = {
    "deit_tiny_patch16_224": "DeiT-Ti",
    "deit_small_patch16_224": "DeiT-S",
    "deit_base_patch16_224": "DeiT-B",
    "vit_lite_7_4_32": "ViT-Lite-7/4",
    "vit_digits": "ViT-digits",
}
#: The ratio targets of issue 6: MPVG images/s over default-mode images/s (same model, implementation, execution).
TARGETS = {"infer_b1": 0.98, "infer_bN": 0.98, "train": 0.97}

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@dataclass
class BenchConfig:
    """What one benchmark run measures and where it writes."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    impls: list[str] = field(default_factory=lambda: list(IMPLS))
    execs: list[str] = field(default_factory=lambda: list(EXECS))
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    batch_infer: int = 16
    batch_train: int = 8
    #: per-model overrides of (batch_infer, batch_train), e.g. {"vit_lite_7_4_32": (64, 32)}
    batch_overrides: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {
            "deit_tiny_patch16_224": (8, 4),
            "deit_small_patch16_224": (4, 2),
            "vit_lite_7_4_32": (32, 16),
        }
    )
    warmup: int = 2
    rounds: int = 12
    #: calls per timed sample: at least ``iters``, more for fast cases so that one sample lasts ``min_sample_s``
    iters: int = 1
    min_sample_s: float = 0.25
    max_inner: int = 50
    threads: int = 1
    pool: str = "avg"
    seed: int = 0
    out_dir: str = "benchmarks/results"
    name: str = "models_cpu"
    progress: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: compiled cases are costly on CPU (tens of seconds of compilation each): they run only for these models,
    #: modes, implementations and tasks (empty list: all of the run's)
    compile_models: list[str] = field(default_factory=lambda: ["vit_lite_7_4_32"])
    compile_modes: list[str] = field(default_factory=lambda: ["default", "mpvg"])
    compile_impls: list[str] = field(default_factory=list)
    compile_tasks: list[str] = field(default_factory=lambda: ["infer_bN", "train"])

    def wants(self, model: str, mode: str, impl: str, ex: str, task: str) -> bool:
        """Whether the case is part of the run (every eager case; compiled ones per the compile_* filters)."""
        if ex != "compile":
            return True
        return all(
            not allowed or value in allowed
            for value, allowed in (
                (model, self.compile_models),
                (mode, self.compile_modes),
                (impl, self.compile_impls),
                (task, self.compile_tasks),
            )
        )

    def batches(self, model: str) -> tuple[int, int]:
        """(inference batch, training batch) for one model."""
        return tuple(self.batch_overrides.get(model, (self.batch_infer, self.batch_train)))  # type: ignore[return-value]


@dataclass
class Case:
    """One timed configuration: a model, PE mode, implementation, execution mode and task."""

    model: str
    mode: str
    impl: str
    exec: str
    task: str
    batch: int
    run: Callable[[], None] = field(repr=False, default=lambda: None)
    times: list[float] = field(default_factory=list)
    compile_s: float = 0.0
    inner: int = 1
    error: str = ""

    def key(self) -> tuple[str, str, str, str, str]:
        return (self.model, self.mode, self.impl, self.exec, self.task)


# ----------------------------------------------------------------------------------------------- environment


def tune_malloc() -> dict[str, str]:
    """Keep large CPU allocations off mmap (DESIGN.md section 5): env vars when set at start, else ``mallopt``.

    Returns a record of what is in force.
    """
    env = {k: os.environ.get(k, "") for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    if all(env.values()):
        return {**env, "how": "environment"}
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 33554432) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except OSError:
        ok = False
    return {**env, "how": "mallopt(M_MMAP_THRESHOLD=32MiB, M_TRIM_THRESHOLD=2^31-1)" if ok else "not applied"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(cfg: BenchConfig, malloc: dict[str, str]) -> dict[str, Any]:
    """Device, versions, threads and backend state recorded with the results."""
    from .. import __version__

    cpp_ok, cpp_why = backends.cpp_status()
    return {
        "device": "cpu",
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mpvg_kernels": __version__,
        "git_commit": _git_commit(),
        "cpp_backend_loaded": cpp_ok,
        "cpp_backend_note": cpp_why,
        "fused_backend": backends.resolve_backend(torch.device("cpu")),
        "malloc": malloc,
        "loadavg_1m_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ----------------------------------------------------------------------------------------------- model hooks


def build_model(name: str, mode: str, cfg: BenchConfig) -> torch.nn.Module:
    """A freshly initialised model of one PE mode (same seed for every case)."""
    from ..models import create_model

    torch.manual_seed(cfg.seed)
    kwargs = dict(cfg.model_kwargs)
    kwargs.setdefault("pool", cfg.pool)
    return create_model(name, pe=mode, **kwargs)


def input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images a model takes (its ``default_cfg["input_size"]``)."""
    c, h, w = model.default_cfg["input_size"]  # type: ignore[index]
    return int(c), int(h), int(w)


def num_classes(model: torch.nn.Module) -> int:
    """The number of output classes."""
    n = getattr(model, "num_classes", None)
    if n is None:
        n = model.head.out_features  # type: ignore[union-attr]
    return int(n)


@contextlib.contextmanager
def pe_cache_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` without its inference PE cache (LN'(pos) recomputed at every forward, as in the LaPE code)."""
    if not hasattr(model, "pe_cache_enabled"):
        raise RuntimeError(f"{type(model).__name__} has no pe_cache_enabled switch")
    old = model.pe_cache_enabled
    model.pe_cache_enabled = False
    try:
        yield
    finally:
        model.pe_cache_enabled = old


# ----------------------------------------------------------------------------------------------- cases


def _impl_context(impl: str, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    if impl == "fused":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(backends.use_backend("torch"))
    stack.enter_context(pe_cache_disabled(model))
    return stack


def _pair_order(mode: str) -> int:
    """Round order of the modes: default and mpvg (the pair the targets compare) back to back."""
    return ("default", "mpvg", "pvg", "lape").index(mode) if mode in MODES else len(MODES)


def make_cases(name: str, cfg: BenchConfig) -> list[Case]:
    """Build every case of one model.

    Per PE mode there is one inference model (eval mode; shared by the implementations, execution modes and batch
    sizes: the implementation is a context entered at each call) and one training model with its AdamW optimizer
    (shared the same way; its weights drift, which does not change the cost). Compiled cases wrap the shared
    module in their own ``torch.compile`` object (static shapes), so each compiles once for its batch size.
    """
    b_inf, b_train = cfg.batches(name)
    gen = torch.Generator().manual_seed(cfg.seed)
    infer_models: dict[str, torch.nn.Module] = {}
    train_models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    for mode in cfg.modes:
        if any(t != "train" for t in cfg.tasks):
            infer_models[mode] = build_model(name, mode, cfg).eval()
        if "train" in cfg.tasks:
            m = build_model(name, mode, cfg).train()
            train_models[mode] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05))
    ref = next(iter(infer_models.values())) if infer_models else next(iter(train_models.values()))[0]
    c, h, w = input_shape(ref)
    inputs = {  # the same images for every mode
        "infer_b1": torch.randn(1, c, h, w, generator=gen),
        "infer_bN": torch.randn(b_inf, c, h, w, generator=gen),
        "train": torch.randn(b_train, c, h, w, generator=gen),
    }
    labels = torch.randint(0, num_classes(ref), (b_train,), generator=gen)
    cases: list[Case] = []
    # mode innermost: the modes of one (impl, exec, task) run back to back in every round (paired ratios)
    for impl in cfg.impls:
        for ex in cfg.execs:
            for task in cfg.tasks:
                for mode in sorted(cfg.modes, key=_pair_order):
                    if not cfg.wants(name, mode, impl, ex, task):
                        continue
                    x = inputs[task]
                    case = Case(name, mode, impl, ex, task, x.shape[0])
                    model = train_models[mode][0] if task == "train" else infer_models[mode]
                    fn: Callable[[torch.Tensor], torch.Tensor] = model
                    if ex == "compile":
                        fn = torch.compile(model, dynamic=False)
                    if task == "train":
                        case.run = _train_step(model, fn, x, labels, impl, train_models[mode][1])
                    else:
                        case.run = _infer_step(model, fn, x, impl)
                    cases.append(case)
    return cases


def _infer_step(model: torch.nn.Module, fn: Callable, x: torch.Tensor, impl: str) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), _impl_context(impl, model):
            fn(x)

    return run


def _train_step(
    model: torch.nn.Module, fn: Callable, x: torch.Tensor, y: torch.Tensor, impl: str, opt: torch.optim.Optimizer
) -> Callable[[], None]:
    def run() -> None:
        with _impl_context(impl, model):
            loss = torch.nn.functional.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def _time_call(run: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def run_model(name: str, cfg: BenchConfig, bar: Any = None) -> list[Case]:
    """Build, warm up (compiling where asked) and time every case of one model in interleaved rounds."""
    cases = make_cases(name, cfg)
    for case in cases:
        if bar is not None:
            bar.set_postfix_str(
                f"{SHORT_NAMES.get(name, name)} warm-up {case.mode}/{case.impl}/{case.exec}/{case.task}"
            )
        try:
            case.compile_s = _time_call(case.run)  # first call: compilation (if any) + one-time setup
            dt = case.compile_s
            for _ in range(cfg.warmup - 1):
                dt = _time_call(case.run)
            case.inner = max(cfg.iters, min(cfg.max_inner, math.ceil(cfg.min_sample_s / max(dt, 1e-6))))
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the whole run
            case.error = f"{type(exc).__name__}: {exc}"[:500]
        if bar is not None:
            bar.update(cfg.warmup)
    # Round r visits the cases in an order rotated by r (as benchmarks/common.py does), with the garbage
    # collector off, so that neither position in the round nor a collection lands on one case only.
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(cfg.rounds):
            if bar is not None:
                bar.set_postfix_str(f"{SHORT_NAMES.get(name, name)} round {r + 1}/{cfg.rounds}")
            gc.collect()
            gc.disable()
            k = r % max(len(cases), 1)
            for case in cases[k:] + cases[:k]:
                if not case.error:
                    t0 = time.perf_counter()
                    for _ in range(case.inner):
                        case.run()
                    case.times.append((time.perf_counter() - t0) / case.inner)
                if bar is not None:
                    bar.update(1)
            if gc_was_enabled:
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    for case in cases:
        case.run = lambda: None  # drop the model references
    return cases


# ----------------------------------------------------------------------------------------------- results


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(cases: list[Case]) -> list[dict[str, Any]]:
    """One record per case: median seconds per call and images/s."""
    out = []
    for c in cases:
        med = statistics.median(c.times) if c.times else float("nan")
        out.append(
            {
                "model": c.model,
                "mode": c.mode,
                "impl": c.impl,
                "exec": c.exec,
                "task": c.task,
                "batch": c.batch,
                "median_s": med,
                "images_per_s": c.batch / med if c.times else float("nan"),
                "min_s": min(c.times) if c.times else float("nan"),
                "p25_s": _quantile(c.times, 0.25),
                "p75_s": _quantile(c.times, 0.75),
                "n": len(c.times),
                "calls_per_sample": c.inner,
                "times_s": [round(t, 6) for t in c.times],
                "first_call_s": c.compile_s,
                "error": c.error,
            }
        )
    return out


def _paired_ratio(base_times: list[float], times: list[float]) -> float:
    """Median over rounds of (base seconds / seconds) within the same round: drift between rounds cancels."""
    n = min(len(base_times), len(times))
    if n == 0:
        return float("nan")
    return statistics.median(base_times[r] / times[r] for r in range(n))


def ratios(records: list[dict[str, Any]], base: str = "default") -> list[dict[str, Any]]:
    """images/s of every mode over the ``base`` mode's, for the same model, implementation, execution and task.

    ``ratio_vs_default``: ratio of the medians (the figure the targets are checked on); ``paired_ratio``: median of
    the per-round ratios (the modes of one implementation, execution and task run back to back in each round);
    ``best_ratio``: ratio of the fastest calls (noise from other jobs only ever adds time).
    """
    idx = {(r["model"], r["mode"], r["impl"], r["exec"], r["task"]): r for r in records}
    out = []
    for r in records:
        if r["mode"] == base:
            continue
        b = idx.get((r["model"], base, r["impl"], r["exec"], r["task"]))
        if b is None:
            continue
        ratio = r["images_per_s"] / b["images_per_s"]
        paired = _paired_ratio(b.get("times_s", []), r.get("times_s", []))
        best = b["min_s"] / r["min_s"] if r["n"] and b["n"] else float("nan")
        target = TARGETS.get(r["task"]) if r["mode"] == "mpvg" else None
        out.append(
            {
                "model": r["model"],
                "mode": r["mode"],
                "impl": r["impl"],
                "exec": r["exec"],
                "task": r["task"],
                "ratio_vs_default": ratio,
                "paired_ratio": paired,
                "best_ratio": best,
                "target": target,
                "met": None if target is None or ratio != ratio else bool(ratio >= target),
            }
        )
    return out


def speedups(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """fused over unfused images/s, for the same model, mode, execution and task."""
    idx = {(r["model"], r["mode"], r["impl"], r["exec"], r["task"]): r for r in records}
    out = []
    for r in records:
        if r["impl"] != "fused":
            continue
        u = idx.get((r["model"], r["mode"], "unfused", r["exec"], r["task"]))
        if u is not None:
            out.append(
                {
                    "model": r["model"],
                    "mode": r["mode"],
                    "exec": r["exec"],
                    "task": r["task"],
                    "fused_over_unfused": r["images_per_s"] / u["images_per_s"],
                }
            )
    return out


def _fmt_load(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _fmt(v: float) -> str:
    if v != v:
        return "—"
    return f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def to_markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables: images/s, MPVG/PE-mode ratios vs default, fused/unfused speed-ups."""
    env, cfg, recs = result["environment"], result["config"], result["records"]
    lines = [
        f"# Model benchmark ({result['config']['name']})",
        "",
        f"- device: {env['device']} ({env['cpu']}, {env['logical_cpus']} logical CPUs), "
        f"{env['threads']} thread(s); torch {env['torch']}, python {env['python']}, "
        f"mpvg-kernels {env['mpvg_kernels']} ({env['git_commit']})",
        f"- fused backend: `{env['fused_backend']}` (C++ loaded: {env['cpp_backend_loaded']}); "
        f"unfused: backend `torch`, PE cache off",
        f"- malloc: {env['malloc']['how']}; date {env['date_utc']}; run took {result.get('wall_s', 0) / 60:.1f} min; "
        f"1-min load average {_fmt_load(result.get('loadavg_1m_start'))} at start, "
        f"{_fmt_load(env.get('loadavg_1m_end'))} at end "
        "(other jobs share these cores: ratios from one interleaved run only)",
        f"- command: `{env['command']}`",
        f"- medians of {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up call(s); one sample per case "
        f"and round = the mean of enough calls (at least {cfg['iters']}) to last {cfg.get('min_sample_s', 0)} s; "
        "images/s = batch / median seconds per call; train = forward + backward + AdamW step",
        "",
    ]
    tasks = [t for t in TASKS if any(r["task"] == t for r in recs)]
    morder = list(dict.fromkeys(r["model"] for r in recs))

    def order(row: tuple[str, ...]) -> tuple[int, ...]:
        return (morder.index(row[0]), *_row_order(row)[1:])

    lines += _target_table(result, tasks, morder)
    lines += ["## Images/s", ""]
    by_key = {(r["model"], r["mode"], r["impl"], r["exec"], r["task"]): r for r in recs}
    rows = sorted({(r["model"], r["mode"], r["impl"], r["exec"]) for r in recs}, key=order)
    for model in dict.fromkeys(r[0] for r in rows):
        b_inf = next((r["batch"] for r in recs if r["model"] == model and r["task"] == "infer_bN"), None)
        b_tr = next((r["batch"] for r in recs if r["model"] == model and r["task"] == "train"), None)
        lines += [f"### {SHORT_NAMES.get(model, model)} (`{model}`; infer_bN B={b_inf}, train B={b_tr})", ""]
        lines.append("| mode | impl | exec | " + " | ".join(tasks) + " |")
        lines.append("|---|---|---|" + "---:|" * len(tasks))
        for row in rows:
            if row[0] != model:
                continue
            cells = []
            for t in tasks:
                r = by_key.get((*row, t))
                cells.append("error" if r and r["error"] else _fmt(r["images_per_s"]) if r else "")
            lines.append(f"| {row[1]} | {row[2]} | {row[3]} | " + " | ".join(cells) + " |")
        lines.append("")
    rat = result["ratios"]
    if rat:
        lines += [
            "## Ratio to `default` mode (images/s; same model, impl, exec, task)",
            "",
            f"Targets for `mpvg` with `fused`: inference >= {TARGETS['infer_bN']:.0%}, training >= "
            f"{TARGETS['train']:.0%}.",
            "",
            "| model | mode | impl | exec | " + " | ".join(tasks) + " |",
            "|---|---|---|---|" + "---:|" * len(tasks),
        ]
        rk = {(r["model"], r["mode"], r["impl"], r["exec"], r["task"]): r for r in rat}
        for row in sorted({(r["model"], r["mode"], r["impl"], r["exec"]) for r in rat}, key=order):
            cells = []
            for t in tasks:
                r = rk.get((*row, t))
                if r is None or r["ratio_vs_default"] != r["ratio_vs_default"]:
                    cells.append("—")
                    continue
                mark = ""
                if r["met"] is not None and row[2] == "fused":
                    mark = " ✓" if r["met"] else " ✗"
                cells.append(f"{r['ratio_vs_default']:.3f}{mark}")
            lines.append(
                f"| {SHORT_NAMES.get(row[0], row[0])} | {row[1]} | {row[2]} | {row[3]} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    sp = result["speedups"]
    if sp:
        lines += [
            "## Fused over unfused (images/s ratio)",
            "",
            "| model | mode | exec | " + " | ".join(tasks) + " |",
            "|---|---|---|" + "---:|" * len(tasks),
        ]
        sk = {(r["model"], r["mode"], r["exec"], r["task"]): r for r in sp}
        for row in sorted({(r["model"], r["mode"], "", r["exec"]) for r in sp}, key=order):
            cells = []
            for t in tasks:
                r = sk.get((row[0], row[1], row[3], t))
                cells.append(f"{r['fused_over_unfused']:.3f}" if r else "—")
            lines.append(f"| {SHORT_NAMES.get(row[0], row[0])} | {row[1]} | {row[3]} | " + " | ".join(cells) + " |")
        lines.append("")
    errs = [r for r in recs if r["error"]]
    if errs:
        lines += ["## Errors", ""]
        lines += [f"- {r['model']} {r['mode']} {r['impl']} {r['exec']} {r['task']}: `{r['error']}`" for r in errs]
        lines.append("")
    first = [r for r in recs if r["exec"] == "compile" and not r["error"]]
    if first:
        tot = sum(r["first_call_s"] for r in first)
        lines += [f"Compilation (first calls of compiled cases): {tot:.0f} s in all.", ""]
    return "\n".join(lines)


def _target_table(result: dict[str, Any], tasks: list[str], morder: list[str]) -> list[str]:
    """The issue's claim in one table: fused MPVG images/s over fused default (GAP) images/s, per model/exec/task."""
    rat = [r for r in result["ratios"] if r["mode"] == "mpvg" and r["impl"] == "fused"]
    if not rat:
        return []
    lines = [
        "## MPVG vs default (both GAP, fused, same run)",
        "",
        "Target: inference >= 0.98, training >= 0.97. `medians`: ratio of the median images/s (the checked figure); "
        "`paired`: median of the per-round ratios (the modes run back to back in each round); `best`: ratio of "
        "the fastest calls.",
        "",
        "| model | exec | task | medians | paired | best | target | met |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rat, key=lambda r: (morder.index(r["model"]), EXECS.index(r["exec"]), TASKS.index(r["task"]))):
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(
            f"| {SHORT_NAMES.get(r['model'], r['model'])} | {r['exec']} | {r['task']} | {r['ratio_vs_default']:.3f} "
            f"| {r.get('paired_ratio', float('nan')):.3f} | {r.get('best_ratio', float('nan')):.3f} "
            f"| {r['target']:.2f} | {met} |"
        )
    return [*lines, ""]


def _row_order(row: tuple[str, ...]) -> tuple[int, ...]:
    def pos(seq: tuple[str, ...], v: str) -> int:
        return seq.index(v) if v in seq else len(seq)

    return (0, pos(MODES, row[1]), pos(IMPLS, row[2]), pos(EXECS, row[3]))


def plot(result: dict[str, Any], path: Path) -> None:
    """PNG chart: per model and task, images/s of each mode relative to ``default`` mode (same impl and exec), one
    bar group per implementation/execution; the dashed line is the MPVG target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in result["records"] if not r["error"]]
    models = list(dict.fromkeys(r["model"] for r in recs))
    tasks = [t for t in TASKS if any(r["task"] == t for r in recs)]
    if not models or not tasks:
        return
    fig, axes = plt.subplots(len(models), len(tasks), figsize=(4.2 * len(tasks), 3.0 * len(models)), squeeze=False)
    modes = [m for m in MODES if any(r["mode"] == m for r in recs)]
    colors = {"default": "#7f7f7f", "lape": "#1f77b4", "pvg": "#ff7f0e", "mpvg": "#2ca02c"}
    width = 0.8 / max(len(modes), 1)
    idx = {(r["model"], r["mode"], r["impl"], r["exec"], r["task"]): r for r in recs}
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            groups = [
                (im, e)
                for im in IMPLS
                for e in EXECS
                if (model, "default", im, e, task) in idx
                and any((model, m, im, e, task) in idx for m in modes if m != "default")
            ]
            for k, mode in enumerate(modes):
                vals = []
                for g in groups:
                    r, b = idx.get((model, mode, g[0], g[1], task)), idx[(model, "default", g[0], g[1], task)]
                    vals.append(r["images_per_s"] / b["images_per_s"] if r else float("nan"))
                xs = [g + (k - (len(modes) - 1) / 2) * width for g in range(len(groups))]
                ax.bar(xs, vals, width, label=mode, color=colors.get(mode))
            ax.axhline(TARGETS[task], color="black", linewidth=0.8, linestyle="--")
            ax.set_ylim(0.8, 1.1)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{g[0]}\n{g[1]}" for g in groups], fontsize=8)
            batch = next((r["batch"] for r in recs if r["model"] == model and r["task"] == task), "?")
            base = [f"{idx[(model, 'default', g[0], g[1], task)]['images_per_s']:.3g}" for g in groups]
            ax.set_title(
                f"{SHORT_NAMES.get(model, model)} {task} (B={batch}); default img/s: {', '.join(base)}", fontsize=8
            )
            ax.set_ylabel("images/s / default's", fontsize=8)
            ax.tick_params(axis="y", labelsize=8)
    axes[0][0].legend(fontsize=7, ncol=2)
    env = result["environment"]
    fig.suptitle(
        f"images/s relative to default mode (dashed: MPVG target) - {env['cpu']}, {env['threads']} thread(s), "
        f"torch {env['torch']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Write ``name``.json, .md and .png under ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths[1].write_text(to_markdown(result))
    plot(result, paths[2])
    return paths


# ----------------------------------------------------------------------------------------------- driver


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every case of ``cfg`` (model by model, interleaved within a model) and write the result files."""
    malloc = tune_malloc()
    torch.set_num_threads(cfg.threads)
    for m in cfg.modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for lst, known, what in ((cfg.impls, IMPLS, "impl"), (cfg.execs, EXECS, "exec"), (cfg.tasks, TASKS, "task")):
        for v in lst:
            if v not in known:
                raise ValueError(f"unknown {what} {v!r}; choose from {', '.join(known)}")
    if "fused" in cfg.impls and backends.resolve_backend(torch.device("cpu")) == "torch":
        print(
            "warning: the fused implementation resolves to backend 'torch' (C++ backend not loaded: "
            f"{backends.cpp_status()[1]}); fused and unfused then differ only by the PE cache",
            file=sys.stderr,
        )
    per_case = cfg.warmup + cfg.rounds
    total = per_case * sum(
        cfg.wants(m, mode, i, e, t)
        for m in cfg.models
        for mode in cfg.modes
        for i in cfg.impls
        for e in cfg.execs
        for t in cfg.tasks
    )
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="mpvg bench", unit="call", file=sys.stderr, dynamic_ncols=True)
    cases: list[Case] = []
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    dyn = torch._dynamo.config
    old_limit = dyn.recompile_limit
    # many compiled wrappers share one forward code object: keep dynamo from falling back to eager
    dyn.recompile_limit = max(old_limit, 64)
    try:
        for name in cfg.models:
            cases += run_model(name, cfg, bar)
            if "compile" in cfg.execs:
                torch._dynamo.reset()
    finally:
        dyn.recompile_limit = old_limit
        if bar is not None:
            bar.close()
    records = summarise(cases)
    result = {
        "config": asdict(cfg),
        "environment": environment(cfg, malloc),
        "wall_s": time.perf_counter() - t0,
        "loadavg_1m_start": load_start,
        "records": records,
        "ratios": ratios(records),
        "speedups": speedups(records),
    }
    write_results(result, Path(cfg.out_dir), cfg.name)
    return result


def profile_model(name: str, cfg: BenchConfig, top: int = 12) -> str:
    """Where the time goes: ``torch.profiler`` op tables of every (mode, impl, task) case, eager, as Markdown.

    Each case is warmed up, then profiled over ``cfg.rounds`` calls; the table lists the ops with the largest self
    CPU time, and a summary line gives the share of LayerNorm-family ops (``mpvg::*``, ``aten::layer_norm`` and
    the reference's elementwise ops) next to the total.
    """
    from torch.profiler import ProfilerActivity, profile

    sub = BenchConfig(**{**asdict(cfg), "execs": ["eager"], "progress": False})
    lines = [f"## Profile: {SHORT_NAMES.get(name, name)} (`{name}`), eager, {cfg.rounds} call(s) per case", ""]
    for case in make_cases(name, sub):
        for _ in range(max(cfg.warmup, 1)):
            case.run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(cfg.rounds):
                case.run()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        ln = sum(
            e.self_cpu_time_total
            for e in events
            if e.key.startswith("mpvg::") or "layer_norm" in e.key or "native_layer_norm" in e.key
        )
        lines += [
            f"### {case.mode} / {case.impl} / {case.task} (B={case.batch}): "
            f"{total / 1e3 / cfg.rounds:.1f} ms self CPU per call, LayerNorm ops {ln / max(total, 1):.1%}",
            "",
            "| op | calls/call | self CPU ms/call | share |",
            "|---|---:|---:|---:|",
        ]
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
            lines.append(
                f"| `{e.key}` | {e.count / cfg.rounds:.0f} | {e.self_cpu_time_total / 1e3 / cfg.rounds:.2f} | "
                f"{e.self_cpu_time_total / max(total, 1):.1%} |"
            )
        lines.append("")
        case.run = lambda: None
    return "\n".join(lines)


def smoke_config(out_dir: str = "benchmarks/results", name: str = "models_smoke") -> BenchConfig:
    """A run of well under a minute: the small digits model, eager only, few iterations."""
    return BenchConfig(
        models=["vit_digits"],
        execs=["eager"],
        batch_infer=32,
        batch_train=32,
        warmup=2,
        rounds=5,
        iters=1,
        min_sample_s=0.02,
        out_dir=out_dir,
        name=name,
    )


def _csv(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mpvg bench`` / ``benchmarks/bench_models.py``."""
    p.add_argument(
        "--models", type=_csv, default=None, help="comma-separated model names (default: DeiT-Ti, DeiT-S, ViT-Lite)"
    )
    p.add_argument("--modes", type=_csv, default=None, help=f"PE modes (default: {','.join(MODES)})")
    p.add_argument("--impls", type=_csv, default=None, help=f"implementations (default: {','.join(IMPLS)})")
    p.add_argument("--execs", type=_csv, default=None, help=f"execution modes (default: {','.join(EXECS)})")
    p.add_argument("--tasks", type=_csv, default=None, help=f"tasks (default: {','.join(TASKS)})")
    p.add_argument(
        "--compile-models", type=_csv, default=None, help="models with compiled cases (default: vit_lite_7_4_32)"
    )
    p.add_argument("--compile-modes", type=_csv, default=None, help="modes with compiled cases (default: default,mpvg)")
    p.add_argument("--compile-impls", type=_csv, default=None, help="impls with compiled cases (default: all)")
    p.add_argument(
        "--compile-tasks", type=_csv, default=None, help="tasks with compiled cases (default: infer_bN,train)"
    )
    p.add_argument("--batch-infer", type=int, default=None, help="large inference batch (default: 16)")
    p.add_argument("--batch-train", type=int, default=None, help="training batch (default: 8)")
    p.add_argument(
        "--batch",
        action="append",
        default=[],
        metavar="MODEL=INFER,TRAIN",
        help="per-model batch sizes, e.g. vit_lite_7_4_32=64,32 (repeatable)",
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per case, the first compiles (default: 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default: 12)")
    p.add_argument("--iters", type=int, default=None, help="minimum calls per timed sample (default: 1)")
    p.add_argument(
        "--min-sample-s",
        type=float,
        default=None,
        help="fast cases repeat calls until one sample lasts this long (default: 0.25)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1)")
    p.add_argument("--pool", choices=("avg", "cls"), default=None, help="pooling of every model (default: avg)")
    p.add_argument("--out-dir", default=None, help="where to write NAME.json/.md/.png (default: benchmarks/results)")
    p.add_argument("--name", default=None, help="file name stem (default: models_cpu; models_smoke with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny model, eager, few iterations: well under a minute")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: torch.profiler op tables of every eager case (writes NAME_profile.md)",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from parsed flags (``--smoke`` gives the base, explicit flags override it)."""
    cfg = smoke_config() if args.smoke else BenchConfig()
    for attr in (
        "models",
        "modes",
        "impls",
        "execs",
        "tasks",
        "batch_infer",
        "batch_train",
        "warmup",
        "rounds",
        "iters",
        "min_sample_s",
        "threads",
        "compile_models",
        "compile_modes",
        "compile_impls",
        "compile_tasks",
        "pool",
        "out_dir",
        "name",
    ):
        v = getattr(args, attr, None)
        if v is not None:
            setattr(cfg, attr, v)
    for spec in args.batch:
        try:
            model, sizes = spec.split("=", 1)
            bi, bt = (int(s) for s in sizes.split(","))
        except ValueError:
            raise SystemExit(f"--batch expects MODEL=INFER,TRAIN (e.g. vit_lite_7_4_32=64,32), got {spec!r}") from None
        cfg.batch_overrides[model.strip()] = (bi, bt)
    cfg.progress = not args.no_progress
    return cfg


def main(args: argparse.Namespace) -> int:
    """Entry point of ``mpvg bench``: run, write files, print the Markdown summary."""
    cfg = config_from_args(args)
    if args.profile:
        tune_malloc()
        torch.set_num_threads(cfg.threads)
        text = "\n".join(profile_model(m, cfg) for m in cfg.models)
        path = Path(cfg.out_dir) / f"{cfg.name}_profile.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# torch.profiler tables ({torch.get_num_threads()} thread(s))\n\n" + text)
        print(text)
        print(f"wrote {path}", file=sys.stderr)
        return 0
    result = run_bench(cfg)
    print(to_markdown(result))
    out = Path(cfg.out_dir)
    print(f"wrote {out / (cfg.name + '.json')}, .md, .png in {result['wall_s']:.0f} s", file=sys.stderr)
    return 1 if any(r["error"] for r in result["records"]) else 0
