"""The wheel installs and works without the source tree: it is built with the compiled CPU extension, installed
into a fresh virtual environment, and there the C++ backend loads and `mpvg train` runs.

The fresh environment takes torch and the other dependencies from the environment running the tests (a ``.pth``
line: site-packages of the test environment, whose own ``.pth`` hooks, e.g. an editable install of this
repository, are not processed), so that only mpvg-kernels comes from the wheel and nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installs_with_the_cpp_backend_and_trains(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist), str(ROOT)])
    (wheel,) = dist.glob("mpvg_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("mpvg_kernels/ops/_C") and n.endswith(".so") for n in names), names
    assert "mpvg_kernels/train/recipes/digits.yaml" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)])

    work = tmp_path / "elsewhere"  # no source tree in sight
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MPVG_BACKEND", "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = "1"
    check = _run([str(py), "-c", "import mpvg_kernels, torch; from mpvg_kernels.ops import backends; "
                  "print(mpvg_kernels.__file__); print(backends.cpp_status()); print(torch.__version__)"],
                 cwd=work, env=env)
    file, status, _ = check.stdout.strip().splitlines()
    assert Path(file).resolve().is_relative_to(site.resolve()), file
    assert status.startswith("(True"), status
    out = work / "run"
    _run([str(venv / "bin" / "mpvg"), "train", "--epochs", "1", "--batch-size", "64", "--no-progress", "--threads",
          "1", "--out", str(out)], cwd=work, env=env)
    assert (out / "summary.json").is_file() and (out / "checkpoint.pt").is_file()
