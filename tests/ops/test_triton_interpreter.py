"""Interpreter tier: the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``, in a separate process.

The variable has to be set before triton (and mpvg_kernels, which decides its CPU kernels at import) is
imported, so this test starts a fresh ``python -m pytest tests/ops/triton_interp_checks.py`` with it set and
asserts on the outcome. The checks themselves (and what they cover) are in ``triton_interp_checks.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
CHECKS = Path(__file__).resolve().parent / "triton_interp_checks.py"
TIMEOUT_S = 1200


@pytest.mark.slow
def test_triton_kernels_under_interpreter():
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.pop("MPVG_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "pytest", str(CHECKS), "-q", "-p", "no:cacheprovider", "-rfE", "--tb=short"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"interpreter checks did not finish within {TIMEOUT_S} s; output so far:\n{out[-20000:]}")
    output = proc.stdout + proc.stderr
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    print(summary[-1] if summary else output[-2000:])
    assert proc.returncode == 0, (
        f"interpreter checks failed (exit status {proc.returncode}); command: {' '.join(cmd)} "
        f"with TRITON_INTERPRET=1\n{output[-30000:]}"
    )
    assert summary and " passed" in summary[-1] and "skipped" not in summary[-1], output[-5000:]
