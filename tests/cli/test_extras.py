"""The lean core: ``import mpvg_kernels`` needs torch and numpy only, and a command whose extra is missing says
which ``pip install "mpvg-kernels[...]"`` to run (checked in subprocesses where the optional modules cannot be
imported)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = ("matplotlib", "sklearn", "kornia", "yaml", "PIL", "onnx", "onnxruntime", "tqdm")

# Runs first in the child: every optional module raises ModuleNotFoundError, as on a core-only install.
_BLOCKER = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _child(code: str, block: bool = True) -> subprocess.CompletedProcess:
    src = (_BLOCKER if block else "") + code
    return subprocess.run([sys.executable, "-c", src], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_loads_no_optional_module() -> None:
    proc = _child(
        "import json, sys, mpvg_kernels\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'matplotlib','sklearn','kornia','yaml','PIL','onnx'})))",
        block=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_core_works_without_the_extras() -> None:
    proc = _child(
        "import torch, mpvg_kernels as mk\n"
        "m = mk.create_model('deit_tiny_patch16_224', pe='mpvg', num_classes=3, img_size=32, patch_size=8).eval()\n"
        "print(tuple(m(torch.randn(2, 3, 32, 32)).shape), 'vit_digits' in mk.list_models())"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(2,", "3)", "True"]


def test_command_names_the_missing_extra() -> None:
    proc = _child(
        "import sys\n"
        "from mpvg_kernels.cli import main\n"
        "sys.exit(main(['train', '--epochs', '1']))"
    )
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "mpvg-kernels[train]"' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_unavailable_commands() -> None:
    proc = _child("from mpvg_kernels.cli import main\nmain(['--help'])")
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "mpvg-kernels[train]" in proc.stdout


def test_export_onnx_names_the_export_extra(tmp_path) -> None:
    """A core-only install (no onnx/onnxruntime): `mpvg export --format onnx` (with or without --verify) is one line
    naming the [export] extra, and writes nothing."""
    out = tmp_path / "m.onnx"
    for extra in ([], ["--verify"]):
        proc = _child(
            "import sys\n"
            "from mpvg_kernels.cli import main\n"
            f"sys.exit(main(['export', '--model', 'vit_digits', '--pe', 'mpvg', '--format', 'onnx', '--out', "
            f"{str(out)!r}, *{extra!r}]))"
        )
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("mpvg export: error: "), proc.stderr
        assert 'pip install "mpvg-kernels[export]"' in lines[0] and "onnx" in lines[0]
        assert not out.exists()


def test_unusable_backend_from_the_environment_is_one_line(tmp_path) -> None:
    """MPVG_BACKEND=triton on a machine where triton cannot run the ops: one line, exit 2, no traceback."""
    import os

    env = {**os.environ, "MPVG_BACKEND": "triton"}
    env.pop("TRITON_INTERPRET", None)
    code = ("import sys\nfrom mpvg_kernels.cli import main\n"
            f"sys.exit(main(['train', '--epochs', '1', '--batch-size', '64', '--no-progress', '--out', "
            f"{str(tmp_path / 'run')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "backend 'triton'" in proc.stderr and "Traceback" not in proc.stderr
