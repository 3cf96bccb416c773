"""No install advice of ours swaps torch: every extra's ``pip install`` that the CLI and the error messages print, and
every extra install the docs show, keeps the installed torch (``pip install --dry-run`` in this environment, the
README's)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from mpvg_kernels._install import install_advice, install_command, torch_pin

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def test_advice_pins_the_installed_torch():
    import torch

    assert torch_pin() == f"torch=={torch.__version__.split('+')[0]}"
    for extra in EXTRAS:
        assert torch_pin() in install_command(extra) and torch_pin() in install_command(extra, checkout=True)
        assert "--no-build-isolation" in install_command(extra, checkout=True)
        assert install_command(extra) in install_advice(extra)


@pytest.mark.slow
@pytest.mark.parametrize("extra", EXTRAS)
def test_pip_dry_run_of_the_advice_keeps_torch(extra, tmp_path):
    """What pip would install for the printed command (the package itself is installed here, so pip reads the extra's
    requirements from it): never torch."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
           f"mpvg-kernels[{extra}]", torch_pin()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]]
    assert "torch" not in names, f"[{extra}] would install {names}"


def test_docs_pin_torch_wherever_they_install_an_extra():
    """A ``pip install`` of an extra in README.md or docs/ pins torch (or follows a pinned torch install on the same
    line, as the README's two commands do)."""
    offenders = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in re.finditer(r"pip install[^`\n]*?(mpvg-kernels\[|-e \"?\.\[)[^`\n]*", line):
                before = line[: m.start()]
                if "torch==" not in m.group(0) and "pip install torch==" not in before:
                    offenders.append(f"{doc.name}:{n}: {m.group(0)}")
    assert not offenders, "\n".join(offenders)
