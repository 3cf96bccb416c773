"""Smoke test of the op benchmark harness: ``benchmarks/bench_ops.py --quick`` runs and writes its reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ops_quick_writes_reports(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MPVG_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_ops.py"),
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for suffix in (".json", ".md", ".png"):
        path = tmp_path / f"ops_cpu{suffix}"
        assert path.is_file() and path.stat().st_size > 0, f"{path} not written"
    result = json.loads((tmp_path / "ops_cpu.json").read_text())
    candidates = {r["candidate"] for r in result["rows"]}
    assert {"eager", "compile"} <= candidates and any(c.startswith("mpvg[") for c in candidates), candidates
    assert {r["mode"] for r in result["rows"]} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["ms"] > 0 and r["copy_gbps"] > 0 for r in result["rows"])
    assert result["env"]["malloc_env"]["MALLOC_MMAP_THRESHOLD_"] == "33554432"  # the re-exec took effect
    assert "| op |" in (tmp_path / "ops_cpu.md").read_text()
