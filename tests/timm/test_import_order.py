"""``import mpvg_kernels`` is enough: ``timm.create_model('{pe}_{model}')`` works whether timm was imported before or
after it, in fresh interpreters; and ``import mpvg_kernels`` alone does not import timm."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[2]
USE = "import timm; m = timm.create_model('mpvg_deit_tiny_patch16_224', num_classes=3); print(type(m).__module__)"


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("first", ["import timm; import mpvg_kernels", "import mpvg_kernels; import timm"],
                         ids=["timm_first", "mpvg_first"])  # fmt: skip
def test_create_model_after_a_plain_import_in_either_order(first):
    out = _run(f"{first}\n{USE}")
    assert out.returncode == 0 and out.stdout.strip() == "mpvg_kernels.models.vision_transformer", out.stderr[-3000:]


def test_import_mpvg_kernels_does_not_import_timm():
    out = _run("import sys, mpvg_kernels; print('timm' in sys.modules, 'torchvision' in sys.modules)")
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr[-3000:]
