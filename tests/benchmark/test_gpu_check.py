"""``benchmarks/gpu_check.py --dry-run``: the GPU check's code path on CPU (Triton interpreter, tiny sizes), so the
script a GPU machine runs cannot rot. The numbers it measures here mean nothing; what is checked is that every
step runs and the results are written in the documented form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-10000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines[-1].startswith("targets met:") and "GPU tests passed" in lines[-1], lines[-1]
    res = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    assert res["environment"]["dry_run"] is True and res["environment"]["torch"]
    assert res["copy_gbs"] > 0
    assert res["tests"]["returncode"] == 0 and "passed" in res["tests"]["summary"]
    ops = {(r["op"], r["dtype"], r["B"]) for r in res["ops"]}
    assert len(ops) == 3 * 2 * 2, ops
    for r in res["ops"]:
        for name in ("fwd", "bwd", "fwd+bwd"):
            assert r[f"{name}_ms"] > 0 and r[f"{name}_gbs"] > 0 and r[f"{name}_x_eager"] > 0
    keys = {"forward_us", "backward_us", "forward_backward_us"}
    assert set(res["host_overhead"]) == keys | {f"registered_{k}" for k in keys}
    assert [r["op"] for r in res["op_designs"]] == ["layer_norm_add", "dual_layer_norm", "layer_norm_pool"]
    for r in res["op_designs"]:
        assert r["opaque_ms"] > 0 and r["triton_op_ms"] > 0, r
    assert len(res["targets"]) == 4
    md = (tmp_path / "gpu_dry_run.md").read_text()
    assert "## Targets" in md and "| layer_norm_pool |" in md
