"""A checkpoint is untrusted input: `mpvg eval` / `mpvg predict` / `mpvg export` check every metadata field's
type and range (one validator, ``checkpoint.validate_checkpoint``) and the model's size against the weights the
file holds before building anything: one line, exit status 2, no traceback, no huge allocation. A run folder is
accepted as --checkpoint (its checkpoint.pt); an exported ONNX / pt2 file is named as such. eval's default
DataLoader workers fit the machine."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_limits import one_line_error, run_cli
from test_eval_predict_guards import DIGIT_CLASSES, _checkpoint, _folder

from mpvg_kernels.train import checkpoint as C


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Any]:
    """A valid tiny `mpvg train` checkpoint (vit_digits, MPVG, digits), as the loaded dict."""
    path = _checkpoint(tmp_path_factory.mktemp("ckpt") / "c.pt", DIGIT_CLASSES)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 9), dtype=np.uint8)).save(path)
    return path


def _set(ckpt: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """A copy of ``ckpt`` with the dotted ``field`` set to ``value``."""
    ckpt = copy.deepcopy(ckpt)
    *parents, last = field.split(".")
    d = ckpt
    for p in parents:
        d = d[p]
    d[last] = value
    return ckpt


def _write(tmp_path: Path, ckpt: dict[str, Any]) -> Path:
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    return path


# field, value, what the error names (besides the field)
BAD_FIELDS = [
    ("version", "abc", "version"),
    ("version", 0, "version"),
    ("version", True, "version"),
    ("epoch", "x", "epoch"),
    ("epoch", -1, "epoch"),
    ("model", [1, 2], "model"),
    ("model.name", 5, "model.name"),
    ("model.name", "no_such_model", "model.name"),
    ("model.pe", "zzz", "model.pe"),
    ("model.num_classes", 10**10, "model.num_classes"),
    ("model.num_classes", 0, "model.num_classes"),
    ("model.num_classes", "10", "model.num_classes"),
    ("model.kwargs", "abc", "model.kwargs"),
    ("model.kwargs", {"embed_dim": 2**20}, "model.kwargs"),
    ("model.kwargs", {"embed_dim": 2**12, "depth": 48}, "model.kwargs"),
    ("model.kwargs", {"depth": 10**7}, "model.kwargs"),
    ("model.kwargs", {"embed_dim": -5}, "model.kwargs"),
    ("model.kwargs", {"patch_size": 0}, "model.kwargs"),
    ("model.kwargs", {"img_size": 60000}, "model.kwargs"),
    ("model.kwargs", {"embed_dim": float("nan")}, "model.kwargs"),
    ("model.kwargs", {"checkpoint_path": 5}, "model.kwargs.checkpoint_path"),
    ("data", "abc", "data"),
    ("data.spec", 7, "data.spec"),
    ("data.classes", [str(i) for i in range(5)], "data.classes"),
    ("data.classes", list(range(10)), "data.classes"),
    ("data.classes", "0123456789", "data.classes"),
    ("data.in_chans", 3, "data.in_chans"),
    ("data.in_chans", "1", "data.in_chans"),
    ("data.input_size", "abc", "data.input_size"),
    ("data.input_size", [60000, 60000], "data.input_size"),
    ("data.input_size", [32, 32], "data.input_size"),
    ("data.input_size", [16], "data.input_size"),
    ("data.mean", [0.1, 0.2], "data.mean"),
    ("data.mean", [float("nan")], "data.mean"),
    ("data.mean", "abc", "data.mean"),
    ("data.std", [0.0], "data.std"),
    ("data.crop_pct", float("nan"), "data.crop_pct"),
    ("data.crop_pct", 2.0, "data.crop_pct"),
    ("data.eval_resize", "zoom", "data.eval_resize"),
    ("state_dict", [1, 2], "state_dict"),
    ("state_dict", {"a": 1}, "state_dict"),
    ("state_dict", {}, "state_dict"),
    ("ema", {"updates": 1, "state_dict": [1]}, "ema"),
    ("ema", "abc", "ema"),
    ("config", [1], "config"),
]


# every case through predict; through eval (the same validator, plus the data fields it needs) the top-level and
# data fields
CASES = [("predict", *c) for c in BAD_FIELDS] + [
    ("eval", *c) for c in BAD_FIELDS if c[0].split(".")[0] in ("version", "epoch", "data", "state_dict", "config")
]


@pytest.mark.parametrize(
    ("cmd", "field", "value", "named"), CASES, ids=[f"{cmd}-{f}={v!r}"[:48] for cmd, f, v, _ in CASES]
)
def test_bad_metadata_is_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, base, image, cmd, field, value, named
) -> None:
    """Every bad field: one line naming it, status 2, nothing printed on stdout; the data set is never loaded."""
    from mpvg_kernels import data as data_mod

    monkeypatch.setattr(data_mod, "load_data", lambda *a, **k: pytest.fail("the data set was loaded"))
    path = _write(tmp_path, _set(base, field, value))
    argv = ["predict", image] if cmd == "predict" else ["eval", "--num-workers", "0"]
    rc, out, err = run_cli(capsys, *argv, "--checkpoint", path)
    line = one_line_error(err, cmd)
    assert rc == 2 and out == ""
    assert named in line and str(path) in line, line


def test_missing_field_is_named(tmp_path, capsys, base, image) -> None:
    ckpt = copy.deepcopy(base)
    del ckpt["data"]["input_size"]
    rc, _, err = run_cli(capsys, "predict", image, "--checkpoint", _write(tmp_path, ckpt))
    assert rc == 2 and "data.input_size" in one_line_error(err, "predict") and "data.input_size is missing" in err


def test_export_checks_the_same_fields(tmp_path, capsys, base) -> None:
    """`mpvg export` reads train checkpoints through the same validator; nothing is written."""
    path = _write(tmp_path, _set(base, "model.kwargs", {"embed_dim": 2**20}))
    out = tmp_path / "m.pt2"
    rc, _, err = run_cli(capsys, "export", "--checkpoint", path, "--format", "pt2", "--out", out)
    assert rc == 2 and "model.kwargs" in one_line_error(err, "export") and not out.exists()


def test_pretrained_path_in_model_kwargs_is_never_read(tmp_path, capsys, monkeypatch, base, image) -> None:
    """A run trained from a pretrained file records ``checkpoint_path`` in its model options; rebuilding the
    model never opens that file (every weight comes from the checkpoint), so a path to a system file or to a file
    moved since is harmless."""
    from mpvg_kernels.models import pretrained

    opened: list[Any] = []
    monkeypatch.setattr(pretrained, "load_pretrained", lambda *a, **k: opened.append(a))
    for target in ("/etc/passwd", str(tmp_path / "moved.pth")):
        path = _write(tmp_path, _set(base, "model.kwargs", {"checkpoint_path": target}))
        rc, out, err = run_cli(capsys, "predict", image, "--checkpoint", path, "--topk", "2")
        assert rc == 0 and out.startswith(f"{image}: ") and err == "", err
    assert opened == []


def test_valid_checkpoint_still_loads(tmp_path, base) -> None:
    ckpt = C.validate_checkpoint(copy.deepcopy(base), "c.pt")
    model = C.model_from_checkpoint(ckpt)
    assert model.head.out_features == 10


def test_predict_with_fewer_class_names_than_outputs_is_an_error(tmp_path, capsys, base, image) -> None:
    """The head predicts 10 classes, the checkpoint names 5: an error, never a name printed for the wrong index."""
    path = _write(tmp_path, _set(base, "data.classes", ["a", "b", "c", "d", "e"]))
    rc, out, err = run_cli(capsys, "predict", image, "--checkpoint", path)
    line = one_line_error(err, "predict")
    assert rc == 2 and out == "" and "data.classes" in line and "5 names" in line and "10" in line


# ------------------------------------------------------------------------------------------------------------------
# what --checkpoint points at


def test_run_folder_as_checkpoint_uses_its_checkpoint_pt(tmp_path, capsys, image) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _checkpoint(run / "checkpoint.pt", DIGIT_CLASSES)
    rc, out, err = run_cli(capsys, "predict", image, "--checkpoint", run, "--topk", "1")
    assert rc == 0 and out.startswith(f"{image}: "), err


@pytest.mark.parametrize("cmd", ["predict", "eval", "export"])
def test_folder_without_checkpoint_is_named(tmp_path, capsys, image, cmd) -> None:
    empty = tmp_path / "empty_run"
    empty.mkdir()
    argv = {
        "predict": ["predict", image],
        "eval": ["eval"],
        "export": ["export", "--format", "pt2", "--out", tmp_path / "m.pt2"],
    }[cmd]
    rc, _, err = run_cli(capsys, *argv, "--checkpoint", empty)
    line = one_line_error(err, cmd)
    assert rc == 2 and f"{empty} is a folder without checkpoint.pt" in line


def _onnx_file(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), path)
    return path


def _pt2_file(path: Path) -> Path:
    ep = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    torch.export.save(ep, path)
    return path


@pytest.mark.parametrize("kind", ["onnx", "pt2"])
@pytest.mark.parametrize("cmd", ["predict", "eval", "export"])
def test_exported_file_as_checkpoint_is_named(tmp_path, capsys, image, kind, cmd) -> None:
    """An exported model passed as --checkpoint: said to be one (no torch.load advice about weights_only)."""
    pytest.importorskip("onnx")
    f = _onnx_file(tmp_path / "model.bin") if kind == "onnx" else _pt2_file(tmp_path / "model.bin")
    argv = {
        "predict": ["predict", image],
        "eval": ["eval"],
        "export": ["export", "--format", "pt2", "--out", tmp_path / "m.pt2"],
    }[cmd]
    rc, _, err = run_cli(capsys, *argv, "--checkpoint", f)
    line = one_line_error(err, cmd)
    what = "an ONNX file" if kind == "onnx" else "a torch.export (.pt2) program"
    assert rc == 2 and f"{f} is {what}" in line and "not a checkpoint" in line and "weights_only" not in line


# ------------------------------------------------------------------------------------------------------------------
# DataLoader workers


def test_eval_default_workers_fit_the_cpus(tmp_path, capsys, monkeypatch, recwarn) -> None:
    """Folder data on a 2-CPU machine: one worker (not 4), and no DataLoader warning about too many workers."""
    from mpvg_kernels.train import distributed as D
    from mpvg_kernels.train import evaluate as EV

    names = ["cat", "dog"]
    root = _folder(tmp_path / "data", names)
    ckpt = _checkpoint(tmp_path / "c.pt", names, spec=f"folder:{root}")
    monkeypatch.setattr(D, "usable_cpus", lambda: 2)
    made: list[int] = []
    real = EV.DataLoader

    def spy(*a, **k):
        made.append(k.get("num_workers", 0))
        return real(*a, **k)

    monkeypatch.setattr(EV, "DataLoader", spy)
    rc, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt)
    assert rc == 0 and "top-1" in out and made == [1]
    assert "worker" not in err and not [w for w in recwarn if "worker" in str(w.message)]
    monkeypatch.setattr(D, "usable_cpus", lambda: 1)
    made.clear()
    rc, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt)
    assert rc == 0 and made == [0]


def test_eval_num_workers_far_above_the_cpus_is_an_error(tmp_path, capsys, monkeypatch) -> None:
    from mpvg_kernels.train import distributed as D

    monkeypatch.setattr(D, "usable_cpus", lambda: 2)
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "missing.pt", "--num-workers", "1000000")
    line = one_line_error(err, "eval")
    assert rc == 2 and "--num-workers 1000000" in line and "at most 8" in line
