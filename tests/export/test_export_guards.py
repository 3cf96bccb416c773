"""`mpvg export` refuses what it cannot export faithfully: a model that is not entirely the checkpoint's (missing,
unused or mismatched tensors, options that disagree with an `mpvg train` checkpoint), an output path that is a
folder, a backend that is not available. Every refusal is one line, exit status 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpvg_kernels import cli
from mpvg_kernels import export as E
from mpvg_kernels.models import create_model
from mpvg_kernels.train import checkpoint as C

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _state_dict(path: Path, pe: str = "mpvg", **kwargs) -> Path:
    torch.manual_seed(0)
    torch.save(create_model("vit_digits", pe=pe, **kwargs).state_dict(), path)
    return path


def _train_checkpoint(path: Path, kwargs: dict | None = None) -> Path:
    torch.manual_seed(0)
    model = C.build_model("vit_digits", "mpvg", 10, dict(kwargs or {}))
    C.save_checkpoint(path, {
        "model": {"name": "vit_digits", "pe": "mpvg", "kwargs": dict(kwargs or {}), "num_classes": 10},
        "data": {"spec": "digits", "classes": [str(i) for i in range(10)], "in_chans": 1, "input_size": [16, 16],
                 "mean": [0.3053], "std": [0.376], "crop_pct": 1.0, "eval_resize": "full"},
        "config": {}, "epoch": 1, "state_dict": model.state_dict()})
    return path


def _export(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["export", *argv])
    err = capsys.readouterr().err
    return rc, err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpvg export: error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------------------
# the exported model is entirely the checkpoint's


def test_state_dict_of_another_mode_is_refused(tmp_path, capsys) -> None:
    """Default-mode weights exported as MPVG would leave the PE LayerNorms at their init: refused, named."""
    sd = _state_dict(tmp_path / "default.pt", pe="default")
    out = tmp_path / "x.onnx"
    rc, err = _export(capsys, "--checkpoint", str(sd), "--model", "vit_digits", "--pe", "mpvg", "--format", "onnx",
                      "--out", str(out), "--verify")
    line = _one_line_error(err)
    assert rc == 2 and not out.exists()
    assert "would not be entirely from the checkpoint" in line and "missing" in line and "pos_weight" in line


def test_head_of_another_size_is_refused(tmp_path, capsys) -> None:
    sd = _state_dict(tmp_path / "sd.pt")
    out = tmp_path / "x.onnx"
    rc, err = _export(capsys, "--checkpoint", str(sd), "--model", "vit_digits", "--pe", "mpvg", "--num-classes",
                      "7", "--format", "onnx", "--out", str(out), "--verify")
    line = _one_line_error(err)
    assert rc == 2 and not out.exists()
    assert "head.weight: checkpoint (10, 64) vs model (7, 64)" in line


def test_unused_class_token_and_missing_class_token_are_refused(tmp_path, capsys) -> None:
    """A class-token checkpoint into a GAP model (the token would be dropped), and the reverse (the token and its PE
    row would be random)."""
    cls_sd = _state_dict(tmp_path / "cls.pt", pool="cls")
    rc, err = _export(capsys, "--checkpoint", str(cls_sd), "--model", "vit_digits", "--pe", "mpvg", "--format",
                      "pt2", "--out", str(tmp_path / "a.pt2"))
    line = _one_line_error(err)
    assert rc == 2 and "unused" in line and "cls_token" in line
    gap_sd = _state_dict(tmp_path / "gap.pt")
    rc, err = _export(capsys, "--checkpoint", str(gap_sd), "--model", "vit_digits", "--pe", "mpvg", "--model-arg",
                      "pool=cls", "--format", "pt2", "--out", str(tmp_path / "b.pt2"))
    line = _one_line_error(err)
    assert rc == 2 and "cls_token" in line and "pos_embed[class-token row]" in line


def test_weights_choice_with_a_plain_state_dict_is_refused(tmp_path, capsys) -> None:
    """--weights ema|model picks among the weights of an `mpvg train` checkpoint; a plain state dict has one set."""
    sd = _state_dict(tmp_path / "sd.pt")
    rc, err = _export(capsys, "--checkpoint", str(sd), "--model", "vit_digits", "--pe", "mpvg", "--weights", "ema",
                      "--format", "pt2", "--out", str(tmp_path / "m.pt2"))
    line = _one_line_error(err)
    assert rc == 2 and "--weights ema" in line and "not an `mpvg train` checkpoint" in line


def test_complete_state_dict_exports(tmp_path, capsys) -> None:
    sd = _state_dict(tmp_path / "sd.pt", pool="cls")
    out = tmp_path / "ok.onnx"
    rc, err = _export(capsys, "--checkpoint", str(sd), "--model", "vit_digits", "--pe", "mpvg", "--model-arg",
                      "pool=cls", "--format", "onnx", "--out", str(out), "--verify")
    assert rc == 0 and out.is_file() and "verified" in err


def test_options_that_disagree_with_a_train_checkpoint_are_refused(tmp_path, capsys) -> None:
    ckpt = _train_checkpoint(tmp_path / "c.pt")
    base = ["--checkpoint", str(ckpt), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]
    rc, err = _export(capsys, *base, "--num-classes", "7")
    line = _one_line_error(err)
    assert rc == 2 and "--num-classes 7 disagrees with the checkpoint, which holds 10" in line
    rc, err = _export(capsys, *base, "--model-arg", "pool=cls")
    line = _one_line_error(err)
    assert rc == 2 and "--model-arg pool='cls' disagrees with the checkpoint, which holds 'avg'" in line
    rc, err = _export(capsys, *base, "--model-arg", "depth=2", "--model-arg", "drop_path_rate=0.0")
    line = _one_line_error(err)
    assert rc == 2 and "depth=2" in line and "holds 4" in line
    rc, err = _export(capsys, *base, "--model-arg", "no_such_option=1")
    line = _one_line_error(err)
    assert rc == 2 and "no_such_option" in line
    # options equal to what the checkpoint holds (recorded or the registered default) are fine
    rc, err = _export(capsys, *base, "--num-classes", "10", "--model-arg", "pool=avg", "--model-arg", "depth=4")
    assert rc == 0, err


def test_help_says_every_tensor_comes_from_the_checkpoint(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split()).lower()
    assert "every parameter and buffer of the exported model must come from the checkpoint" in out


# ------------------------------------------------------------------------------------------------------------------
# one-line errors before any work


def _no_work(monkeypatch) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was reported")

    monkeypatch.setattr(E, "load_model", no_work)


def test_out_that_is_a_folder(tmp_path, capsys, monkeypatch) -> None:
    _no_work(monkeypatch)
    for fmt in ("onnx", "pt2"):
        rc, err = _export(capsys, "--model", "vit_digits", "--pe", "mpvg", "--format", fmt, "--out", str(tmp_path))
        line = _one_line_error(err)
        assert rc == 2 and f"--out {tmp_path} is a folder" in line




def test_unavailable_backend(tmp_path, capsys, monkeypatch) -> None:
    """triton without CUDA (or not installed at all): one line naming the backend and why, no traceback."""
    _no_work(monkeypatch)
    out = tmp_path / "m.onnx"
    argv = ["--model", "vit_digits", "--pe", "mpvg", "--format", "onnx", "--out", str(out), "--backend", "triton"]
    if not torch.cuda.is_available():
        rc, err = _export(capsys, *argv)
        line = _one_line_error(err)
        assert rc == 2 and "--backend triton" in line and "not available" in line
    from mpvg_kernels.ops import backends

    monkeypatch.setattr(backends, "_TRITON_FOUND", False)  # looked up once at import: as without triton
    rc, err = _export(capsys, *argv)
    line = _one_line_error(err)
    assert rc == 2 and "--backend triton" in line and "triton is not installed" in line
    assert not out.exists()


def test_export_model_checks_out_and_backend_too(tmp_path, monkeypatch) -> None:
    """The library call refuses the same things (UserError), before tracing."""
    from mpvg_kernels.errors import UserError

    m = create_model("vit_digits", pe="mpvg").eval()
    with pytest.raises(UserError, match="is a folder"):
        E.export_model(m, tmp_path, "onnx")
    from mpvg_kernels.ops import backends

    monkeypatch.setattr(backends, "_TRITON_FOUND", False)  # as without triton
    with pytest.raises(UserError, match="triton is not installed"):
        E.export_model(m, tmp_path / "m.onnx", "onnx", backend="triton")
    with pytest.raises(UserError, match="unknown backend"):
        E.export_model(m, tmp_path / "m.onnx", "onnx", backend="cuda")
