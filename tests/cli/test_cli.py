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


def test_parse_model_args():
    from mpvg_kernels.cli.options import parse_model_args
    from mpvg_kernels.errors import UserError

    assert parse_model_args(["pool=cls", "depth=6", "drop_path_rate=0.1", "name=a=b"]) == {
        "pool": "cls", "depth": 6, "drop_path_rate": 0.1, "name": "a=b"}
    assert parse_model_args(None) == {}
    for bad in ("pool", "=cls", "not a key=1", "1x=2"):
        with pytest.raises(UserError, match="--model-arg expects KEY=VALUE"):
            parse_model_args([bad])
    with pytest.raises(UserError, match="given twice"):
        parse_model_args(["pool=cls", "pool=avg"])


def test_malformed_model_arg_is_a_one_line_error(capsys):
    for cmd in (["train", "--print-config"], ["bench", "--smoke"]):
        assert cli.main([*cmd, "--model-arg", "pool"]) == 2
        err = capsys.readouterr().err
        assert "--model-arg expects KEY=VALUE" in err and "Traceback" not in err


def test_train_model_arg_wins_over_recipe_and_set(capsys):
    argv = ["train", "--print-config", "--set", "model_kwargs.pool=avg", "--set", "model_kwargs.drop_path_rate=0.1",
            "--model-arg", "pool=cls"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "  pool: cls" in out and "  drop_path_rate: 0.1" in out


@pytest.mark.parametrize("name", ["train", "eval", "predict", "demo", "bench"])
def test_device_flag_defaults_to_auto(name):
    parser = cli.build_parser()._subparsers._group_actions[0].choices[name]
    (action,) = [a for a in parser._actions if "--device" in a.option_strings]
    # train's flag is generated from TrainConfig (None = not given, so a recipe may set it); its value is auto
    assert action.default == "auto" or (name == "train" and action.default is None and "auto" in action.help)


@pytest.mark.parametrize(("var", "value"), [("MPVG_OP_DESIGN", "bogus"), ("MPVG_BACKEND", "bogus")])
def test_bad_environment_variable_is_one_line_for_every_command(var, value):
    """A bad MPVG_OP_DESIGN / MPVG_BACKEND: imports fine, then one line with exit status 2 before any work."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, **{var: value}, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "mpvg_kernels", "params"], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("mpvg params: error:") and f"{var}='{value}'" in lines[0], lines
