"""Swin against timm's own SwinTransformer: the same parameter names (a timm state dict loads strictly, apart from
the added absolute PE), the same logits with that PE zero, the same per-stage intermediates (skipped where timm
cannot be imported)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip(
    "timm", reason="timm is not importable here; the timm tier runs in a venv with torch 2.14.1 + torchvision + timm"
)

from timm.models.swin_transformer import SwinTransformer as TimmSwin  # noqa: E402

from mpvg_kernels.models import create_model, load_pretrained  # noqa: E402
from mpvg_kernels.models.swin import SwinTransformer  # noqa: E402

# shifted windows in stages 0 and 1, a last stage whose window covers the map (timm then drops the shift)
SMALL = dict(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
             num_classes=7)


def _randomize_(model: torch.nn.Module) -> None:
    """Random values everywhere (timm's init leaves LayerNorms at 1/0 and biases at 0, which hides mix-ups)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.copy_(1.0 + 0.3 * r if p.ndim == 1 and name.endswith("weight") else 0.2 * r)


def _x(size: int, b: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("pos_embed", ["learn", "rpe"])
def test_timm_state_dict_loads_and_logits_match(pos_embed):
    theirs = TimmSwin(**SMALL, drop_path_rate=0.0).double().eval()
    _randomize_(theirs)
    ours = SwinTransformer(pe="default", pos_embed=pos_embed, **SMALL).double().eval()
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys == (["pos_embed"] if pos_embed == "learn" else [])
    if pos_embed == "learn":
        with torch.no_grad():
            ours.pos_embed.zero_()
    x = _x(64)
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert want.abs().max() > 0.1  # not a degenerate comparison
    with torch.no_grad():
        w_final, w_inter = theirs.forward_intermediates(x)
        g_final, g_inter = ours.forward_intermediates(x)
    assert [t.shape for t in g_inter] == [t.shape for t in w_inter] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    for a, b in zip(g_inter, w_inter, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g_final, w_final, atol=1e-12, rtol=1e-10)  # NHWC, after the last norm


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224"])
def test_registered_models_have_timms_names(name):
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        sd = timm.create_model(name, pretrained=False).state_dict()
        ours = {pe: create_model(name, pe=pe) for pe in ("default", "lape", "pvg", "mpvg")}
        ours_rpe = create_model(name, pe="default", pos_embed="rpe")
    assert {k: v.shape for k, v in ours_rpe.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    assert set(ours["default"].state_dict()) - set(sd) == {"pos_embed"}
    for pe in ("lape", "pvg", "mpvg"):  # the PE modes add only the absolute PE and the PE LayerNorms
        m = ours[pe]
        assert set(m.state_dict()) - set(sd) == {"pos_embed", *m.pe_norm_parameter_names()}
        assert set(sd) <= set(m.state_dict())


def test_swin_tiny_full_size_logits_match():
    theirs = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, drop_path_rate=0.0).eval()
    ours = create_model("swin_tiny_patch4_window7_224", pe="default", pos_embed="rpe").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = _x(224, b=1, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-4)


def test_load_pretrained_takes_a_timm_swin_state_dict():
    theirs = TimmSwin(**SMALL, drop_path_rate=0.0).eval()
    _randomize_(theirs)
    sd = theirs.state_dict()
    lape = SwinTransformer(pe="lape", pos_embed="rpe", **SMALL).eval()
    result = load_pretrained(lape, sd, strict=False)  # only the LayerNorms of the relative bias are new
    assert sorted(result.missing_keys) == sorted(lape.pe_norm_parameter_names()) and result.missing_keys
    # the absolute PE MPVG's Swin adds is not in a timm checkpoint: it starts at zero (and is reported), so the
    # default model computes exactly timm's logits through the supported loading path
    default = SwinTransformer(pe="default", **SMALL).eval()
    result = load_pretrained(default, sd, strict=True)
    assert result.missing_keys == ["pos_embed"] and default.pos_embed.eq(0).all()
    with torch.no_grad():
        torch.testing.assert_close(default(_x(64, dtype=torch.float32)), theirs(_x(64, dtype=torch.float32)),
                                   rtol=1e-4, atol=1e-4)
    mpvg = SwinTransformer(pe="mpvg", **SMALL)
    result = load_pretrained(mpvg, sd, strict=False)
    assert sorted(result.missing_keys) == sorted(["pos_embed", *mpvg.pe_norm_parameter_names()])
    # with LaPE's norms at identity the relative bias is normalised, so the logits move: LaPE is a new model
    x = _x(64, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(lape(x), theirs(x), atol=1e-3)
