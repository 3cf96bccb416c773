"""The ``mpvg`` command lists every subcommand, and ``mpvg params`` prints the parameter table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mpvg_kernels import cli

SUBCOMMANDS = ["train", "eval", "predict", "demo", "params", "bench", "export", "analyze"]


def test_every_subcommand_is_registered_and_documented():
    out = subprocess.run([sys.executable, "-m", "mpvg_kernels", "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert f"    {name} " in out.stdout, (name, out.stdout)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    assert f"usage: mpvg {name}" in capsys.readouterr().out


def test_params_table(capsys):
    assert cli.main(["params"]) == 0
    out = capsys.readouterr().out
    assert "| deit_tiny_patch16_224 | mpvg | avg | 5,721,640 |" in out
    assert "| vit_lite_7_4_32 | default | cls | 3,740,004 |" in out
    assert out.count("\n|") >= 20


def test_demo_runs(capsys):
    assert cli.main(["demo", "--batch", "2", "--tokens", "4", "--dim", "8"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm_add" in out and "layer_norm_pool" in out
