"""`mpvg analyze`: the numbers against hand-computed values and an independent recomputation, every file written,
and the refusal of a figure that does not apply (the token/PE correlation of a `default` model).

Models trained here use the real trainer for a few epochs on the bundled digits with one intra-op thread (on the
shared 2-core machine that is the fastest setting for these small models).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpvg_kernels import analysis as A
from mpvg_kernels import cli
from mpvg_kernels.errors import UserError
from mpvg_kernels.train.checkpoint import load_checkpoint, model_from_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mpvg(argv: list[str]) -> int:
    """`mpvg ARGV` through the real CLI when analyze is registered there, else through the same parser layout."""
    if "mpvg_kernels.cli.analyze" in getattr(cli, "COMMANDS", []):
        return cli.main(argv)
    parser = argparse.ArgumentParser(prog="mpvg")
    from mpvg_kernels.cli import analyze as analyze_cli

    analyze_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:  # what cli.main does
        import sys

        print(f"mpvg {args.command}: error: {e}", file=sys.stderr)
        return 2


def _assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300, (path, img.shape)
    assert float(img[..., :3].std()) > 0.05, f"{path} looks blank"


# ----------------------------------------------------------------------------------------------------------------
# the numeric functions, by hand


def test_correlation_hand_values() -> None:
    y = torch.arange(1.0, 9.0).reshape(4, 2)  # PE: 1..8
    x = torch.tensor([2.0, 1, 4, 3, 6, 5, 8, 7]).reshape(4, 2)  # neighbours swapped
    # centred: dy = -3.5..3.5 (sum of squares 42); dx . dy = 38 -> r = 38 / 42 = 19 / 21
    tokens = torch.stack([x, x + 10.0, -3.0 * y + 1.0, 2.5 * y])
    r = A.token_pe_correlation(tokens, y)
    assert r.dtype == torch.float64
    torch.testing.assert_close(r, torch.tensor([19 / 21, 19 / 21, -1.0, 1.0], dtype=torch.float64))
    assert math.isnan(float(A.token_pe_correlation(torch.ones(1, 4, 2), y)[0]))  # constant image: undefined
    with pytest.raises(ValueError, match=r"\[2, 4, 3\].*\[4, 2\]"):
        A.token_pe_correlation(torch.zeros(2, 4, 3), y)


def test_correlation_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(16, 8, generator=g)
    tokens = 0.7 * pe - 0.2 + torch.randn(5, 16, 8, generator=g)
    want = [np.corrcoef(tokens[b].numpy().ravel(), pe.numpy().ravel())[0, 1] for b in range(5)]
    np.testing.assert_allclose(A.token_pe_correlation(tokens, pe).numpy(), want, rtol=1e-10, atol=1e-12)


def test_position_correlation_by_hand() -> None:
    pe = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])  # a 2x2 grid
    m = A.position_correlation_map(pe, (2, 2), ref_token=0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0], [s, -1.0]], dtype=torch.float64))
    # pairs (0,1) 0, (0,2) s, (0,3) -1, (1,2) s, (1,3) 0, (2,3) -s: mean (s - 1) / 6
    assert A.mean_pairwise_cosine(pe) == pytest.approx((s - 1) / 6, abs=1e-12)
    with pytest.raises(ValueError, match="outside"):
        A.position_correlation_map(pe, (2, 2), ref_token=4)
    with pytest.raises(ValueError, match="grid 3x3"):
        A.position_correlation_map(pe, (3, 3), ref_token=0)


def test_vector_stats_and_layer_choice() -> None:
    st = A.vector_stats(torch.tensor([1.0, -1.0, 3.0, -3.0]))
    assert st["mean"] == 0 and st["var"] == pytest.approx(5.0) and st["std"] == pytest.approx(math.sqrt(5.0))
    assert (st["min"], st["max"], st["abs_max"]) == (-3.0, 3.0, 3.0)
    assert A.default_layers(4) == [0, 1, 2, 3]
    assert A.default_layers(12)[-1] == 11 and len(A.default_layers(12)) == 5
    assert A.default_ref_token((4, 4)) == 10 and A.default_ref_token((14, 14)) == 105


# ----------------------------------------------------------------------------------------------------------------
# a hand-built model whose PE terms and token terms are known


class _Grid:
    grid_size = (2, 2)


class _Blk(nn.Module):
    def __init__(self, use_pos: bool) -> None:
        super().__init__()
        self.use_pos = use_pos


class _Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([2.0, 4.0]))
        self.bias = nn.Parameter(torch.tensor([1.0, -1.0]))
        self.pos_weight = nn.Parameter(torch.ones(2))
        self.pos_bias = nn.Parameter(torch.zeros(2))


class KnownPEModel(nn.Module):
    """3 blocks on a 2x2 grid, D = 2. Block 0: no PE (as pvg); block 1: PE = 1..8, tokens = that PE with neighbours
    swapped plus an image-dependent shift (r = 19/21 for every image); block 2: tokens = -3 PE + shift (r = -1);
    last step: LN(x) = (b + 1) * PE_last (r = +1). One class token (num_prefix_tokens=1) whose rows must be dropped.
    """

    pe = "mpvg"
    pool = "avg"
    num_prefix_tokens = 1

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Blk(False), _Blk(True), _Blk(True)])
        self.norm = _Norm()
        self.patch_embed = _Grid()
        pos = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])  # class row first
        self.pos_embed = nn.Parameter(pos[None])
        self.pe1 = torch.arange(1.0, 9.0).reshape(4, 2)
        self.pe2 = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 3.0], [-2.0, 1.0]])
        self.last = torch.tensor([[1.0, 2.0], [-1.0, 0.0], [3.0, -2.0], [0.0, 1.0]])

    def forward_analysis(self, x: torch.Tensor) -> dict:
        b = x.shape[0]
        shift = x.reshape(b, 1, 1)  # the "image" is a scalar per sample
        cls_row = torch.full((b, 1, 2), 100.0)  # must not enter any number

        def with_cls(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([cls_row, t], dim=1)

        def term(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.full((1, 2), -50.0), t])[None]

        swapped = torch.tensor([2.0, 1, 4, 3, 6, 5, 8, 7]).reshape(4, 2)
        tokens = [with_cls(torch.randn(b, 4, 2)), with_cls(swapped + shift), with_cls(-3.0 * self.pe2 + shift)]
        last_norm = with_cls((shift + 1.0) * self.last)
        last_in = with_cls(torch.arange(8.0).reshape(1, 4, 2) * (shift + 1.0))
        return {
            "token_terms": tokens,
            "pos_terms": [None, term(self.pe1), term(self.pe2)],
            "last_norm_input": last_in,
            "last_norm_output": last_norm,
            "last_pos_term": term(self.last),
            "num_prefix_tokens": 1,
        }


def test_known_pe_model_numbers(tmp_path: Path) -> None:
    model = KnownPEModel()
    spec = A.describe_model(model, "known")
    assert spec.has_pe_stream and spec.grid == (2, 2) and spec.depth == 3 and spec.num_prefix_tokens == 1
    images = torch.arange(6.0)
    a = A.analyze_model(model, spec, images, batch_size=4, ref_token=0)  # two chunks: 4 + 2 images
    doc = A.write_outputs([a], tmp_path, A.FIGURES)
    m = json.loads((tmp_path / "analysis.json").read_text())["models"]["known"]
    c = m["correlation"]
    assert c["layers"] == [0, 1, 2] and c["mean"][0] is None and c["std"][0] is None
    assert c["mean"][1] == pytest.approx(19 / 21, abs=1e-12) and c["std"][1] == pytest.approx(0.0, abs=1e-12)
    assert c["mean"][2] == pytest.approx(-1.0, abs=1e-12)
    assert c["last_ln"]["mean"] == pytest.approx(1.0, abs=1e-12)
    ln = m["last_ln"]
    assert ln["beta"]["var"] == pytest.approx(1.0) and ln["beta_var"] == pytest.approx(1.0)
    assert ln["gamma"]["mean"] == pytest.approx(3.0) and ln["gamma"]["var"] == pytest.approx(1.0)
    assert ln["pe_bias_c"] == pytest.approx([0.75, 0.25])  # column means of model.last
    assert ln["pe_bias_c_stats"]["norm"] == pytest.approx(math.hypot(0.75, 0.25))
    assert ln["pooled_bias_beta_plus_c"]["mean"] == pytest.approx(0.5)  # beta + c = (1.75, -0.75)
    assert ln["pooled_bias_beta_plus_c"]["var"] == pytest.approx(1.25**2)
    # token average before: mean over images of (b+1) x arange -> (3.5)(3, 4); after: 3.5 * mean(last) + c = 4.5 c
    assert ln["cosine_token_average_before_after"] == pytest.approx(
        float(F.cosine_similarity(torch.tensor([3.0, 4.0]), torch.tensor([0.75, 0.25]), dim=0)), abs=1e-6
    )
    # without the PE term the after-average is 3.5 * c: the same direction here
    assert ln["cosine_token_average_before_after_without_pe"] == pytest.approx(
        ln["cosine_token_average_before_after"], abs=1e-9)
    pm = m["pos_maps"]
    assert pm["terms"] == ["input pos_embed", "block 1", "block 2", "last LN"]
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(pm["maps"]["input pos_embed"], [[1.0, 0.0], [s, -1.0]], atol=1e-12)
    assert pm["mean_cosine"]["input pos_embed"] == pytest.approx((s - 1) / 6)
    assert pm["ref_row_col"] == [0, 0] and pm["grid"] == [2, 2]
    assert set(doc["files"]) == {"correlation.png", "correlation.md", "known/heatmaps.png",
                                 "known/last_ln_heatmaps.png", "known/last_ln_params.png", "known/pos_maps.png",
                                 "analysis.json"}
    for f in doc["files"]:
        assert (tmp_path / f).is_file(), f
    table = (tmp_path / "correlation.md").read_text()
    assert "| 1 | +0.9048 ± 0.0000 |" in table and "| 0 | n/a |" in table and "| last LN | +1.0000" in table


def test_applicability_rules() -> None:
    model = KnownPEModel()
    spec = A.describe_model(model, "m")
    default = A.ModelSpec("d", "default", "cls", 3, 2, (2, 2), 1, False, spec.pos_embed, spec.last_ln_weight,
                          spec.last_ln_bias, source="ckpt/default.pt")
    assert A.figure_applies("correlation", spec) is None
    assert "no per-layer PE stream" in A.figure_applies("correlation", default)
    for fig in ("heatmaps", "last-ln", "pos-maps"):
        assert A.figure_applies(fig, default) is None
    # explicit and applying to none of the models: refused, naming the model, its mode and the reason
    with pytest.raises(A.NotApplicableError, match=r"'correlation' does not apply.*ckpt/default.pt.*pe='default'"):
        A.check_applicable(["correlation"], [default], explicit=True)
    # not explicit (all figures) or applying to another model: skipped for the default model with the reason
    assert "correlation" in A.check_applicable(list(A.FIGURES), [default], explicit=False)["d"]
    sk = A.check_applicable(["correlation"], [default, spec], explicit=True)
    assert sk["m"] == {} and "no per-layer PE stream" in sk["d"]["correlation"]


# ----------------------------------------------------------------------------------------------------------------
# models trained here with the real trainer, analysed through the CLI


def _train(out: Path, pe: str, epochs: int) -> Path:
    rc = cli.main(["train", "--pe", pe, "--epochs", str(epochs), "--warmup-epochs", str(min(1, epochs - 1)),
                   "--batch-size", "64", "--out", str(out),
                   "--no-progress", "--threads", "1"])
    assert rc == 0
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analyze-runs")
    ckpts = {pe: _train(root / pe, pe, 5) for pe in ("mpvg", "pvg")}
    ckpts["default"] = _train(root / "default", "default", 1)
    for pe in ("mpvg", "pvg"):
        top1 = json.loads((root / pe / "summary.json").read_text())["top1"]
        assert top1 >= 50.0, f"{pe} did not learn the digits in 5 epochs: top-1 {top1}"
    return ckpts


@torch.no_grad()
def _independent(model: nn.Module, images: torch.Tensor, ref: int) -> dict:
    """The measurements redone from scratch: block inputs captured by hooks on the ordinary (cached, fused) forward,
    the PE chain and LayerNorms recomputed with F.layer_norm, Pearson and cosine in numpy."""
    xs: list[torch.Tensor] = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().clone())) for blk in model.blocks]
    hooks.append(model.blocks[-1].register_forward_hook(lambda m, a, o: xs.append(o[0].detach().clone())))
    model.eval()
    model(images)
    for h in hooks:
        h.remove()
    d, eps, p = model.embed_dim, model.norm_eps, model.num_prefix_tokens
    pos = model.pos_embed[0]
    terms, cur = [], pos
    for blk in model.blocks:
        if blk.use_pos:
            cur = F.layer_norm(cur, (d,), blk.norm1.pos_weight, blk.norm1.pos_bias, eps)
            terms.append(cur)
        else:
            terms.append(None)

    def pearson(tok: torch.Tensor, pe: torch.Tensor) -> np.ndarray:
        return np.array([np.corrcoef(t.double().numpy().ravel(), pe.double().numpy().ravel())[0, 1] for t in tok])

    corr = []
    for blk, x, t in zip(model.blocks, xs, terms, strict=False):
        if t is None:
            corr.append(None)
            continue
        tok = F.layer_norm(x, (d,), blk.norm1.weight, blk.norm1.bias, eps)[:, p:]
        corr.append(pearson(tok, t[p:]))
    n = model.norm
    out = {"corr": corr, "last": None, "c": None, "beta": n.bias.double().numpy(), "gamma": n.weight.double().numpy()}
    if n.use_pos:
        last_term = F.layer_norm(pos, (d,), n.pos_weight, n.pos_bias, eps)[p:]
        out["last"] = pearson(F.layer_norm(xs[-1], (d,), n.weight, n.bias, eps)[:, p:], last_term)
        out["c"] = last_term.double().mean(0).numpy()
    pe_rows = [pos[p:]] + [t[p:] for t in terms if t is not None]
    if n.use_pos:
        pe_rows.append(F.layer_norm(pos, (d,), n.pos_weight, n.pos_bias, eps)[p:])
    unit = [r.double().numpy() / np.linalg.norm(r.double().numpy(), axis=1, keepdims=True) for r in pe_rows]
    out["maps"] = [u @ u[ref] for u in unit]
    return out


def test_trained_models_match_independent_computation(trained: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    rc = _mpvg(["analyze", "--checkpoint", str(trained["mpvg"]), str(trained["pvg"]), str(trained["default"]),
                "--num-images", "48", "--batch-size", "20", "--out", str(out), "--threads", "1"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "note: default: skipping 'correlation'" in captured.err and "no per-layer PE stream" in captured.err
    assert "| block | mpvg (mpvg) | pvg (pvg) |" in captured.out
    doc = json.loads((out / "analysis.json").read_text())
    assert list(doc["models"]) == ["mpvg", "pvg", "default"] and doc["num_images"] == [48]
    for f in doc["files"]:
        assert (out / f).is_file(), f
        if f.endswith(".png"):
            _assert_png(out / f)
    expect = {"correlation.png", "correlation.md", "analysis.json"} | {
        f"{m}/{n}.png" for m in ("mpvg", "pvg", "default") for n in ("heatmaps", "last_ln_heatmaps",
                                                                     "last_ln_params", "pos_maps")}
    assert set(doc["files"]) == expect

    ckpt_images = A.load_eval_images("digits", 1, (16, 16), load_checkpoint(trained["mpvg"])["data"]["mean"],
                                     load_checkpoint(trained["mpvg"])["data"]["std"], 1.0, 48)
    for name in ("mpvg", "pvg", "default"):
        m = doc["models"][name]
        model = model_from_checkpoint(load_checkpoint(trained[name]))
        ref = m["pos_maps"]["ref_token"]
        ind = _independent(model, ckpt_images, ref)
        assert m["pe"] == name and m["num_images"] == 48 and m["grid"] == [4, 4]
        if name == "default":
            assert "correlation" not in m and "no per-layer PE stream" in m["skipped"]["correlation"]
        else:
            c = m["correlation"]
            assert c["mean"][0] is None  # pvg/mpvg: block 0 takes no PE term
            for l in range(1, 4):
                assert c["mean"][l] == pytest.approx(ind["corr"][l].mean(), abs=2e-5), (name, l)
                assert c["std"][l] == pytest.approx(ind["corr"][l].std(), abs=2e-5), (name, l)
        ln = m["last_ln"]
        assert ln["beta_var"] == pytest.approx(np.var(ind["beta"]), rel=1e-6, abs=1e-12)
        assert ln["gamma"]["mean"] == pytest.approx(ind["gamma"].mean(), rel=1e-6)
        if name == "mpvg":
            assert m["correlation"]["last_ln"]["mean"] == pytest.approx(ind["last"].mean(), abs=2e-5)
            np.testing.assert_allclose(ln["pe_bias_c"], ind["c"], atol=1e-5)
            # c is the PE part of the model's own cached pooled bias (bias + c)
            with torch.inference_mode():
                state = model.pe_terms()
            if state is not None and state.pooled_bias is not None:
                c_model = (state.pooled_bias - model.norm.bias).detach().numpy()
                np.testing.assert_allclose(ln["pe_bias_c"], c_model, atol=1e-5)
        else:
            assert ln["pe_bias_c"] is None
            if name == "pvg":
                assert m["correlation"]["last_ln"]["mean"] is None
        maps = [np.array(v) for v in m["pos_maps"]["maps"].values()]
        assert len(maps) == len(ind["maps"])
        for got, want in zip(maps, ind["maps"], strict=True):
            np.testing.assert_allclose(got.ravel(), want, atol=1e-6)


def test_default_checkpoint_correlation_is_refused(trained: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "refused"
    rc = _mpvg(["analyze", "--checkpoint", str(trained["default"]), "--figures", "correlation", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "mpvg analyze: error: figure 'correlation' does not apply" in err
    assert "pe='default' has no per-layer PE stream" in err and str(trained["default"]) in err
    assert not out.exists()  # refused before any work

    # the figures that do apply are still available for the same checkpoint
    rc = _mpvg(["analyze", "--checkpoint", str(trained["default"]), "--figures", "last-ln,pos-maps",
                "--num-images", "8", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["files"] == ["default/last_ln_heatmaps.png", "default/last_ln_params.png", "default/pos_maps.png",
                            "analysis.json"]
    assert doc["models"]["default"]["pos_maps"]["terms"] == ["input pos_embed"]


def test_fresh_models_and_class_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--model/--pe: fresh models; lape pools the class token, whose rows must be dropped everywhere."""
    out = tmp_path / "fresh"
    rc = _mpvg(["analyze", "--model", "vit_digits", "--pe", "lape", "mpvg", "--num-images", "16", "--layers", "0,3",
                "--ref-token", "5", "--figures", "correlation,heatmaps,pos-maps", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "analysis.json").read_text())
    lape = doc["models"]["lape"]
    assert lape["pool"] == "cls" and lape["num_prefix_tokens"] == 1 and lape["heatmaps"]["layers"] == [0, 3]
    assert all(v is not None for v in lape["correlation"]["mean"])  # lape adds a PE term at every block
    assert lape["pos_maps"]["ref_row_col"] == [1, 1]
    assert lape["pos_maps"]["terms"] == ["input pos_embed", "block 0", "block 1", "block 2", "block 3"]
    from mpvg_kernels.models import create_model

    torch.manual_seed(0)  # the CLI's --seed default, set before each fresh model
    model = create_model("vit_digits", pe="lape", num_classes=10)
    cfg = model.default_cfg
    images = A.load_eval_images("digits", 1, cfg["input_size"][1:], cfg["mean"], cfg["std"], 1.0, 16)
    ind = _independent(model, images, 5)
    for l in range(4):
        assert lape["correlation"]["mean"][l] == pytest.approx(ind["corr"][l].mean(), abs=2e-5)
    for got, want in zip(lape["pos_maps"]["maps"].values(), ind["maps"], strict=True):
        np.testing.assert_allclose(np.array(got).ravel(), want, atol=1e-6)
    assert "last_ln" not in lape  # not requested
    for f in doc["files"]:
        if f.endswith(".png"):
            _assert_png(out / f)

    # bad requests: clear errors, exit status 2
    for argv, msg in (
        (["--figures", "correlation,nope"], "unknown figure"),
        (["--layers", "7"], "--layers [7] outside 0..3"),
        (["--ref-token", "16"], "--ref-token 16 outside 0..15"),
        (["--label", "a"], "--label got 1 names for 2 models"),
    ):
        rc = _mpvg(["analyze", "--model", "vit_digits", "--pe", "pvg", "mpvg", "--num-images", "4",
                    "--out", str(tmp_path / "bad"), *argv])
        assert rc == 2, argv
        assert msg in capsys.readouterr().err, argv


def test_run_analysis_takes_keyword_options(tmp_path: Path) -> None:
    """The library entry point: every option a keyword (no argparse Namespace), notes through a callback."""
    import inspect

    params = inspect.signature(A.run_analysis).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    with pytest.raises(TypeError):
        A.run_analysis(argparse.Namespace(out=str(tmp_path / "ns")))  # type: ignore[misc]

    notes: list[str] = []
    report = A.run_analysis(out=tmp_path / "kw", model="vit_digits", pe=["default", "mpvg"], labels=["d", "m"],
                            num_images=6, batch_size=4, figures=None, layers=[1, 2], ref_token=0, seed=0,
                            device="auto", threads=1, on_note=notes.append)
    assert isinstance(report, A.AnalysisReport) and report.out == tmp_path / "kw"
    assert [a.spec.label for a in report.analyses] == ["d", "m"] and report.analyses[1].spec.pe == "mpvg"
    assert len(notes) == 1 and notes[0].startswith("d: skipping 'correlation'") and "no per-layer PE" in notes[0]
    assert "correlation" in report.skipped["d"] and report.skipped["m"] == {}
    doc = json.loads((tmp_path / "kw" / "analysis.json").read_text())
    assert doc["files"] == report.doc["files"] and list(doc["models"]) == list(report.doc["models"]) == ["d", "m"]
    assert doc["num_images"] == [6] and doc["models"]["m"]["heatmaps"]["layers"] == [1, 2]
    assert doc["models"]["m"]["pos_maps"]["ref_token"] == 0
    for f in doc["files"]:
        assert (tmp_path / "kw" / f).is_file(), f

    # mistakes are UserErrors raised before any output is written
    for kwargs, msg in (
        ({"model": "vit_digits", "figures": ["nope"]}, "unknown figure"),
        ({"model": "vit_digits", "checkpoints": ["x.pt"]}, "not both"),
        ({}, "either checkpoints"),
        ({"checkpoints": ["x.pt"], "model_kwargs": {"depth": 2}}, "--model-arg applies to a fresh --model"),
        ({"model": "vit_digits", "batch_size": 0}, "--batch-size must be >= 1"),
    ):
        with pytest.raises(UserError, match=msg):
            A.run_analysis(out=tmp_path / "bad", num_images=2, **kwargs)
    assert not (tmp_path / "bad").exists()


def test_model_arg_reaches_fresh_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--model-arg KEY=VALUE` (the shared create_model syntax) builds the fresh models with those keywords."""
    out = tmp_path / "margs"
    rc = _mpvg(["analyze", "--model", "vit_digits", "--pe", "pvg", "mpvg", "--model-arg", "depth=2",
                "--model-arg", "pool=cls", "--num-images", "4", "--figures", "correlation,last-ln",
                "--device", "cpu", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "analysis.json").read_text())
    for pe in ("pvg", "mpvg"):
        m = doc["models"][pe]
        assert m["depth"] == 2 and m["pool"] == "cls" and m["num_prefix_tokens"] == 1, m
        assert m["correlation"]["layers"] == [0, 1]
    assert doc["models"]["mpvg"]["last_ln"]["pe_bias_c"] is None  # class-token pooling: no pooled PE bias
    capsys.readouterr()

    for argv, msg in (
        (["--model", "vit_digits", "--model-arg", "depth"], "--model-arg expects KEY=VALUE"),
        (["--model", "vit_digits", "--model-arg", "no_such_option=1"], "cannot build model 'vit_digits'"),
        (["--checkpoint", str(tmp_path / "x.pt"), "--model-arg", "depth=2"], "--model-arg applies to a fresh"),
    ):
        rc = _mpvg(["analyze", *argv, "--num-images", "2", "--out", str(tmp_path / "bad")])
        assert rc == 2, argv
        assert msg in capsys.readouterr().err, argv
