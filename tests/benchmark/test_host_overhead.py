"""``benchmarks/host_overhead.py`` runs (dry: a few calls per row) and reports both paths side by side. Not a
timing test: the numbers of a dry run mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
ROWS = ("forward", "backward", "backward_op", "forward_grad", "train", "backward_bf16_pe")


def test_host_overhead_script_runs_dry(tmp_path):
    out = tmp_path / "host.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MPVG_EAGER_FAST_PATH", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--dry-run", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "registered" in lines[1] and "eager" in lines[1]
    assert [line.split()[0] for line in lines[2 : 2 + len(ROWS)]] == list(ROWS)
    res = json.loads(out.read_text())
    for path in ("registered", "eager"):
        assert set(res[path]) == set(ROWS) and all(v > 0 for v in res[path].values())
    assert set(res["common"]) == {"empty", "launcher_forward", "launcher_backward"}
    assert all(v > 0 for v in res["common"].values())
