"""Deployment metadata: an exported ONNX file says how to preprocess its input and what its outputs mean, enough
for a plain onnxruntime + PIL + numpy script (no torch, no mpvg_kernels) to reproduce `mpvg predict`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpvg_kernels import cli
from mpvg_kernels import export as E
from mpvg_kernels.train import checkpoint as C

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("PIL")

KEYS = {"model_name", "pe", "pool", "backend", "input_name", "output_name", "input_size", "color_mode", "mean", "std",
        "interpolation", "antialias", "bicubic_a", "resize_dtype", "crop_pct", "eval_resize", "class_names",
        "num_classes", "preprocessing_source", "mpvg_kernels_version", "metadata_version"}


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _checkpoint(path: Path, data: dict, num_classes: int = 10) -> Path:
    torch.manual_seed(0)
    model = C.build_model("vit_digits", "mpvg", num_classes)
    C.save_checkpoint(path, {"model": {"name": "vit_digits", "pe": "mpvg", "kwargs": {}, "num_classes": num_classes},
                             "data": data, "config": {}, "epoch": 1, "state_dict": model.state_dict()})
    return path


def test_onnx_carries_the_checkpoint_preprocessing(tmp_path, capsys) -> None:
    classes = ["cat", "dog", "eel"]
    ckpt = _checkpoint(tmp_path / "c.pt", {"spec": "folder:/data/pets", "classes": classes, "in_chans": 1,
                                           "input_size": [16, 16], "mean": [0.5], "std": [0.25], "crop_pct": 0.875,
                                           "eval_resize": "center_crop"}, num_classes=3)
    out = tmp_path / "m.onnx"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out),
                     "--backend", "torch"]) == 0
    capsys.readouterr()
    props = _props(out)
    assert KEYS <= set(props), sorted(KEYS - set(props))
    assert props["model_name"] == "vit_digits" and props["pe"] == "mpvg" and props["backend"] == "torch"
    assert json.loads(props["input_size"]) == [1, 16, 16] and props["color_mode"] == "L"
    assert json.loads(props["mean"]) == [0.5] and json.loads(props["std"]) == [0.25]
    assert props["eval_resize"] == "center_crop" and props["interpolation"] == "bicubic"
    assert props["antialias"] == "when_downscaling" and float(props["crop_pct"]) == 0.875
    assert json.loads(props["bicubic_a"]) == {"downscale": -0.5, "upscale": -0.75}
    assert props["resize_dtype"] == "uint8"
    assert json.loads(props["class_names"]) == classes and props["num_classes"] == "3"
    assert props["preprocessing_source"] == "checkpoint"
    assert props["input_name"] == "images" and props["output_name"] == "logits"


def test_model_without_checkpoint_uses_its_default_cfg(tmp_path) -> None:
    model = E.load_model("vit_digits", "lape")
    res = E.export_model(model, tmp_path / "m.onnx", "onnx")
    props = _props(res.path)
    assert props["preprocessing_source"] == "model default_cfg" and json.loads(props["class_names"]) == []
    assert props["pe"] == "lape" and json.loads(props["input_size"]) == [1, 16, 16]
    assert props["eval_resize"] == "center_crop" and float(props["crop_pct"]) == 1.0
    # pt2 files carry the same metadata as an extra file
    res = E.export_model(model, tmp_path / "m.pt2", "pt2")
    extra = {"mpvg_metadata.json": ""}
    torch.export.load(str(res.path), extra_files=extra)
    assert json.loads(extra["mpvg_metadata.json"])["pe"] == "lape"


# A deployment script that knows nothing of this package: only the metadata.
READER = r'''
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def load(model_path):
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    return sess, sess.get_modelmeta().custom_metadata_map


def open_8bit(path, mode):
    """The image as mpvg reads it: 16-bit and 32-bit integer pixels / 257, float pixels (in [0, 1]) * 255."""
    im = Image.open(path)
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if im.mode == "F" else a / 257.0
        im = Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8))
    return im.convert(mode)  # "L" or "RGB"


def preprocess(path, meta):
    c, h, w = json.loads(meta["input_size"])
    im = open_8bit(path, meta["color_mode"])
    if meta["eval_resize"] == "center_crop":
        # shorter side to floor(min(h, w) / crop_pct) (bicubic, on uint8), then a centered h x w crop
        s = int(min(h, w) / float(meta["crop_pct"]))
        iw, ih = im.size
        nh, nw = (s, max(s, round(iw * s / ih))) if ih <= iw else (max(s, round(ih * s / iw)), s)
        if (nh, nw) != (ih, iw):
            im = im.resize((nw, nh), Image.BICUBIC)
        top, left = max(0, (nh - h) // 2), max(0, (nw - w) // 2)
        im = im.crop((left, top, left + w, top + h))
        x = np.asarray(im, dtype=np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    else:
        # "full": the whole image to h x w, bilinear with antialiasing, on floats in [0, 1]
        # (PIL's BILINEAR filter on a float image, one channel at a time)
        x = np.asarray(im, dtype=np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        x = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(ch), mode="F").resize((w, h), Image.BILINEAR))
                      for ch in x])
    mean = np.asarray(json.loads(meta["mean"]), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(json.loads(meta["std"]), dtype=np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def main(model_path, images):
    sess, meta = load(model_path)
    classes = json.loads(meta["class_names"])
    batch = np.stack([preprocess(p, meta) for p in images])
    logits = sess.run([meta["output_name"]], {meta["input_name"]: batch})[0]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    top = probs.argmax(axis=1)
    print(json.dumps([{"image": p, "class": classes[int(i)], "index": int(i), "prob": float(probs[k, i])}
                      for k, (p, i) in enumerate(zip(images, top))]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
'''

# Run the reader with torch and mpvg_kernels made unimportable: it must need neither.
RUNNER = r'''
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "mpvg_kernels"):
            raise ModuleNotFoundError(f"{name} is blocked in this test", name=name)
        return None
sys.meta_path.insert(0, Block())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def _held_out_images(folder: Path, n: int = 24) -> list[Path]:
    """Held-out digits as PNG: most at their 8x8 size (upsampled to 16x16 by the model's preprocessing), some
    enlarged to 40x32 (downsampled, antialiased), some saved as RGB, some as 16-bit gray."""
    from PIL import Image

    from mpvg_kernels.data import digits_split

    images, _, _, test_idx = digits_split()
    folder.mkdir()
    paths = []
    for k, i in enumerate(test_idx[:n]):
        im = Image.fromarray(images[i])
        if k % 4 == 1:
            im = im.resize((32, 40), Image.NEAREST)
        if k % 8 == 3:
            im = im.convert("RGB")
        if k % 8 == 5:  # 16-bit: v * 257, read back as v
            im = Image.fromarray(np.asarray(im, dtype=np.uint16) * 257)
        paths.append(folder / f"d{k:02d}.png")
        im.save(paths[-1])
    return paths


@pytest.mark.slow
def test_plain_onnxruntime_script_reproduces_mpvg_predict(tmp_path, capsys) -> None:
    from mpvg_kernels.train.predict import predict_images

    run = tmp_path / "run"
    assert cli.main(["train", "--epochs", "2", "--out", str(run), "--no-progress", "--threads", "1"]) == 0
    ckpt = run / "checkpoint.pt"
    onnx_path = tmp_path / "digits.onnx"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(onnx_path)]) == 0
    capsys.readouterr()
    images = _held_out_images(tmp_path / "images")

    got = _run_reader(tmp_path, onnx_path, images)
    want = predict_images(ckpt, images, topk=1)
    assert [g["image"] for g in got] == [w["image"] for w in want]
    assert [g["class"] for g in got] == [w["top"][0]["class"] for w in want]
    probs_got = np.array([g["prob"] for g in got])
    probs_want = np.array([w["top"][0]["prob"] for w in want])
    assert np.abs(probs_got - probs_want).max() < 1e-4  # the same preprocessing, not merely the same argmax


def _run_reader(tmp_path: Path, onnx_path: Path, images: list[Path]) -> list[dict]:
    reader, runner = tmp_path / "reader.py", tmp_path / "runner.py"
    reader.write_text(READER)
    runner.write_text(RUNNER)
    proc = subprocess.run([sys.executable, str(runner), str(reader), str(onnx_path), *map(str, images)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plain_script_center_crop_when_downscaling(tmp_path, capsys) -> None:
    """Folder checkpoints (resize + center crop): larger images, where PIL's BICUBIC is PyTorch's antialiased
    bicubic up to rounding (at most one grey level), so the probabilities agree closely. (Upscaling differs:
    PyTorch's bicubic uses a = -0.75 there, PIL's a = -0.5; see docs/deploy.md.)"""
    from PIL import Image

    from mpvg_kernels.data import digits_split
    from mpvg_kernels.train.predict import predict_images

    classes = [f"c{i}" for i in range(10)]
    ckpt = _checkpoint(tmp_path / "c.pt", {"spec": "folder:/data", "classes": classes, "in_chans": 1,
                                           "input_size": [16, 16], "mean": [0.5], "std": [0.25], "crop_pct": 0.875,
                                           "eval_resize": "center_crop"})
    onnx_path = tmp_path / "m.onnx"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(onnx_path)]) == 0
    capsys.readouterr()
    images, _, _, test_idx = digits_split()
    paths = []
    for k, size in enumerate([(48, 40), (40, 48), (30, 30), (200, 150), (19, 23), (64, 64)]):
        paths.append(tmp_path / f"i{k}.png")
        Image.fromarray(images[test_idx[k]]).resize(size, Image.BILINEAR).save(paths[-1])
    got = _run_reader(tmp_path, onnx_path, paths)
    want = predict_images(ckpt, paths, topk=10)
    for g, w in zip(got, want, strict=True):
        probs = {t["class"]: t["prob"] for t in w["top"]}
        assert abs(g["prob"] - probs[g["class"]]) < 2e-3, (g, w["top"][:2])
        top2 = sorted(probs.values())[-2:]
        if top2[1] - top2[0] > 5e-3:  # a clear winner must be the same class
            assert g["class"] == w["top"][0]["class"]
