"""Property: whatever a checkpoint's metadata holds (wrong types, negative, huge, NaN, strings, nested containers,
missing fields) and whatever numbers `mpvg export` / `eval` / `predict` options get, the command either gives a
normal result or fails with exit status 2, one line on stderr and nothing changed on disk; never a traceback, never
an allocation beyond a few GiB (the address space is capped while the command runs: see cli_limits)."""

from __future__ import annotations

import copy
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_limits import one_line_error, run_cli, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_eval_predict_guards import DIGIT_CLASSES, _checkpoint

pytest.importorskip("onnx")

FIELDS = [
    "version", "epoch", "world_size", "config", "model", "model.name", "model.pe", "model.num_classes",
    "model.kwargs", "model.kwargs.embed_dim", "model.kwargs.depth", "model.kwargs.img_size", "model.kwargs.num_heads",
    "model.kwargs.patch_size", "model.kwargs.checkpoint_path", "model.params", "data", "data.spec", "data.classes",
    "data.in_chans", "data.input_size", "data.mean", "data.std", "data.crop_pct", "data.eval_resize", "state_dict",
    "ema", "ema.state_dict",
]  # fmt: skip
DELETE = object()

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 10, 16, 64, 2**20, 10**10, 60000, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["abc", "/etc/passwd", "digits", "full", "center_crop", "mpvg", "vit_digits"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
_edits = st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(_values, st.just(DELETE))), min_size=1, max_size=2)


class _Tiny(dict):
    """The valid tiny checkpoint (a dict) with a short repr for hypothesis's failure reports."""

    def __repr__(self) -> str:
        return "<tiny vit_digits checkpoint>"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Any]:
    path = _checkpoint(tmp_path_factory.mktemp("ckpt") / "c.pt", DIGIT_CLASSES)
    return _Tiny(torch.load(path, weights_only=True))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 7), dtype=np.uint8)).save(path)
    return path


def _edit(ckpt: dict[str, Any], field: str, value: Any, weights: dict[str, torch.Tensor]) -> None:
    """Set (or delete) the dotted ``field`` where its parents are dicts (an ``ema`` entry made from ``weights``)."""
    *parents, last = field.split(".")
    d: Any = ckpt
    for p in parents:
        if not isinstance(d, dict):
            return
        if p == "ema" and d.get("ema") is None:
            d["ema"] = {"updates": 0, "state_dict": dict(weights)}
        if p == "kwargs" and d.get("kwargs") is None:
            d["kwargs"] = {}
        d = d.get(p)
    if not isinstance(d, dict):
        return
    if value is DELETE:
        d.pop(last, None)
    else:
        d[last] = value


def _command(draw_cmd: str, opts: dict[str, Any], ckpt: Path, folder: Path, image: Path) -> list[Any]:
    if draw_cmd == "predict":
        argv: list[Any] = ["predict", image, "--checkpoint", ckpt]
        if opts["topk"] is not None:
            argv += ["--topk", opts["topk"]]
    elif draw_cmd == "eval":
        argv = ["eval", "--checkpoint", ckpt, "--num-workers", opts["workers"]]
        if opts["batch"] is not None:
            argv += ["--batch-size", opts["batch"]]
    else:
        fmt = opts["format"]
        argv = ["export", "--checkpoint", ckpt, "--format", fmt, "--out", folder / "out" / f"m.{fmt}"]
        if opts["opset"] is not None:
            argv += ["--opset", opts["opset"]]
        if opts["classes"] is not None:
            argv += ["--num-classes", opts["classes"]]
    if opts["device"] is not None and draw_cmd != "export":
        argv += ["--device", opts["device"]]
    return argv


_options = st.fixed_dictionaries({
    "topk": st.one_of(st.none(), st.integers(-3, 10**12)),
    "workers": st.sampled_from([0, -1, 10**6]),
    "batch": st.one_of(st.none(), st.integers(-3, 10**12)),
    "format": st.sampled_from(["onnx", "pt2"]),
    "opset": st.one_of(st.none(), st.integers(-5, 10**6), st.sampled_from([17, 18, 20, 21])),
    "classes": st.one_of(st.none(), st.integers(-3, 10**10), st.just(10)),
    "device": st.one_of(st.none(), st.sampled_from(["cpu", "auto", "cuda:7", "bogus"])),
})  # fmt: skip


@settings(
    max_examples=45,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(edits=_edits, cmd=st.sampled_from(["predict", "predict", "eval", "export"]), opts=_options)
def test_untrusted_checkpoint_and_options_give_a_result_or_one_line(
    tmp_path, capsys, base, image, edits, cmd, opts
) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        ckpt = copy.deepcopy(dict(base))
        for field, value in edits:
            _edit(ckpt, field, value, base["state_dict"])
        path = folder / "c.pt"
        torch.save(ckpt, path)
        (folder / "out").mkdir()
        (folder / "out" / f"m.{opts['format']}").write_bytes(b"previous export")
        before = snapshot(folder)
        rc, out, err = run_cli(capsys, *_command(cmd, opts, path, folder, image))
        if rc == 2:
            one_line_error(err, cmd)
            assert snapshot(folder) == before, "a refused command changed files"
            return
        assert rc == 0, (rc, err)
        if cmd == "export":
            written = folder / "out" / f"m.{opts['format']}"
            assert sorted(p.name for p in written.parent.iterdir()) == [written.name]  # no temporary file
            if opts["format"] == "pt2":
                with zipfile.ZipFile(written) as z:
                    assert any(n.endswith("/extra/mpvg_metadata.json") for n in z.namelist())
            else:
                import onnx

                assert any(p.key == "class_names" for p in onnx.load(str(written)).metadata_props)
        elif cmd == "predict":
            assert out.startswith(f"{image}: ")
        else:
            assert "top-1" in out
    finally:
        shutil.rmtree(folder, ignore_errors=True)
