"""Property test of `mpvg train`'s settings: whatever value any flag or config field gets (negative, zero, huge, NaN,
inf, the wrong type, broken YAML), the command either accepts the configuration (checked with --dry-run, which builds
the model, runs it on one batch and checks the data and --out) or refuses it with exit status 2 and one error line,
never a traceback, and never changes the finished run that --overwrite would replace. A few accepted configurations
at the edges of the ranges are then trained for an epoch, to show that "accepted" means "finishes".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mpvg_kernels import cli
from mpvg_kernels.dataclass_flags import field_flags, unwrap_optional
from mpvg_kernels.train.config import TrainConfig
from mpvg_kernels.train.run_dir import LOCK_NAME

QUICK = ["--batch-size", "64", "--no-progress", "--threads", "1", "--no-augment", "--warmup-epochs", "0",
         "--set", "model_kwargs.depth=2"]
HINTS = typing.get_type_hints(TrainConfig)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

NUMBERS = ["-1", "0", "1", "2", "0.5", "0.999", "15", "16", "64", "65", "1e-30", "1e30", "-1e30", "1e400", "nan",
           ".nan", "inf", "-inf", ".inf", "99999999999999999999", "9223372036854775807", "0x10", "1_000", "-0.0"]
JUNK = ["abc", "", "true", "null", "[1, 2]", "[]", "{a: 1}", "[1,", "{a: [}", "&a 1", "[&a 1, *a]", "*a", "'x'",
        "\"unterminated", "a: b: c", "!!python/object:os.system x", "- 1\n- 2", "\t"]
TEXTS = st.sampled_from(NUMBERS + JUNK)
LISTS = st.lists(st.sampled_from(NUMBERS[:20]), min_size=0, max_size=3).map(lambda v: "[" + ", ".join(v) + "]")
STRINGS = {
    "model": ["vit_digits", "deit_tiny_patch16_224", "nope", ""],
    "pe": ["mpvg", "default", "lape", "pvg", "bogus"],
    "data": ["digits", "digits:/x", "cifar10:/nonexistent", "folder:", "bogus"],
    "opt": ["adamw", "sgd", "rmsprop"],
    "amp": ["none", "bf16", "fp16", "fp8"],
    "device": ["cpu", "auto", "cuda", "cuda:7", "tpu", "cpu:0"],
}
MODEL_ARGS = st.tuples(st.sampled_from(["norm_eps", "drop_path_rate", "depth", "num_heads", "embed_dim", "bogus",
                                        "mlp_ratio", "pool"]),
                       st.sampled_from(NUMBERS + ["float('nan')", "avg", "None", "[1,", "-5"]))


@st.composite
def setting(draw: st.DrawFn) -> list[str]:
    """One drawn setting as command-line words: ``--set key=VALUE``, ``--flag=VALUE`` / ``--flag V ...`` or
    ``--model-arg``."""
    name = draw(st.sampled_from(sorted(FIELDS) + ["model_arg"]))
    if name == "model_arg":
        key, value = draw(MODEL_ARGS)
        return ["--model-arg", f"{key}={value}"]
    tp, _ = unwrap_optional(HINTS[name])
    if name in STRINGS:
        value = draw(st.sampled_from(STRINGS[name]) | TEXTS)
    elif typing.get_origin(tp) is list:
        value = draw(LISTS | TEXTS)
    elif typing.get_origin(tp) is dict:
        value = draw(st.sampled_from(["{}", "{depth: 1}", "{norm_eps: -1.0}", "{norm_eps: .nan}", "{x: [1,",
                                      "{drop_path_rate: 5}", "[1, 2]"]) | TEXTS)
    else:
        value = draw(TEXTS)
    flag = field_flags(FIELDS[name])[0]
    form = draw(st.sampled_from(["set", "flag"]))
    if form == "set" or tp is bool or typing.get_origin(tp) is dict:
        return ["--set", f"{name}={value}"]
    if typing.get_origin(tp) is list:
        return [flag, *(value.strip("[]").replace(",", " ").split() or [value])]
    return [f"{flag}={value}"]


def _snapshot(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.name != LOCK_NAME}


def _run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse: usage and one error line
        return int(e.code or 0)


def assert_one_error_line(err: str) -> None:
    """Exactly one ``mpvg train: error:`` line, after the subcommand's usage when argparse refused the words."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not (ln.startswith("usage: mpvg train") or ln.startswith(" "))]
    assert len(errors) == 1 and errors[0].startswith("mpvg train: error: ") and lines[-1] == errors[0], err
    if len(lines) > 1:
        assert lines[0].startswith("usage: mpvg train"), err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("props") / "finished"
    assert cli.main(["train", "--out", str(out), *QUICK, "--epochs", "1"]) == 0
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(settings_drawn=st.lists(setting(), min_size=1, max_size=3))
def test_any_setting_is_accepted_or_refused_in_one_line(finished_run: Path, capsys,
                                                        settings_drawn: list[list[str]]) -> None:
    before = _snapshot(finished_run)
    words = [w for s in settings_drawn for w in s]
    capsys.readouterr()
    rc = _run(["train", "--out", str(finished_run), *QUICK, "--epochs", "1", "--overwrite", "--dry-run", *words])
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    if rc == 0:
        assert "dry run: every setting checked" in out, (words, out, err)
    else:
        assert rc == 2, (words, rc, err)
        assert_one_error_line(err)
    assert _snapshot(finished_run) == before, words


#: Values at the edges of the ranges (each accepted for the 1-channel digits model; randaug_n > 0 is not: kornia's
#: RandAugment needs 3 channels, which --dry-run reports); a drawn handful of them must train an epoch.
EDGES = {
    "min_lr": ["0"], "warmup_lr": ["0"], "weight_decay": ["0", "10"], "clip_grad": ["1e-6"], "betas": ["[0, 0.999]"],
    "opt_eps": ["1e-12"], "momentum": ["0", "0.99"], "label_smoothing": ["0", "0.99"], "hflip": ["1"],
    "affine_degrees": ["180"], "affine_translate": ["1"], "affine_scale": ["[0.5, 2]"], "randaug_m": ["0", "10"],
    "randaug_chunk": ["1"], "reprob": ["1"], "mixup": ["0", "5"], "cutmix": ["5"],
    "mixup_prob": ["0", "1"], "mixup_switch_prob": ["0", "1"], "repeated_aug": ["2"], "rrc_scale": ["[1e-3, 1]"],
    "rrc_ratio": ["[0.1, 10]"], "crop_pct": ["1e-3", "1"], "ema_decay": ["1e-6", "0.999999"],
    "seed": ["0", "9223372036854775807"], "num_workers": ["0"], "eval_every": ["1", "5"], "lr_base_batch": ["1"],
    "cooldown_epochs": ["100000"], "std": ["[1e-3]", "[1000]"], "mean": ["[-1000]", "[1000]"],
}  # QUICK's flags (threads, warmup_epochs, epochs) win over --set


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(edges=st.lists(st.sampled_from(sorted(EDGES)).flatmap(
    lambda k: st.sampled_from(EDGES[k]).map(lambda v, k=k: f"{k}={v}")), min_size=4, max_size=8, unique=True))
def test_accepted_settings_at_the_range_edges_finish(tmp_path_factory: pytest.TempPathFactory, capsys,
                                                      edges: list[str]) -> None:
    out = tmp_path_factory.mktemp("edges") / "run"
    words = [w for e in edges for w in ("--set", e)]
    argv = ["train", "--out", str(out), *QUICK, "--epochs", "1", "--augment", *words]
    assert _run([*argv, "--dry-run"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert _run(argv) == 0, (edges, capsys.readouterr().err)
    assert json.loads((out / "summary.json").read_text())["finished"]
