"""The one timing harness of the benchmarks (ops, models): malloc settings, interleaved timing, quantiles,
environment capture, bandwidth, and JSON/Markdown/PNG reports.

Timing model (docs/design.md#measuring-performance): every candidate of one case is built and warmed up first, then
timed in interleaved rounds (round r visits the candidates in an order rotated by r), and each candidate's figure is
the median of its per-round samples. Machine noise therefore lands on every candidate alike and the ratios measured
in one run are what a report claims.

- CPU: a ``time.perf_counter`` (or thread CPU time) loop with the garbage collector off; each sample runs the
  candidate ``inner`` times back to back and reports the mean per call. The op benchmark gives every candidate the
  same count, calibrated so that the fastest one's sample lasts at least ``min_sample_s``; the model benchmark,
  whose cases differ by orders of magnitude, calibrates each case on its own time. Caches are not flushed: every
  candidate starts its sample after the others have run (so its inputs are partly evicted) and continues in its own
  steady state.
- CUDA: CUDA events around one call per sample, after zeroing a 256 MiB buffer to flush the L2 cache (the scheme
  of ``triton.testing.do_bench``), synchronising once per round.

Large fresh allocations on glibc go through mmap and page faults, which makes the same CPU op take 1.5 ms or 10 ms
at random; the settings of :data:`MALLOC_ENV` (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_MMAP_MAX_``) make glibc reuse freed blocks instead. A script applies them with :func:`ensure_malloc_env`
(re-executes itself with the variables set); code that cannot re-execute its process (``mpvg bench``, tests) with
:func:`tune_malloc` (the same three settings through ``mallopt``).
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: glibc malloc settings for CPU benchmarks (docs/design.md#measuring-performance): freed blocks stay in the heap
#: and are reused instead of being unmapped and page-faulted in again on the next allocation. MALLOC_MMAP_MAX_=0
#: extends this to blocks above 32 MiB, the largest mmap threshold glibc accepts on 64-bit: without it every output
#: the size of a DeiT-B fp32 activation (38.5 MB) is a fresh mmap, and its page faults (~9,400 of them) dominate the
#: op's time.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "1000000000000",
    "MALLOC_MMAP_MAX_": "0",
}


#: mallopt parameter numbers (glibc malloc.h) of the variables of MALLOC_ENV
_MALLOPT_PARAMS = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_MMAP_MAX_": -4}
_INT_MAX = 2**31 - 1  # mallopt takes a C int: the trim threshold above is clamped to 2 GiB, the most it accepts

#: what is in force, for :func:`environment` (set by :func:`tune_malloc`)
_malloc_how: str | None = None


def ensure_malloc_env() -> None:
    """Re-execute this Python process with the glibc malloc settings of :data:`MALLOC_ENV` unless already set.

    Must run before anything worth keeping happens (the process is replaced). A no-op off Linux, or when the
    variables are already present (so it never loops).
    """
    if not sys.platform.startswith("linux") or all(k in os.environ for k in MALLOC_ENV):
        return
    env = dict(os.environ)
    env.update({k: v for k, v in MALLOC_ENV.items() if k not in env})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def tune_malloc() -> dict[str, str]:
    """Apply the settings of :data:`MALLOC_ENV` to this process without re-executing it.

    When the variables are already set at start (by :func:`ensure_malloc_env` or the caller) nothing is needed;
    otherwise each is applied with ``mallopt`` (the trim threshold clamped to 2^31-1, the largest int mallopt
    takes). Returns (and records for :func:`environment`) what is in force: ``{"how": ..., **variables}``.
    """
    global _malloc_how
    if all(k in os.environ for k in MALLOC_ENV):
        how = "environment"
    else:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = all(
                libc.mallopt(_MALLOPT_PARAMS[k], min(int(v), _INT_MAX)) == 1 for k, v in MALLOC_ENV.items()
            )
        except (OSError, AttributeError):
            ok = False
        how = (
            "mallopt(" + ", ".join(f"{k.strip('_')[7:]}={min(int(v), _INT_MAX)}" for k, v in MALLOC_ENV.items()) + ")"
            if ok
            else "not applied"
        )
    _malloc_how = how
    return malloc_state()


def malloc_state() -> dict[str, str]:
    """``{"how": environment | mallopt(...) | not applied, MALLOC_*: the variables (empty when unset)}``."""
    how = _malloc_how or ("environment" if all(k in os.environ for k in MALLOC_ENV) else "not applied")
    return {**{k: os.environ.get(k, "") for k in MALLOC_ENV}, "how": how}


# --------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Per-call seconds of one candidate: median and quartiles over the timed rounds (one sample per round)."""

    median_s: float
    p25_s: float
    p75_s: float
    samples: int
    inner: int
    all_s: list[float] = field(default_factory=list, repr=False)
    #: seconds of the first warm-up call (compilation and one-time setup included)
    first_call_s: float = float("nan")

    @property
    def min_s(self) -> float:
        return min(self.all_s) if self.all_s else float("nan")

    @classmethod
    def of(cls, samples: Sequence[float], inner: int = 1, first_call_s: float = float("nan")) -> Timing:
        """The statistics of per-call ``samples`` (NaN when there are none)."""
        s = list(samples)
        return cls(
            median_s=statistics.median(s) if s else float("nan"),
            p25_s=quantile(s, 0.25),
            p75_s=quantile(s, 0.75),
            samples=len(s),
            inner=inner,
            all_s=s,
            first_call_s=first_call_s,
        )


@contextlib.contextmanager
def recompile_limit(n: int) -> Iterator[None]:
    """Let Dynamo recompile one function up to ``n`` times (per function and accumulated) while the block runs,
    then restore the limits: past them Dynamo silently runs the function eagerly, and a "compile" case would
    time eager code."""
    import torch._dynamo

    cfg = torch._dynamo.config
    names = [a for a in ("recompile_limit", "accumulated_recompile_limit") if hasattr(cfg, a)]
    old = {a: getattr(cfg, a) for a in names}
    for a in names:
        setattr(cfg, a, max(old[a], n))
    try:
        yield
    finally:
        for a, v in old.items():
            setattr(cfg, a, v)


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A 256 MiB buffer on ``device`` whose ``zero_()`` before a CUDA sample evicts the L2 cache."""
    return torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` with linear interpolation between order statistics (NaN when empty)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    *,
    rounds: int = 25,
    warmup: int = 3,
    min_sample_s: float = 2e-3,
    min_inner: int = 1,
    max_inner: int = 1000,
    inner: str = "shared",
    clock: str = "wall",
    collect_each_round: bool = False,
    errors: dict[str, str] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Timing]:
    """Time every candidate (a no-argument callable) in ``rounds`` interleaved rounds; medians per call.

    ``warmup`` untimed calls per candidate come first (the first one's time is ``Timing.first_call_s``); the
    last of them calibrates the per-sample repeat count on CPU: ``inner="shared"`` gives every candidate the same
    count (so that none gets warmer caches from more back-to-back calls than another), calibrated on the fastest so
    that its sample lasts at least ``min_sample_s``; ``inner="each"`` calibrates each candidate on its own time.
    Counts stay within [``min_inner``, ``max_inner``]. On CUDA each sample is a single call timed with CUDA events
    after an L2 flush.

    ``clock`` (CPU only): ``wall`` (``time.perf_counter``) or ``thread`` (``time.thread_time``: CPU time of the
    calling thread). With one compute thread every candidate runs on the calling thread, and the thread clock leaves
    out the time this process spends preempted on a shared machine, which otherwise dominates the noise.

    The garbage collector is off while timing (``collect_each_round``: a collection before every round instead of
    once). ``errors``: when given, a candidate that raises during warm-up is left out of the timing and its error
    recorded there (else the exception propagates). ``progress(label, calls)``: called with a label when a
    candidate's warm-up or a round starts, and with the number of calls made after each warm-up and sample.
    """
    device = torch.device(device)
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    if inner not in ("shared", "each"):
        raise ValueError(f"inner must be 'shared' or 'each', got {inner!r}")
    now = time.thread_time if clock == "thread" else time.perf_counter
    names = list(candidates)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for name in list(names):
        if progress is not None:
            progress(f"warm-up {name}", 0)
        try:
            for i in range(max(1, warmup)):
                sync(device)
                t0 = time.perf_counter()
                candidates[name]()
                sync(device)
                last[name] = max(time.perf_counter() - t0, 1e-7)
                if i == 0:
                    first[name] = last[name]
        except Exception as exc:  # noqa: BLE001 - recorded for the report when the caller asks
            if errors is None:
                raise
            errors[name] = f"{type(exc).__name__}: {exc}"[:500]
            names.remove(name)
        if progress is not None:
            progress("", warmup)
    sync(device)

    def count(seconds: float) -> int:
        return int(max(min_inner, min(max_inner, math.ceil(min_sample_s / seconds))))

    n_inner = {name: 1 for name in names}
    if device.type == "cpu" and names:
        fastest = min(last[name] for name in names)
        n_inner = {name: count(fastest if inner == "shared" else last[name]) for name in names}

    samples: dict[str, list[float]] = {name: [] for name in names}
    flush = l2_flush_buffer(device) if device.type == "cuda" else None
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            if progress is not None:
                progress(f"round {r + 1}/{rounds}", 0)
            if collect_each_round:
                gc.collect()
            k = r % max(len(names), 1)
            order = names[k:] + names[:k]
            if device.type == "cuda":
                events = []
                for name in order:
                    flush.zero_()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    candidates[name]()
                    end.record()
                    events.append((name, start, end))
                    if progress is not None:
                        progress("", 1)
                torch.cuda.synchronize(device)
                for name, start, end in events:
                    samples[name].append(start.elapsed_time(end) * 1e-3)
            else:
                for name in order:
                    fn, n = candidates[name], n_inner[name]
                    t0 = now()
                    for _ in range(n):
                        fn()
                    samples[name].append((now() - t0) / n)
                    if progress is not None:
                        progress("", 1)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing.of(s, n_inner[name], first[name]) for name, s in samples.items()}


def gbps(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (10^9 bytes per second)."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def copy_candidate(numel: int, dtype: torch.dtype, device: torch.device | str) -> tuple[Callable[[], object], int]:
    """A ``dst.copy_(src)`` of ``numel`` elements and the bytes it moves (read + write): the copy-bandwidth yardstick
    to time in the same interleaved rounds as the ops."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * numel * src.element_size()


# --------------------------------------------------------------------------------------------- environment


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The short commit of the checkout this package runs from ("" outside a git checkout)."""
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


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device, versions, threads, backend state and malloc settings of this run, for the reports.

    Call it at the end of the run (``loadavg_1m`` is then the load at the end). A few entries appear under two
    names: the op benchmark's results have used ``time_utc``, ``cpu_count``, ``loadavg_1m`` and ``malloc_env``,
    the model benchmark's ``date_utc``, ``logical_cpus``, ``loadavg_1m_end`` and ``malloc``; both are kept so
    that the committed results and their readers keep their field names.
    """
    from .. import __version__
    from ..ops import backends

    device = torch.device(device)
    cpp_ok, cpp_why = backends.cpp_status()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    info: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mpvg_kernels": __version__,
        "git_commit": git_commit() or "unknown",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpp_backend_loaded": cpp_ok,
        "cpp_backend_note": cpp_why,
        "fused_backend": backends.resolve_backend(device),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "malloc": malloc_state(),
        "loadavg_1m": load,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    info.update(date_utc=info["time_utc"], logical_cpus=info["cpu_count"], loadavg_1m_end=load)
    return info


# --------------------------------------------------------------------------------------------- reports


def write_json(path: Path | str, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def fmt(value: object, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` significant digits, None/NaN as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *, right: Sequence[str] = ()
) -> str:
    """A GitHub Markdown table; ``columns`` are (key in each row, header), cells go through :func:`fmt` (strings
    unchanged, so a caller may pass pre-formatted cells); the columns whose key is in ``right`` are right-aligned."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---:" if k in right else "---" for k, _ in columns) + "|"
    body = ["| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def write_text(path: Path | str, text: str) -> Path:
    """Write a report (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def bar_chart(
    path: Path | str,
    panels: dict[str, tuple[Sequence[str], dict[str, Sequence[float]]]],
    *,
    title: str,
    xlabel: str,
    vline: float | None = None,
) -> Path:
    """Grouped horizontal bar charts written as one PNG: ``panels`` maps a panel title to (group labels, series),
    series mapping a legend label to one value per group; panels sit side by side, groups run down the y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_groups = max((len(groups) for groups, _ in panels.values()), default=1)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 1.6 + 0.22 * n_groups), squeeze=False, sharey=True
    )
    for ax, (ptitle, (groups, series)) in zip(axes[0], panels.items(), strict=True):
        n = max(1, len(series))
        height = 0.8 / n
        ys = range(len(groups))
        for i, (label, values) in enumerate(series.items()):
            ax.barh([y + (i - (n - 1) / 2) * height for y in ys], values, height, label=label)
        if vline is not None:
            ax.axvline(vline, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(groups, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
