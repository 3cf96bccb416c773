"""Forward-mode AD and ``torch.func`` on every kernel backend give the ``torch`` backend's answers (the checks are in
``func_transform_checks.py``): ``cpp`` in this process, ``triton`` under the interpreter in a fresh one (the variable
must be set before import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpvg_kernels.ops import backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
import func_transform_checks as checks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not backends.cpp_status()[0], reason="the C++ extension is not loaded")
@pytest.mark.parametrize("dtype", checks.DTYPES, ids=["float32", "float64"])
def test_cpp_backend_under_every_transform(dtype: torch.dtype) -> None:
    failures = checks.check("cpp", dtype)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_triton_backend_under_every_transform() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("MPVG_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(Path(checks.__file__)), "triton"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ALL OK"), (proc.stdout + proc.stderr)[-6000:]


def test_forward_ad_on_the_registered_ops_is_exact() -> None:
    """The registered ops' own autograd (what compiled and exported graphs call) under forward-mode AD: the Function's
    rule, never a silent zero."""
    import torch.autograd.forward_ad as fwAD

    import mpvg_kernels as mk

    x, pe, w, b = (torch.randn(s, dtype=torch.float64) for s in ((2, 3, 4), (3, 4), (4,), (4,)))
    t = torch.randn_like(x)
    with mk.use_backend("torch"):
        want = torch.func.jvp(lambda x: mk.layer_norm_add(x, pe, w, b), (x,), (t,))[1]
    for fast in (True, False):
        with backends.use_eager_fast_path(fast), fwAD.dual_level():
            got = fwAD.unpack_dual(mk.layer_norm_add(fwAD.make_dual(x, t), pe, w, b)).tangent
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
