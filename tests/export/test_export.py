"""Export tier: ONNX (standard operators, onnxruntime) and torch.export programs match the PyTorch model.

Small models (vit_digits) with random, non-trivial LayerNorm affine parameters, so that a wrong or stale PE term
shows in the logits. Every PE mode, two batch sizes, fp32: max |diff| <= 1e-4.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mpvg_kernels as mk
from mpvg_kernels import export as E
from mpvg_kernels.models import PE_MODES as MODES
from mpvg_kernels.models import create_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ATOL = 1e-4
BATCHES = (1, 5)  # neither is the export's example batch (2): the batch dimension must be dynamic


def _model(pe: str, pool: str = "avg", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_model("vit_digits", pe=pe, pool=pool)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:  # LayerNorm gammas/betas (token and PE norms), biases: away from 1 / 0
                p.add_(0.2 * torch.randn_like(p))
            if name == "pos_embed":
                p.normal_(0, 0.5)
    return m.eval()


def _inputs(b: int) -> torch.Tensor:
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(100 + b))


def _logits(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("pe", MODES)
def test_onnx_matches_pytorch(pe: str, tmp_path) -> None:
    m = _model(pe)
    path = E.export_onnx(m, tmp_path / f"{pe}.onnx")
    assert E.custom_domain_ops(path) == set()
    ops = E.onnx_op_types(path)
    assert "LayerNormalization" in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in BATCHES:
        x = _inputs(b)
        got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        ref = _logits(m, x)
        assert got.shape == ref.shape == (b, 10)
        assert (got - ref).abs().max().item() <= ATOL, (pe, b)


def test_onnx_pe_chain_is_frozen(tmp_path) -> None:
    """The cached path: no LN'(pos) in the graph, only one LayerNormalization per token norm (2 per block + last)."""
    m = _model("mpvg")
    path = E.export_onnx(m, tmp_path / "m.onnx")
    depth = len(m.blocks)
    assert E.onnx_op_types(path)["LayerNormalization"] == 2 * depth + 1
    graph = onnx.load(str(path)).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]


def test_onnx_reference_backend_is_standard_too(tmp_path) -> None:
    """With backend ``torch`` the reference math is traced: still standard operators, same logits."""
    m = _model("mpvg", seed=1)
    with mk.use_backend("torch"):
        path = E.export_onnx(m, tmp_path / "ref.onnx", opset=17)
    assert E.custom_domain_ops(path) == set()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _inputs(3)
    got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    assert (got - _logits(m, x)).abs().max().item() <= ATOL


def test_onnx_cls_pool(tmp_path) -> None:
    m = _model("lape", pool="cls")
    path = E.export_onnx(m, tmp_path / "cls.onnx")
    assert E.custom_domain_ops(path) == set()
    x = _inputs(4)
    assert E.max_abs_diff_onnx(m, path, x) <= ATOL


@pytest.mark.parametrize("pe", MODES)
def test_pt2_matches_pytorch(pe: str, tmp_path) -> None:
    m = _model(pe)
    path = E.export_pt2(m, tmp_path / f"{pe}.pt2")
    ep = E.load_pt2(path)
    if mk.ops.backends.resolve_backend(torch.device("cpu")) != "torch":
        # the fused kernels stay in the program as custom ops (the pooled last step always; LN1 + PE term in the
        # PE blocks)
        ops = E.graph_custom_ops(ep)
        assert "mpvg.layer_norm_pool.default" in ops
        if pe != "default":
            assert "mpvg.layer_norm_add.default" in ops
    mod = ep.module()
    for b in BATCHES:
        x = _inputs(b)
        with torch.no_grad():
            got = mod(x)
        assert (got - _logits(m, x)).abs().max().item() <= ATOL, (pe, b)


def test_frozen_model_is_a_snapshot() -> None:
    """The frozen copy keeps the values of export time; the original model is left as it was."""
    m = _model("mpvg")
    frozen = E.FrozenPEModel(m)
    x = _inputs(2)
    before = _logits(m, x)
    assert torch.allclose(_logits(frozen, x), before, atol=ATOL)
    assert "pe_terms" not in m.__dict__ and "forward" not in m.__dict__
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training


def test_export_cli(tmp_path, capsys) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    from mpvg_kernels.cli import export as export_cli

    export_cli.add_parser(sub)
    out = tmp_path / "cli.onnx"
    args = parser.parse_args(
        ["export", "--model", "vit_digits", "--pe", "mpvg", "--format", "onnx", "--out", str(out), "--verify"]
    )
    assert args.func(args) == 0
    assert out.is_file()
    err = capsys.readouterr().err
    assert "verified at batch 3" in err
    out2 = tmp_path / "cli.pt2"
    args = parser.parse_args(
        ["export", "--model", "vit_digits", "--pe", "pvg", "--format", "pt2", "--out", str(out2), "--verify"]
    )
    assert args.func(args) == 0
    assert out2.is_file()


def test_export_from_train_checkpoint(tmp_path) -> None:
    """A checkpoint in the `mpvg train` format: the model is rebuilt from its metadata, weights loaded."""
    from mpvg_kernels.errors import UserError
    from mpvg_kernels.train import checkpoint as C

    m = _model("mpvg", seed=3)
    meta = {"name": "vit_digits", "pe": "mpvg", "kwargs": {"pool": "avg"}, "num_classes": 10, "params": 0}
    payload = {"model": meta, "data": {}, "config": {}, "epoch": 1, "state_dict": m.state_dict(), "ema": None}
    ckpt = tmp_path / "ckpt.pt"
    C.save_checkpoint(ckpt, payload)
    loaded = E.load_model(None, None, ckpt)
    x = _inputs(2)
    assert torch.allclose(_logits(loaded, x), _logits(m, x), atol=1e-6)
    path = E.export_onnx(loaded, tmp_path / "ckpt.onnx")
    assert E.max_abs_diff_onnx(m, path, x) <= ATOL
    with pytest.raises(UserError, match="disagrees"):
        E.load_model("vit_digits", "pvg", ckpt)
    with pytest.raises(UserError, match="not found"):
        E.load_model("vit_digits", "mpvg", tmp_path / "missing.pt")


def test_export_from_plain_state_dict(tmp_path) -> None:
    """timm/DeiT-format weights (a bare state dict) need --model/--pe; a corrupt file is a clear error."""
    from mpvg_kernels.errors import UserError

    m = _model("pvg", seed=4)
    sd = tmp_path / "weights.pth"
    torch.save(m.state_dict(), sd)
    loaded = E.load_model("vit_digits", "pvg", sd, model_kwargs={"pool": "avg"})
    x = _inputs(2)
    assert torch.allclose(_logits(loaded, x), _logits(m, x), atol=1e-6)
    with pytest.raises(UserError, match="pass --model"):
        E.load_model(None, None, sd)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        E.load_model("vit_digits", "pvg", bad)


def test_export_model_one_call(tmp_path) -> None:
    """The library entry point of `mpvg export`: any format, optional backend and verification, no argparse."""
    from mpvg_kernels.errors import UserError

    m = _model("mpvg", seed=5)
    path, message, diff = E.export_model(m, tmp_path / "one.onnx", "onnx", opset=17, verify=True)
    assert path == tmp_path / "one.onnx" and path.is_file()
    assert diff is not None and diff <= ATOL
    assert message.startswith(f"wrote {path} (onnx, ") and "verified at batch 3" in message
    res = E.export_model(m, tmp_path / "ref.pt2", "pt2", backend="torch")
    assert res.path.is_file() and res.max_abs_diff is None and "backend torch" in res.message
    with pytest.raises(UserError, match="format must be one of onnx, pt2"):
        E.export_model(m, tmp_path / "x.bin", "tflite")


_REAL_FIND_SPEC = importlib.util.find_spec


def _patch_missing(monkeypatch, *missing: str) -> None:
    """``importlib.util.find_spec`` reports ``missing`` as not installed (replacing an earlier patch)."""
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in missing else _REAL_FIND_SPEC(name, *a, **k))


def test_export_onnx_names_the_missing_extra(tmp_path, monkeypatch, capsys) -> None:
    """Without onnx (or, for --verify, onnxruntime) `mpvg export --format onnx` names the extra before any work."""
    from mpvg_kernels import cli

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing package was reported")

    monkeypatch.setattr(E, "load_model", no_work)
    out = tmp_path / "m.onnx"
    base = ["export", "--model", "vit_digits", "--pe", "mpvg", "--format", "onnx", "--out", str(out)]
    for missing, extra_args, named in ((("onnx",), [], "onnx"), (("onnxruntime",), ["--verify"], "onnxruntime")):
        _patch_missing(monkeypatch, *missing)
        assert cli.main(base + extra_args) == 2
        err = capsys.readouterr().err
        assert f"mpvg export: error: this command needs {named}, which is not installed" in err
        assert 'pip install "mpvg-kernels[export]"' in err
    assert not out.exists()

    # onnxruntime is only needed to verify; pt2 needs neither: both get past the check to the model loading
    _patch_missing(monkeypatch, "onnx", "onnxruntime")
    with pytest.raises(AssertionError, match="model was loaded"):
        cli.main(base[:-3] + ["pt2", "--out", str(tmp_path / "m.pt2")])
    _patch_missing(monkeypatch, "onnxruntime")
    with pytest.raises(AssertionError, match="model was loaded"):
        cli.main(base)


def test_export_cli_model_arg(tmp_path, monkeypatch, capsys) -> None:
    """--model-arg is the shared KEY=VALUE syntax: it reaches create_model; a malformed item is a clear error."""
    from mpvg_kernels import cli

    seen = {}

    def fake_export(model, out, format, **kwargs):
        seen.update(model=model, format=format, **kwargs)
        return E.ExportResult(tmp_path / "x", "wrote nothing", None)

    monkeypatch.setattr(E, "export_model", fake_export)
    rc = cli.main(["export", "--model", "vit_digits", "--pe", "lape", "--model-arg", "pool=cls", "--model-arg",
                   "depth=2", "--num-classes", "3", "--format", "pt2", "--out", str(tmp_path / "x")])
    assert rc == 0 and "wrote nothing" in capsys.readouterr().err
    m = seen["model"]
    assert m.pool == "cls" and len(m.blocks) == 2 and m.head.out_features == 3 and not m.training
    assert seen["format"] == "pt2" and seen["backend"] is None and seen["verify"] is False
    rc = cli.main(["export", "--model", "vit_digits", "--model-arg", "pool", "--format", "pt2", "--out",
                   str(tmp_path / "x")])
    assert rc == 2 and "--model-arg expects KEY=VALUE" in capsys.readouterr().err
