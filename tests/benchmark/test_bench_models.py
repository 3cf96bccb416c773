"""The model benchmark runs end to end in its smoke mode and writes its JSON, Markdown and PNG files."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpvg_kernels.benchmark import models as B
from mpvg_kernels.cli import bench as bench_cli
from mpvg_kernels.models import PE_MODES

ROOT = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    bench_cli.add_parser(sub)
    return parser


def test_smoke_run_writes_files(tmp_path, capsys) -> None:
    args = _parser().parse_args(["bench", "--smoke", "--out-dir", str(tmp_path), "--rounds", "2", "--no-progress"])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "models_smoke.json").read_text())
    recs = data["records"]
    # every mode x impl x task of the tiny model, eager
    assert {(r["mode"], r["impl"], r["task"]) for r in recs} == {
        (m, i, t) for m in PE_MODES for i in B.IMPLS for t in B.TASKS
    }
    assert all(r["exec"] == "eager" and r["model"] == "vit_digits" and not r["error"] for r in recs)
    assert all(r["images_per_s"] > 0 and r["n"] == 2 for r in recs)
    env = data["environment"]
    assert env["threads"] == 1 and env["torch"] == torch.__version__ and env["cpu"]
    mpvg = [r for r in data["ratios"] if r["mode"] == "mpvg"]
    assert {r["task"] for r in mpvg} == set(B.TASKS) and all(r["target"] for r in mpvg)
    md = (tmp_path / "models_smoke.md").read_text()
    assert "| mpvg | fused | eager |" in md and "Ratio to `default`" in md
    png = (tmp_path / "models_smoke.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ViT-digits" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_case(tmp_path) -> None:
    """One compiled inference case (the fused MPVG model) goes through torch.compile and is timed."""
    cfg = B.BenchConfig(
        models=["vit_digits"],
        pes=["mpvg"],
        impls=["fused"],
        execs=["compile"],
        tasks=["infer_bN"],
        compile_models=[],
        batch_infer=4,
        warmup=1,
        rounds=2,
        out_dir=str(tmp_path),
        name="compiled",
        progress=False,
    )
    result = B.run_bench(cfg)
    (rec,) = result["records"]
    assert rec["exec"] == "compile" and not rec["error"] and rec["n"] == 2
    assert (tmp_path / "compiled.md").is_file()


def test_unfused_switches_backend_and_cache() -> None:
    """``unfused``: backend torch and the PE cache off during the call, both restored afterwards."""
    from mpvg_kernels.models import create_model
    from mpvg_kernels.ops import backends

    m = create_model("vit_digits", pe="mpvg").eval()
    before = backends.get_backend()
    with B._impl_context("unfused", m):
        assert backends.get_backend() == "torch" and m.pe_cache_enabled is False
    assert backends.get_backend() == before and m.pe_cache_enabled is True


def test_ratios_and_flags() -> None:
    recs = [
        {
            "model": "m",
            "mode": mode,
            "impl": "fused",
            "exec": "eager",
            "task": "train",
            "images_per_s": 1 / t[1],
            "times_s": t,
            "min_s": min(t),
            "n": len(t),
        }
        for mode, t in (("default", [1.0, 1.0, 2.0]), ("mpvg", [1.0, 1.04, 2.2]))
    ]
    (r,) = B.ratios(recs)
    assert r["ratio_vs_default"] == pytest.approx(1 / 1.04) and r["target"] == 0.97 and r["met"] is False
    assert r["paired_ratio"] == pytest.approx(1 / 1.04) and r["best_ratio"] == pytest.approx(1.0)
    ns = _parser().parse_args(["bench", "--models", "a,b", "--batch", "a=8,4", "--threads", "2", "--no-progress"])
    cfg = bench_cli.config_from_args(ns)
    assert cfg.models == ["a", "b"] and cfg.batches("a") == (8, 4) and cfg.batches("b") == (16, 8)
    assert cfg.threads == 2
    from mpvg_kernels.errors import UserError

    with pytest.raises(UserError, match="--modes: 'nope' is not one of"):
        B.run_bench(B.BenchConfig(models=["vit_digits"], pes=["nope"], progress=False))
    with pytest.raises(UserError, match="--models: no model given"):
        B.run_bench(B.BenchConfig(models=[], progress=False))


def test_script_help() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--smoke" in out.stdout


def test_help_lists_every_benchconfig_field(capsys) -> None:
    """``mpvg bench`` has one flag per BenchConfig field, generated from the dataclass (its help text included)."""
    import dataclasses

    from mpvg_kernels import cli
    from mpvg_kernels.dataclass_flags import field_flags

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(B.BenchConfig):
        flag = bench_cli.SHARED_FLAGS.get(f.name) or field_flags(f)[0]
        assert flag in text, f.name
        if f.name not in bench_cli.SHARED_FLAGS:
            assert " ".join(f.metadata["help"].split()) in text, f.name
    for flag in ("--models", "--modes", "--batch-infer", "--batch", "--smoke", "--profile", "--no-progress"):
        assert flag in text


def test_model_arg_reaches_every_built_model(monkeypatch) -> None:
    """``--model-arg pool=cls`` applies to every benchmarked model (and wins over --pool)."""
    built = []

    def create(*args, **kwargs):
        m = create_model(*args, **kwargs)
        built.append(m)
        return m

    from mpvg_kernels.models import create_model

    monkeypatch.setattr(B, "create_model", create)
    ns = _parser().parse_args(
        ["bench", "--smoke", "--pool", "avg", "--model-arg", "pool=cls", "--modes", "default,mpvg", "--tasks",
         "infer_b1,train", "--device", "cpu"]
    )
    cfg = bench_cli.config_from_args(ns)
    assert cfg.model_kwargs == {"pool": "cls"} and cfg.pes == ["default", "mpvg"] and cfg.device == "cpu"
    cases = B.make_cases("vit_digits", cfg)
    assert {c.pe for c in cases} == {"default", "mpvg"} and len(built) == 4  # inference + training model per mode
    assert all(m.pool == "cls" for m in built)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the error for --device cuda on a machine without CUDA; this one has CUDA")
def test_cuda_without_cuda_is_a_user_error(tmp_path, capsys) -> None:
    from mpvg_kernels import cli

    assert cli.main(["bench", "--smoke", "--device", "cuda", "--out-dir", str(tmp_path), "--no-progress"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
