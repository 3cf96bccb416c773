"""The shared timing harness: interleaved timing options, malloc settings, environment record, Markdown tables."""

from __future__ import annotations

import os

import pytest

from mpvg_kernels.benchmark import harness


def test_time_interleaved_calibration_and_errors() -> None:
    calls = {"fast": 0, "bad": 0}

    def fast() -> None:
        calls["fast"] += 1

    def bad() -> None:
        calls["bad"] += 1
        raise RuntimeError("boom")

    errors: dict[str, str] = {}
    seen: list[tuple[str, int]] = []
    t = harness.time_interleaved(
        {"fast": fast, "bad": bad},
        rounds=3,
        warmup=2,
        min_sample_s=1e-4,
        min_inner=2,
        max_inner=5,
        inner="each",
        collect_each_round=True,
        errors=errors,
        progress=lambda label, n: seen.append((label, n)),
    )
    assert set(t) == {"fast"} and errors["bad"] == "RuntimeError: boom" and calls["bad"] == 1
    assert t["fast"].samples == 3 and 2 <= t["fast"].inner <= 5 and t["fast"].first_call_s > 0
    assert t["fast"].min_s <= t["fast"].median_s
    assert ("round 1/3", 0) in seen and sum(n for _, n in seen) == 2 * 2 + 3
    with pytest.raises(RuntimeError, match="boom"):
        harness.time_interleaved({"bad": bad}, rounds=1, warmup=1)


def test_quantile_and_empty_timing() -> None:
    assert harness.quantile([1.0, 2.0, 3.0, 4.0], 0.25) == pytest.approx(1.75)
    empty = harness.Timing.of([])
    assert empty.samples == 0 and empty.median_s != empty.median_s and empty.min_s != empty.min_s


def test_malloc_settings_and_environment() -> None:
    state = harness.tune_malloc()
    assert set(harness.MALLOC_ENV) < set(state)
    if all(k in os.environ for k in harness.MALLOC_ENV):
        assert state["how"] == "environment"
    else:  # applied in-process: the same three settings as the environment variables
        assert state["how"].startswith("mallopt(MMAP_THRESHOLD=33554432") and "MMAP_MAX=0" in state["how"]
    env = harness.environment("cpu")
    for key in ("time_utc", "date_utc", "cpu", "cpu_count", "logical_cpus", "threads", "git_commit", "malloc",
                "malloc_env", "fused_backend", "command"):
        assert key in env, key
    assert env["malloc"]["how"] == state["how"]


def test_markdown_table_alignment() -> None:
    md = harness.markdown_table([{"a": "x", "b": 1.23456}], [("a", "A"), ("b", "B")], right=("b",))
    assert md.splitlines() == ["| A | B |", "|---|---:|", "| x | 1.23 |"]
