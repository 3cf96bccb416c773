"""Nothing silently wrong at the edges of `mpvg train`: every setting has a range checked before any work, bad input
is one line with exit status 2 (never a traceback, never a change on disk), and the run reports what it saved when it
is interrupted or the disk fills up.

Each test drives the real CLI in-process on the bundled digits with a tiny schedule.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from mpvg_kernels import cli
from mpvg_kernels.train import config as config_mod
from mpvg_kernels.train import trainer
from mpvg_kernels.train.checkpoint import load_checkpoint
from mpvg_kernels.train.run_dir import LOCK_NAME

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--batch-size", "64", "--no-progress", "--threads", "1", "--no-augment", "--warmup-epochs", "0",
         "--set", "model_kwargs.depth=2"]


def _train(out: Path, *args: str) -> int:
    return cli.main(["train", "--out", str(out), *QUICK, *args])


def _snapshot(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.name != LOCK_NAME}


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mpvg train: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("flags") / "finished"
    assert _train(out, "--epochs", "1") == 0
    return out


# -------------------------------------------------------------------------------------------- ranges (item 5, 10)
OUT_OF_RANGE = [
    (["--min-lr", "-1"], "--min-lr"),
    (["--clip-grad", "-1"], "--clip-grad"),
    (["--weight-decay", "-5"], "--weight-decay"),
    (["--betas", "2", "3"], "--betas"),
    (["--randaug-n", "100000"], "--randaug-n"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--seed", "99999999999999999999"], "--seed"),
    (["--threads", "100000"], "--threads"),
    (["--std", "0"], "--std"),
    (["--warmup-lr=-1e-3"], "--warmup-lr"),
    (["--repeated-aug", "1000000000"], "--repeated-aug"),
    (["--set", "rrc_scale=[0.9,0.1]"], "rrc_scale"),
]


@pytest.mark.parametrize(("args", "named"), OUT_OF_RANGE, ids=[" ".join(a[0]) for a in OUT_OF_RANGE])
def test_out_of_range_setting_is_one_line_before_any_work(tmp_path: Path, capsys, args: list[str],
                                                          named: str) -> None:
    out = tmp_path / "run"
    assert _train(out, "--epochs", "1", *args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert named in line
    assert not out.exists()
    assert cli.main(["train", *args, "--print-config"]) == 2  # --print-config validates too
    _one_error_line(capsys.readouterr().err)


def test_every_numeric_field_declares_its_range() -> None:
    import dataclasses
    import typing

    from mpvg_kernels.dataclass_flags import unwrap_optional

    hints = typing.get_type_hints(config_mod.TrainConfig)
    for f in dataclasses.fields(config_mod.TrainConfig):
        tp, _ = unwrap_optional(hints[f.name])
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        if item in (int, float):
            assert {"ge", "gt"} & set(f.metadata), f"{f.name} has no lower bound"


def test_help_shows_the_ranges(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "range: [0, 1)" in text and "range: >= 0" in text


# ----------------------------------------------------------------------- model and transforms before --overwrite (8)
BUILD_ERRORS = [
    ["--model-arg", "norm_eps=-1.0"],
    ["--model-arg", "norm_eps=float('nan')"],
    ["--model-arg", "drop_path_rate=5"],
    ["--augment", "--randaug-n", "100000"],
    ["--std", "0"],
    ["--mean", "0.1", "0.2"],
]


@pytest.mark.parametrize("args", BUILD_ERRORS, ids=[" ".join(a) for a in BUILD_ERRORS])
def test_overwrite_keeps_the_finished_run_when_a_setting_is_bad(finished_run: Path, capsys, args: list[str]) -> None:
    before = _snapshot(finished_run)
    capsys.readouterr()
    assert _train(finished_run, "--epochs", "1", "--overwrite", *args) == 2
    _one_error_line(capsys.readouterr().err)
    assert _snapshot(finished_run) == before


def test_bad_model_arg_leaves_no_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    assert _train(out, "--epochs", "1", "--model-arg", "norm_eps=-1.0") == 2
    assert "norm_eps" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_dry_run_checks_everything_and_writes_nothing(finished_run: Path, tmp_path: Path, capsys) -> None:
    before = _snapshot(finished_run)
    assert _train(finished_run, "--epochs", "1", "--overwrite", "--dry-run") == 0
    assert "dry run" in capsys.readouterr().out
    assert _snapshot(finished_run) == before
    assert _train(tmp_path / "new", "--dry-run") == 0 and not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------ YAML (item 9)
LAUGHS = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_yaml_aliases_are_refused_in_recipes_and_set(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text("epochs: 1\nmodel_kwargs:\n  " + LAUGHS.replace("\n", "\n  "))
    t0 = time.perf_counter()
    assert cli.main(["train", "--recipe", str(recipe), "--print-config"]) == 2
    assert "alias" in _one_error_line(capsys.readouterr().err)
    assert cli.main(["train", "--set", "model_kwargs.x=[&a 1, *a]", "--print-config"]) == 2
    assert "alias" in _one_error_line(capsys.readouterr().err)
    assert cli.main(["train", "--set", "betas=&b [0.9, 0.99]", "--print-config"]) == 2
    assert "alias" in _one_error_line(capsys.readouterr().err)
    assert time.perf_counter() - t0 < 10


def test_recipe_size_is_limited(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "big.yaml"
    recipe.write_text("epochs: 1\n" + "# padding\n" * (config_mod.MAX_RECIPE_BYTES // 10 + 1))
    assert cli.main(["train", "--recipe", str(recipe), "--print-config"]) == 2
    assert "bytes" in _one_error_line(capsys.readouterr().err)


def test_decoding_errors_are_one_line(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("model: vit_digits # caf\xe9\n".encode("latin-1"))
    assert cli.main(["train", "--recipe", str(recipe), "--print-config"]) == 2
    assert "UTF-8" in _one_error_line(capsys.readouterr().err)
    for item in ("model_kwargs.x=[1,", "betas=[1,", "model_kwargs.x={a: [}"):
        assert cli.main(["train", "--set", item, "--print-config"]) == 2
        _one_error_line(capsys.readouterr().err)
    deep = tmp_path / "deep.yaml"
    deep.write_text("model_kwargs: {x: " + "[" * 5000 + "]" * 5000 + "}\n")
    assert cli.main(["train", "--recipe", str(deep), "--print-config"]) == 2
    _one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------- --out (item 10)
def _out_cases(tmp_path: Path) -> dict[str, Path]:
    regular = tmp_path / "regular"
    regular.write_text("x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    return {"under a regular file": regular / "run", "dangling symlink": dangling, "under /proc": Path("/proc/mpvg")}


@pytest.mark.parametrize("case", ["under a regular file", "dangling symlink", "under /proc"])
def test_unusable_out_is_one_line(tmp_path: Path, capsys, case: str) -> None:
    out = _out_cases(tmp_path)[case]
    assert _train(out, "--epochs", "1") == 2
    assert str(out) in _one_error_line(capsys.readouterr().err)
    assert _train(out, "--epochs", "1", "--dry-run") == 2
    _one_error_line(capsys.readouterr().err)


def test_read_only_out_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """A read-only file system (EROFS from mkdir and from opening the lock file)."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "ro"))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert _train(tmp_path / "ro" / "run", "--epochs", "1") == 2
    assert "Read-only file system" in _one_error_line(capsys.readouterr().err)
    monkeypatch.undo()
    (tmp_path / "ro").mkdir()
    real_open = os.open

    def ro_open(path, flags, *args):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", ro_open)
    assert _train(tmp_path / "ro", "--epochs", "1") == 2
    assert "Read-only file system" in _one_error_line(capsys.readouterr().err)


def test_full_disk_mid_run_names_the_intact_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "full"
    real_save = trainer.save_checkpoint
    calls = {"n": 0}

    def save_until_the_disk_is_full(path, obj):
        calls["n"] += 1
        if calls["n"] >= 2:
            Path(str(path) + ".tmp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) + ".tmp")
        return real_save(path, obj)

    monkeypatch.setattr(trainer, "save_checkpoint", save_until_the_disk_is_full)
    capsys.readouterr()
    rc = _train(out, "--epochs", "3")
    err = capsys.readouterr().err
    assert rc == 2, err
    line = _one_error_line(err)
    assert "No space left on device" in line and "epoch 1" in line and str(out / "checkpoint.pt") in line
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not (out / "checkpoint.pt.tmp").exists()

    def metrics_disk_full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    monkeypatch.setattr(trainer.JsonlLog, "append", metrics_disk_full)
    assert _train(tmp_path / "full2", "--epochs", "1") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "no checkpoint was written" in line


# ------------------------------------------------------------------------------------- interruption (item 11)
def test_ctrl_c_names_the_saved_epoch_and_the_resume_command(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "ctrl c"
    real_epoch = trainer._Trainer._train_epoch

    def interrupted_in_epoch_2(self, *args, **kwargs):
        if args[-2] == 1:  # epoch index
            raise KeyboardInterrupt
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(trainer._Trainer, "_train_epoch", interrupted_in_epoch_2)
    argv = ["train", "--out", str(out), *QUICK, "--epochs", "2", "--overwrite"]
    capsys.readouterr()
    assert cli.main(argv) == 130
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpvg train: interrupted: "), lines
    assert "epoch 1/2" in lines[0] and str(out / "checkpoint.pt") in lines[0]
    command = lines[0].split("continue with: ", 1)[1]
    words = shlex.split(command)
    assert words[:2] == ["mpvg", "train"] and "--resume" in words and "--overwrite" not in words
    monkeypatch.undo()
    assert cli.main(words[1:]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


def test_ctrl_c_before_the_first_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer._Trainer, "_train_epoch", interrupted)
    out = tmp_path / "early"
    assert _train(out, "--epochs", "2") == 130
    line = capsys.readouterr().err.strip()
    assert "no epoch was saved" in line and "--overwrite" in line and "\n" not in line


# ------------------------------------------------------------------------------------------- usage (item 11)
def test_unknown_option_after_a_subcommand_prints_its_usage(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--epochs", "1", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mpvg train") and "mpvg train: error: unrecognized arguments: --bogus" in err


def test_progress_bar_shows_no_grad_warning(tmp_path: Path, capsys) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _train(tmp_path / "bar", "--epochs", "1", "--progress") == 0
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]


def test_top_level_help_imports_no_torch() -> None:
    code = ("import sys\nfrom mpvg_kernels_launcher import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "analyze" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH"


def test_top_level_help_is_the_full_parsers_help(capsys) -> None:
    import mpvg_kernels_launcher as launcher

    with pytest.raises(SystemExit):
        launcher.main(["--help"])
    fast = capsys.readouterr().out
    assert fast == cli.build_parser().format_help()


def test_compile_is_announced_and_kept_out_of_images_per_second(tmp_path: Path, capsys, monkeypatch) -> None:
    class SlowFirstCall(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m, self.calls = m, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 1:
                time.sleep(1.5)  # a long first compile
            return self.m(x)

    monkeypatch.setattr(torch, "compile", lambda m, **kw: SlowFirstCall(m))
    out = tmp_path / "compiled"
    capsys.readouterr()
    assert _train(out, "--epochs", "1", "--compile") == 0
    text = capsys.readouterr().out
    assert "compiling" in text and text.index("compiling") < text.index("epoch   1/1")
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["compile_s"] >= 1.5
    assert record["train_time_s"] < record["epoch_time_s"] - 1.5
