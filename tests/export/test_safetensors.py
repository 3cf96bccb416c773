"""``.safetensors`` weights: ``mpvg export --format safetensors`` writes a checkpoint's weights with their metadata
(atomically), and ``mpvg eval|predict|export --checkpoint`` and ``load_pretrained`` read them back, without pickle,
to the same results as the ``.pt`` checkpoint."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mpvg_kernels import cli
from mpvg_kernels import export as E
from mpvg_kernels.errors import UserError
from mpvg_kernels.models import factory as F
from mpvg_kernels.models import load_pretrained
from mpvg_kernels.train import checkpoint as C

safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("PIL")

CLASSES = [str(i) for i in range(10)]
DATA = {"spec": "digits", "classes": CLASSES, "in_chans": 1, "input_size": [16, 16], "mean": [0.3053],
        "std": [0.376], "crop_pct": 1.0, "eval_resize": "full"}


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = C.build_model("vit_digits", "mpvg", 10, {"drop_path_rate": 0.0})
    with torch.no_grad():  # non-trivial PE LayerNorms
        for name, p in model.named_parameters():
            if ".pos_" in name:
                p.add_(0.3 * torch.randn_like(p))
    C.save_checkpoint(path, {
        "model": {"name": "vit_digits", "pe": "mpvg", "kwargs": {"drop_path_rate": 0.0}, "num_classes": 10},
        "data": DATA, "config": {}, "epoch": 3, "state_dict": model.state_dict()})
    return path


def _images(folder: Path, n: int = 4) -> list[Path]:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        out.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(out[-1])
    return out


def _export(ckpt: Path, out: Path, capsys) -> Path:
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(out),
                     "--verify"]) == 0
    assert "max |diff| = 0.00e+00" in capsys.readouterr().err
    return out


@pytest.fixture
def pair(tmp_path, capsys) -> tuple[Path, Path]:
    pt = _checkpoint(tmp_path / "c.pt")
    return pt, _export(pt, tmp_path / "c.safetensors", capsys)


def test_safetensors_round_trip_predict_and_eval_equal_the_pt_checkpoint(pair, tmp_path, capsys) -> None:
    pt, st = pair
    images = [str(p) for p in _images(tmp_path / "img")]
    results = []
    for ckpt in (pt, st):
        assert cli.main(["predict", "--checkpoint", str(ckpt), "--json", "--topk", "3", *images]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1]
    from mpvg_kernels.train.evaluate import evaluate_checkpoint

    ev = [evaluate_checkpoint(str(c), None, batch_size=256, num_workers=0) for c in (pt, st)]
    for r in ev:
        r.pop("checkpoint")
    assert ev[0] == ev[1] and ev[0]["epoch"] == 3


def test_safetensors_carries_the_metadata_of_the_checkpoint(pair) -> None:
    _, st = pair
    from safetensors import safe_open

    with safe_open(str(st), framework="pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["model"]) == {"name": "vit_digits", "pe": "mpvg", "kwargs": {"drop_path_rate": 0.0},
                                         "num_classes": 10}
    assert json.loads(meta["data"]) == DATA and json.loads(meta["epoch"]) == 3
    assert meta["format"] == F.FORMAT and meta["model_name"] == "vit_digits" and meta["pe"] == "mpvg"
    deploy = E.deployment_metadata(E.load_model(None, None, st))  # what an ONNX export of it carries
    assert {k: meta[k] for k in deploy if k != "backend"} == {k: v for k, v in deploy.items() if k != "backend"}
    assert json.loads(meta["mean"]) == [0.3053] and meta["eval_resize"] == "full"


def test_loading_safetensors_runs_no_pickle(pair, monkeypatch) -> None:
    pt, st = pair
    expect = C.model_from_checkpoint(C.load_checkpoint(pt)).state_dict()

    def refuse(*a, **k):
        raise AssertionError("pickle used while loading a .safetensors file")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    model = C.model_from_checkpoint(C.load_checkpoint(st))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expect.items())
    fresh = C.build_model("vit_digits", "mpvg", 10)
    load_pretrained(fresh, st)  # strict: every parameter from the file
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expect.items())
    exported = E.load_model(None, None, st)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in expect.items())


def test_plain_safetensors_state_dict_loads_with_model_name(tmp_path, capsys) -> None:
    """timm-style weights in a .safetensors file (no mpvg metadata) load like a plain state dict."""
    src = C.build_model("vit_digits", "mpvg", 10)
    plain = tmp_path / "w.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(plain))
    model = E.load_model("vit_digits", "mpvg", plain, num_classes=10)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())
    out = tmp_path / "again.safetensors"
    assert cli.main(["export", "--model", "vit_digits", "--pe", "mpvg", "--num-classes", "10", "--checkpoint",
                     str(plain), "--format", "safetensors", "--out", str(out), "--verify"]) == 0
    capsys.readouterr()
    rebuilt = C.model_from_checkpoint(C.load_checkpoint(out))
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in src.state_dict().items())


def test_safetensors_write_is_atomic(pair, tmp_path, monkeypatch) -> None:
    pt, _ = pair
    out = tmp_path / "kept.safetensors"
    out.write_bytes(b"the previous file")
    import safetensors.torch as st

    real = st.load

    def corrupt(data, *a, **k):
        return {k: v + 1 for k, v in real(data, *a, **k).items()}

    monkeypatch.setattr(st, "load", corrupt)
    with pytest.raises(UserError, match="read back differ"):
        E.export_model(E.load_model(None, None, pt), out, "safetensors")
    assert out.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
