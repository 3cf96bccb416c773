"""Nothing lost, nothing silently wrong: `mpvg train` under careless use of its output folder and settings.

Each test drives the real CLI on the bundled digits with a tiny schedule.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpvg_kernels import cli
from mpvg_kernels import data as data_mod
from mpvg_kernels.train import trainer
from mpvg_kernels.train.checkpoint import load_checkpoint
from mpvg_kernels.train.metrics import JsonlLog
from mpvg_kernels.train.run_dir import LOCK_NAME

QUICK = ["--batch-size", "64", "--no-progress", "--threads", "1", "--no-augment", "--warmup-epochs", "0",
         "--set", "model_kwargs.depth=2"]


def _train(out: Path, *args: str) -> int:
    return cli.main(["train", "--out", str(out), *QUICK, *args])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guards") / "finished"
    assert _train(out, "--epochs", "2") == 0
    return out


def _snapshot(out: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(out.iterdir()) if p.name != LOCK_NAME}


def test_finished_run_is_not_replaced_without_overwrite(finished_run: Path, capsys) -> None:
    before = _snapshot(finished_run)
    capsys.readouterr()
    assert _train(finished_run, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--overwrite" in err
    assert _snapshot(finished_run) == before


def test_resume_of_a_finished_run_changes_nothing(finished_run: Path, capsys) -> None:
    before = _snapshot(finished_run)
    capsys.readouterr()
    assert _train(finished_run, "--epochs", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "Traceback" not in err
    assert _snapshot(finished_run) == before


def test_resume_from_shared_safetensors_weights_is_refused_by_name(finished_run: Path, tmp_path: Path,
                                                                  capsys) -> None:
    """A .safetensors export holds the weights and their metadata, not the optimizer, schedule and RNG state a
    resume needs: one line saying so and what to do, nothing written."""
    weights = tmp_path / "model.safetensors"
    assert cli.main(["export", "--checkpoint", str(finished_run), "--format", "safetensors", "--out",
                     str(weights)]) == 0
    out = tmp_path / "run"
    capsys.readouterr()
    assert _train(out, "--epochs", "3", "--resume", str(weights)) == 2
    err = capsys.readouterr().err
    assert "safetensors" in err and "checkpoint.pt" in err and "model_kwargs.checkpoint_path" in err, err
    assert "Traceback" not in err and not out.exists()


def test_overwrite_never_shows_stale_results(tmp_path: Path, finished_run: Path, monkeypatch) -> None:
    out = tmp_path / "again"
    out.mkdir()
    for p in finished_run.iterdir():
        if p.name != LOCK_NAME:
            (out / p.name).write_bytes(p.read_bytes())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer._Trainer, "_epoch_loop", interrupted)
    assert _train(out, "--epochs", "1", "--overwrite") == 130
    left = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    assert "summary.json" not in left and "checkpoint.pt" not in left and "metrics.jsonl" not in left, left


def test_out_that_is_a_file(tmp_path: Path, capsys) -> None:
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    assert _train(f, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert str(f) in err and "is a file" in err
    assert f.read_text() == "not a folder"


def test_data_error_leaves_no_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    assert _train(out, "--epochs", "1", "--data", f"folder:{tmp_path / 'missing'}") == 2
    assert "missing" in capsys.readouterr().err
    assert not out.exists()


def test_non_finite_lr_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "inf"
    assert _train(out, "--epochs", "1", "--lr", "inf") == 2
    err = capsys.readouterr().err
    assert "lr must be finite" in err and "Traceback" not in err
    assert not out.exists()


def test_diverging_run_names_the_epoch_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "diverge"
    steps = {"n": 0}
    real_loss = trainer.classification_loss
    per_epoch = len(data_mod.digits_split()[0]) // 64

    def loss_that_diverges_in_epoch_2(logits, target, smoothing):
        steps["n"] += 1
        loss = real_loss(logits, target, smoothing)
        return loss * float("nan") if steps["n"] > per_epoch else loss

    monkeypatch.setattr(trainer, "classification_loss", loss_that_diverges_in_epoch_2)
    capsys.readouterr()
    assert _train(out, "--epochs", "3") == 2
    err = capsys.readouterr().err
    assert "diverged in epoch 2" in err and "Traceback" not in err
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    assert not (out / "summary.json").exists()


def test_partial_metrics_line_is_dropped_on_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "partial"
    assert _train(out, "--epochs", "2", "--stop-after-epoch", "1") == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "train_lo')  # a write cut short
    assert _train(out, "--epochs", "2", "--resume") == 0
    assert "partial last line" in capsys.readouterr().err
    assert [r["epoch"] for r in JsonlLog(out / "metrics.jsonl").read()] == [1, 2]


_HOLDER = """
import sys, time
from pathlib import Path
from mpvg_kernels.train.run_dir import RunLock
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
RunLock(out).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_one_run_per_folder_and_a_killed_holder_does_not_block(tmp_path: Path, capsys) -> None:
    out = tmp_path / "shared"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert _train(out, "--epochs", "1") == 2
        err = capsys.readouterr().err
        assert "in use by another mpvg train" in err and f"pid {holder.pid}" in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert _train(out, "--epochs", "1") == 0  # the killed holder's lock is gone with its process
    assert json.loads((out / "summary.json").read_text())["finished"]


@pytest.mark.slow
def test_two_trainings_started_together(tmp_path: Path) -> None:
    out = tmp_path / "race"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mpvg_kernels", "train", "--out", str(out), *QUICK, "--epochs", "2"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "in use by another mpvg train" in loser or "already holds" in loser
    assert [r["epoch"] for r in JsonlLog(out / "metrics.jsonl").read()] == [1, 2]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
