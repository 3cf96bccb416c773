"""`mpvg bench` refuses settings that cannot give a measurement (unknown model or mode, batch sizes, rounds or
calls below 1, ...): one line naming the flag and value, exit status 2, before any model is built or file written."""

from __future__ import annotations

import pytest

from mpvg_kernels import cli
from mpvg_kernels.benchmark import models as B
from mpvg_kernels.errors import UserError


@pytest.fixture
def no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a benchmark case was built before the bad setting was reported")

    monkeypatch.setattr(B, "make_cases", fail)
    monkeypatch.setattr(B, "profile_model", fail)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--models", "vit_nope"], "--models: unknown model 'vit_nope'"),
        (["--compile-models", "vit_nope"], "--compile-models: unknown model 'vit_nope'"),
        (["--batch", "vit_nope=4,2"], "--batch: unknown model 'vit_nope'"),
        (["--modes", "nope"], "--modes: 'nope' is not one of"),
        (["--batch-infer", "0"], "--batch-infer 0: must be at least 1"),
        (["--batch-train", "-1"], "--batch-train -1: must be at least 1"),
        (["--batch", "vit_digits=0,4"], "--batch vit_digits=0,4: batch sizes must be at least 1"),
        (["--rounds", "0"], "--rounds 0: must be at least 1"),
        (["--warmup", "-1"], "--warmup -1: must be at least 0"),
        (["--iters", "0"], "--iters 0: must be at least 1"),
        (["--max-inner", "0"], "--max-inner 0: must be at least 1"),
        (["--min-sample-s", "-0.5"], "--min-sample-s -0.5: must be at least 0"),
        (["--threads", "0"], "--threads 0: must be at least 1"),
    ],
)
@pytest.mark.parametrize("profile", [False, True])
def test_bad_setting_is_one_line_before_any_work(tmp_path, capsys, no_work, argv, named, profile) -> None:
    extra = ["--profile"] if profile else []
    rc = cli.main(["bench", "--smoke", "--out-dir", str(tmp_path), "--no-progress", *extra, *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mpvg bench: error: ") and "Traceback" not in err, err
    assert named in lines[0]
    assert not list(tmp_path.iterdir())


def test_run_bench_checks_the_config_too(tmp_path) -> None:
    cfg = B.smoke_config(out_dir=str(tmp_path))
    cfg.rounds = 0
    with pytest.raises(UserError, match="rounds 0"):
        B.run_bench(cfg)
    assert not list(tmp_path.iterdir())
