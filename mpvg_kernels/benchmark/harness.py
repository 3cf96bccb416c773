"""Shared helpers of the benchmarks: environment setup, interleaved timing, bandwidth, and JSON/Markdown/PNG reports.

Timing model (DESIGN.md 5): every candidate of one case is built and warmed up first, then timed in interleaved
rounds (round r visits the candidates in an order rotated by r), and each candidate's figure is the median of its
per-round samples. Machine noise therefore lands on every candidate alike and the ratios measured in one run are
what a report claims.

- CPU: a ``time.perf_counter`` (or thread CPU time) loop with the garbage collector off; each sample runs the
  candidate ``inner`` times back to back (the same count for every candidate, calibrated so that the fastest one's
  sample lasts at least ``min_sample_s``) and reports the mean per call. Caches are not flushed: every candidate
  starts its sample after the others have run (so its inputs are partly evicted) and continues in its own steady
  state.
- CUDA: CUDA events around one call per sample, after zeroing a 256 MiB buffer to flush the L2 cache (the scheme
  of ``triton.testing.do_bench``), synchronising once per round.

Large fresh allocations on glibc go through mmap and page faults, which makes the same CPU op take 1.5 ms or 10 ms
at random; :func:`ensure_malloc_env` re-executes the script with ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_MAX_`` set so freed blocks are reused instead.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .models import _cpu_name, _git_commit

#: glibc malloc settings for CPU benchmarks (DESIGN.md 5): freed blocks stay in the heap and are reused instead of
#: being unmapped and page-faulted in again on the next allocation. MALLOC_MMAP_MAX_=0 extends this to blocks above
#: 32 MiB, the largest mmap threshold glibc accepts on 64-bit: without it every output the size of a DeiT-B fp32
#: activation (38.5 MB) is a fresh mmap, and its page faults (~9,400 of them) dominate the op's time.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "1000000000000",
    "MALLOC_MMAP_MAX_": "0",
}


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


# --------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Per-call seconds of one candidate: median and quartiles over the timed rounds."""

    median_s: float
    p25_s: float
    p75_s: float
    samples: int
    inner: int
    all_s: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("all_s")
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
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
    max_inner: int = 1000,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Time every candidate (a no-argument callable) in ``rounds`` interleaved rounds; medians per call.

    ``warmup`` untimed calls per candidate come first (after which the per-sample repeat count is calibrated on
    CPU). On CUDA each sample is a single call timed with CUDA events after an L2 flush.

    ``clock`` (CPU only): ``wall`` (``time.perf_counter``) or ``thread`` (``time.thread_time``: CPU time of the
    calling thread). With one compute thread every candidate runs on the calling thread, and the thread clock leaves
    out the time this process spends preempted on a shared machine, which otherwise dominates the noise.
    """
    device = torch.device(device)
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    now = time.thread_time if clock == "thread" else time.perf_counter
    names = list(candidates)
    for name in names:
        for _ in range(max(1, warmup)):
            candidates[name]()
    _sync(device)

    # One repeat count for all candidates (so that none gets warmer caches from more back-to-back calls than
    # another), calibrated on the fastest so that its sample lasts at least min_sample_s.
    n_inner = 1
    if device.type == "cpu":
        fastest = math.inf
        for name in names:
            t0 = time.perf_counter()
            candidates[name]()
            fastest = min(fastest, max(time.perf_counter() - t0, 1e-7))
        n_inner = int(min(max_inner, max(1, math.ceil(min_sample_s / fastest))))
    inner = {name: n_inner for name in names}

    samples: dict[str, list[float]] = {name: [] for name in names}
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            if device.type == "cuda":
                events = []
                for name in order:
                    flush.zero_()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    candidates[name]()
                    end.record()
                    events.append((name, start, end))
                torch.cuda.synchronize(device)
                for name, start, end in events:
                    samples[name].append(start.elapsed_time(end) * 1e-3)
            else:
                for name in order:
                    fn, n = candidates[name], inner[name]
                    t0 = now()
                    for _ in range(n):
                        fn()
                    samples[name].append((now() - t0) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: Timing(
            median_s=statistics.median(s),
            p25_s=_quantile(s, 0.25),
            p75_s=_quantile(s, 0.75),
            samples=len(s),
            inner=inner[name],
            all_s=s,
        )
        for name, s in samples.items()
    }


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


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device, versions, threads and malloc settings of this run, for the report."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit() or "unknown",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = _cpu_name()
        info["cpu_count"] = os.cpu_count()
        info["threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["malloc_env"] = {k: os.environ.get(k) for k in MALLOC_ENV}
        try:
            info["loadavg_1m"] = os.getloadavg()[0]
        except OSError:
            pass
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


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub Markdown table; ``columns`` are (key in each row, header)."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join([head, sep, *body])


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
