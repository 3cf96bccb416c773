"""``mpvg bench --device cuda`` without a GPU: which targets apply to a device, a CUDA report without the CPU
targets, synchronised CUDA-event timing (``torch.cuda`` mocked), device-resident inputs."""

from __future__ import annotations

import pytest
import torch

from mpvg_kernels.benchmark import harness
from mpvg_kernels.benchmark import models as B
from mpvg_kernels.benchmark import ops as O


def test_targets_apply_to_cpu_runs_only():
    assert B.applicable_targets("cpu") == B.TARGETS and B.applicable_targets(torch.device("cpu")) == B.TARGETS
    assert B.applicable_targets("cuda") == {} and B.applicable_targets("cuda:1") == {}
    assert B.applicable_targets("cpu") is not B.TARGETS  # a copy: a caller cannot change the table


def _record(mode: str, task: str, seconds: float) -> dict:
    return {
        "model": "vit_digits", "mode": mode, "impl": "fused", "exec": "eager", "task": task, "batch": 8,
        "median_s": seconds, "images_per_s": 8 / seconds, "min_s": seconds, "p25_s": seconds, "p75_s": seconds,
        "n": 3, "calls_per_sample": 1, "times_s": [seconds] * 3, "first_call_s": seconds, "error": "",
    }  # fmt: skip


def _result(device: str, with_targets_key: bool = True) -> dict:
    recs = [_record(m, t, s) for t in B.TASKS for m, s in (("default", 0.010), ("mpvg", 0.0105))]
    targets = B.applicable_targets(device)
    env = {
        "device": device, "cpu": "test cpu", "logical_cpus": 2, "threads": 1, "torch": torch.__version__,
        "python": "3", "mpvg_kernels": "0", "git_commit": "x", "fused_backend": "triton", "cpp_backend_loaded": False,
        "malloc": {"how": "not applied"}, "date_utc": "today", "loadavg_1m_end": None, "command": "mpvg bench",
        **({"gpu": "NVIDIA H200"} if device != "cpu" else {}),
    }  # fmt: skip
    cfg = B.BenchConfig(models=["vit_digits"], execs=["eager"], device=device, name=f"models_{device}").record()
    result = {"config": cfg, "environment": env, "wall_s": 1.0, "loadavg_1m_start": None, "records": recs,
              "ratios": B.ratios(recs, targets=targets), "speedups": B.speedups(recs)}  # fmt: skip
    if with_targets_key:
        result["targets"] = targets
    return result


def test_cuda_report_carries_no_cpu_target_rows():
    cpu, cuda = _result("cpu"), _result("cuda")
    assert all(r["target"] is None and r["met"] is None for r in cuda["ratios"])
    assert any(r["target"] == B.TARGETS["train"] for r in cpu["ratios"])
    md_cpu, md_cuda = B.to_markdown(cpu), B.to_markdown(cuda)
    # the CPU report has its target table and marks; the CUDA one has neither, nor any target value
    assert "## MPVG vs default" in md_cpu and "0.98" in md_cpu and ("✓" in md_cpu or "✗" in md_cpu)
    assert "## MPVG vs default" not in md_cuda and "Targets" not in md_cuda
    assert "0.98" not in md_cuda and "0.97" not in md_cuda and "✓" not in md_cuda and "✗" not in md_cuda
    assert "No targets apply to a cuda run" in md_cuda and "NVIDIA H200" in md_cuda
    # results written before the targets were recorded follow the same rule
    assert "## MPVG vs default" not in B.to_markdown(_result("cuda", with_targets_key=False))
    assert "## MPVG vs default" in B.to_markdown(_result("cpu", with_targets_key=False))


def test_cuda_plot_has_no_target_line(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    lines = []
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, *a, **k: lines.append(a))
    B.plot(_result("cuda"), tmp_path / "cuda.png")
    assert lines == [] and (tmp_path / "cuda.png").is_file()
    B.plot(_result("cpu"), tmp_path / "cpu.png")
    assert sorted(a[0] for a in lines) == sorted(B.TARGETS[t] for t in B.TASKS)


def test_op_benchmark_targets_only_on_cpu():
    row = {"op": "add", "shape": "deit_ti", "dtype": "fp32", "candidate": "cpp", "mode": "fwd", "vs_eager": 3.0,
           "vs_compile": 1.5, "frac_copy": 0.8}  # fmt: skip
    cpu = {"config": {"device": "cpu", "fast_candidate": "cpp"}, "rows": [row]}
    cuda = {"config": {"device": "cuda", "fast_candidate": "cpp"}, "rows": [row]}
    assert O.targets(cpu) and all(t["met"] for t in O.targets(cpu))
    assert O.targets(cuda) == []


class _FakeEvent:
    clock = 0.0

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.t = None

    def record(self) -> None:
        _FakeEvent.clock += 1.0
        self.t = _FakeEvent.clock

    def elapsed_time(self, end: _FakeEvent) -> float:  # milliseconds, as torch.cuda.Event reports
        return (end.t - self.t) * 2.0


class _FakeFlush:
    def __init__(self):
        self.zeroed = 0

    def zero_(self):
        self.zeroed += 1
        return self


def test_cuda_timing_is_synchronised(monkeypatch):
    """On a CUDA device the harness synchronises around warm-up calls and after each round, times one call per
    sample with CUDA events after an L2 flush, and never uses the CPU clock's repeat counts."""
    syncs = []
    flush = _FakeFlush()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(harness, "l2_flush_buffer", lambda device: flush)
    calls = {"a": 0, "b": 0}

    def make(name):
        def run():
            calls[name] += 1

        return run

    timings = harness.time_interleaved({n: make(n) for n in calls}, "cuda", rounds=4, warmup=2, min_sample_s=1.0)
    cuda = torch.device("cuda")
    assert calls == {"a": 6, "b": 6}  # warm-up + one call per round each
    # two per warm-up call (before and after), one after all warm-ups, one per round
    assert syncs == [cuda] * (2 * 2 * 2 + 1 + 4)
    assert flush.zeroed == 8  # one L2 flush before every timed sample
    for t in timings.values():
        assert t.samples == 4 and t.inner == 1
        assert t.median_s == pytest.approx(2e-3)  # 1 event tick = 2 ms, read from the events, not a CPU clock


def test_cpu_timing_does_not_touch_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.cuda used on a CPU run")

    monkeypatch.setattr(torch.cuda, "synchronize", boom)
    monkeypatch.setattr(torch.cuda, "Event", boom)
    timings = harness.time_interleaved({"a": lambda: None}, "cpu", rounds=2, warmup=1, min_sample_s=1e-4)
    assert timings["a"].samples == 2


def test_inputs_live_on_the_run_device():
    """The model benchmark's images and labels are made once and moved to the device before timing (meta here
    stands in for a GPU: every tensor a case feeds must be on the run's device, none left on the CPU)."""
    cfg = B.BenchConfig(models=["vit_digits"], pes=["default", "mpvg"], execs=["eager"], batch_infer=2,
                        batch_train=2, progress=False)  # fmt: skip
    cases = B.make_cases("vit_digits", cfg, "meta")
    assert {c.task for c in cases} == set(B.TASKS)
    for c in cases:
        assert c.inputs and all(t.device.type == "meta" for t in c.inputs), c.label


def test_run_bench_on_cuda_writes_no_targets(tmp_path, monkeypatch):
    """``run_bench`` on a CUDA device (device, timing and environment faked): the result records no targets, its
    ratios carry none, and the written report has no target table."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(B, "resolve", lambda cfg: (B.replace(cfg, name=cfg.name or "models_cuda"), cuda))
    monkeypatch.setattr(B, "_setup", lambda device, threads: None)

    def fake_run_model(name, cfg, bar=None, device="cpu"):
        assert torch.device(device) == cuda
        cases = []
        for task in B.TASKS:
            for pe, s in (("default", 0.010), ("mpvg", 0.0105)):
                c = B.Case(name, pe, "fused", "eager", task, 8)
                c.timing = harness.Timing.of([s, s, s])
                cases.append(c)
        return cases

    monkeypatch.setattr(B, "run_model", fake_run_model)
    env = _result("cuda")["environment"]
    monkeypatch.setattr(harness, "environment", lambda device: dict(env, device=torch.device(device).type))
    cfg = B.BenchConfig(models=["vit_digits"], execs=["eager"], device="cuda", out_dir=str(tmp_path), progress=False)
    result = B.run_bench(cfg)
    assert result["targets"] == {}
    assert result["ratios"] and all(r["target"] is None and r["met"] is None for r in result["ratios"])
    md = (tmp_path / "models_cuda.md").read_text()
    assert "## MPVG vs default" not in md and "0.98" not in md and "No targets apply to a cuda run" in md
