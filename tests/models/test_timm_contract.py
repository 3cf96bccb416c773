"""timm's model contract and the GAP placements on the project's model, without timm (the real timm is in
tests/timm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mpvg_kernels.models import VisionTransformer, feature_take_indices

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def _x(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _model(pe: str, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    m = VisionTransformer(pe=pe, **{**SMALL, **kw})
    with torch.no_grad():  # non-trivial PE LayerNorms and biases
        for n, p in m.named_parameters():
            if n.endswith(("pos_weight", "pos_bias", "norm.bias", "fc_norm.bias")):
                p.normal_()
    return m


@pytest.mark.parametrize("pe", ["default", "mpvg"])
@pytest.mark.parametrize("class_token", [False, True])
def test_fc_norm_after_pooling(pe, class_token):
    m = _model(pe, pool="avg", fc_norm=True, class_token=class_token)
    keys = set(m.state_dict())
    assert "fc_norm.weight" in keys and not any(k.startswith("norm.") for k in keys)
    x = _x()
    feats = m.forward_features(x)  # not normalised (timm's fc_norm models)
    npt = int(class_token)
    pooled = F.layer_norm(feats[:, npt:].mean(1), (32,), m.fc_norm.weight, m.fc_norm.bias, 1e-6)
    if pe == "mpvg":
        term = F.layer_norm(m.pos_embed, (32,), m.fc_norm.pos_weight, m.fc_norm.pos_bias, 1e-6)
        pooled = pooled + term[:, npt:].mean(1)
    torch.testing.assert_close(m.forward_pooled(x), pooled)
    torch.testing.assert_close(m.forward_head(feats), m(x))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), m.head(pooled), atol=1e-6, rtol=1e-5)  # cached path


@pytest.mark.parametrize("pe", ["default", "mpvg"])
def test_class_token_with_average_pooling(pe):
    m = _model(pe, pool="avg", class_token=True)
    assert m.num_prefix_tokens == 1 and m.pos_embed.shape[1] == 17
    x = _x()
    feats = m.forward_features(x)
    want = m.head(feats[:, 1:].mean(1))  # the class token is left out of the mean
    torch.testing.assert_close(m(x), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.forward_head(feats), want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), want, atol=1e-6, rtol=1e-5)  # cached pooled bias over patch rows


def test_option_errors():
    with pytest.raises(ValueError, match="needs the class token"):
        VisionTransformer(pe="default", pool="cls", class_token=False, **SMALL)
    with pytest.raises(ValueError, match="fc_norm=True"):
        VisionTransformer(pe="default", pool="cls", fc_norm=True, **SMALL)


def test_feature_take_indices():
    assert feature_take_indices(4) == ([0, 1, 2, 3], 3)
    assert feature_take_indices(4, 2) == ([2, 3], 3)
    assert feature_take_indices(4, [0, -2]) == ([0, 2], 2)
    with pytest.raises(ValueError):
        feature_take_indices(4, 5)
    with pytest.raises(ValueError):
        feature_take_indices(4, [4])


@pytest.mark.parametrize("pe", ["default", "lape", "mpvg"])
def test_forward_intermediates_contract(pe):
    m = _model(pe).eval()
    x = _x()
    npt = m.num_prefix_tokens
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert len(inter) == 3 and all(t.shape == (2, 32, 4, 4) for t in inter)
        torch.testing.assert_close(final, m.forward_features(x))
        nlc = m.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(nlc[0], final[:, npt:])  # last block + norm (with LN'_last) = features
        early = m.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[0])
        early_norm = m.forward_intermediates(x, indices=[0], stop_early=True, norm=True, output_fmt="NLC")
        full_norm = m.forward_intermediates(x, indices=[0], norm=True, output_fmt="NLC")
        torch.testing.assert_close(early_norm[1][0], full_norm[1][0])
        pairs = m.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
        if npt:
            assert pairs[0][1].shape == (2, 1, 32)
        d = m.forward_intermediates(x, indices=1, output_dict=True)
        assert set(d) == {"image_intermediates", "image_features"}
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_prune_and_feature_info():
    m = _model("mpvg")
    assert [f["module"] for f in m.feature_info] == ["blocks.0", "blocks.1", "blocks.2"]
    assert m.prune_intermediate_layers([0, 1], prune_norm=True) == [0, 1]
    assert len(m.blocks) == 2 and len(m.feature_info) == 2 and m.num_classes == 0 and m.last_norm is None
    out = m.forward_intermediates(_x(), indices=[0, 1], intermediates_only=True)
    assert [t.shape for t in out] == [(2, 32, 4, 4)] * 2
    k = _model("mpvg", last_pos=2)
    with pytest.raises(ValueError, match="prune_norm=True"):
        k.prune_intermediate_layers([1])


@pytest.mark.parametrize("pool", ["cls", "avg", "seq"])
@pytest.mark.parametrize("pe", ["default", "mpvg"])
def test_pruned_norm_pools_the_tokens_as_they_are(pe, pool):
    """After prune_norm=True a model still runs: forward and forward_intermediates pool / return the unnormalised
    tokens (timm's pruned models do the same)."""
    m = _model(pe, pool=pool, class_token=pool == "cls").eval()
    take = m.prune_intermediate_layers([1], prune_norm=True, prune_head=False)
    x = _x()
    with torch.no_grad():
        feats = m.forward_features(x)
        final, inter = m.forward_intermediates(x, indices=take)
        torch.testing.assert_close(final, feats, rtol=0, atol=0)
        torch.testing.assert_close(m(x), m.forward_head(feats))
        torch.testing.assert_close(m.forward_pooled(x), m.forward_head(feats, pre_logits=True))


def test_unsupported_pooling_is_a_value_and_an_assertion_error():
    """timm's models assert on a pooling they cannot do, and timm's helpers catch AssertionError; ours raise an
    error that is both (and a ValueError as every bad argument)."""
    from mpvg_kernels.errors import UnsupportedPoolError
    from mpvg_kernels.models.swin import SwinTransformer

    assert issubclass(UnsupportedPoolError, ValueError) and issubclass(UnsupportedPoolError, AssertionError)
    swin = SwinTransformer(img_size=32, patch_size=2, embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4)
    for model in (_model("mpvg"), _model("default", class_token=False, pool="avg"), swin):
        with pytest.raises(AssertionError, match="catavgmax"):
            model.reset_classifier(7, "catavgmax")
    with pytest.raises(UnsupportedPoolError, match="needs a class token"):
        _model("mpvg", class_token=False, pool="avg").reset_classifier(7, "token")


def test_average_pooling_replaces_sequence_pooling():
    """reset_classifier(n, 'avg') on a sequence-pooled model (CCT/CVT): the attention pool goes, the patch mean
    stays (as timm drops an attention pool for 'avg')."""
    m = _model("mpvg", pool="seq", class_token=False)
    m.reset_classifier(3, "avg")
    assert m.attention_pool is None and m.pool == "avg" and "attention_pool.weight" not in m.state_dict()
    x = _x()
    torch.testing.assert_close(m.forward_head(m.forward_features(x), pre_logits=True), m.forward_pooled(x))


def _registered_tiny(name: str, pe: str, device: str | None = None):
    from mpvg_kernels.models import create_model

    if device is None:
        return create_model(name, pe=pe, tiny=True)
    with torch.device(device):
        return create_model(name, pe=pe, tiny=True)


@pytest.mark.parametrize("pe", ["default", "mpvg"])
def test_init_weights_after_to_empty(pe):
    """A model built on the meta device, moved with to_empty (garbage, here NaN) and init_weights(): every parameter
    and buffer has a value, the computed buffers (fixed PE, random features, masks, indices) those of a model built
    normally, for one model of every family."""
    from mpvg_kernels.models import list_models

    names = {n.split("_")[0]: n for n in sorted(list_models(), reverse=True)}.values()
    for name in names:
        ref = _registered_tiny(name, pe)
        m = _registered_tiny(name, pe, "meta").to_empty(device="cpu")
        with torch.no_grad():
            for t in [*m.parameters(), *m.buffers()]:
                t.fill_(float("nan") if t.is_floating_point() else 10**6)
        m.init_weights()
        unset = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_floating_point()
                 and not torch.isfinite(t).all()]
        assert not unset, (name, unset)
        own = dict(ref.named_buffers())
        assert [n for n, t in m.named_buffers() if not torch.equal(t, own[n])] == [], name
        x = torch.randn(2, *ref.default_cfg["input_size"])
        assert torch.isfinite(m.eval()(x)).all()


@pytest.mark.parametrize("prune_head", [True, False])
def test_prune_head_drops_sequence_pooling(prune_head):
    m = _model("mpvg", pool="seq", class_token=False)
    assert m.attention_pool is not None
    m.prune_intermediate_layers([1], prune_head=prune_head)
    if prune_head:  # no head left: the pooling weights go with it, the pooled features are the token mean
        assert m.attention_pool is None and m.pool == "avg" and "attention_pool.weight" not in m.state_dict()
        feats = m.forward_features(_x())
        torch.testing.assert_close(m(_x()), m.forward_pooled(_x()))
        assert m(_x()).shape == (2, 32) and feats.shape == (2, 16, 32)
    else:
        assert m.attention_pool is not None and m.pool == "seq"


def test_group_matcher_and_classifier():
    m = _model("mpvg")
    gm = m.group_matcher()
    assert gm["stem"].startswith("^cls_token") and gm["blocks"][0][0] == r"^blocks\.(\d+)"
    m.reset_classifier(7, global_pool="avg")
    assert m(_x()).shape == (2, 7) and m.get_classifier().out_features == 7
    with pytest.raises(ValueError, match="class token"):
        m.reset_classifier(7, global_pool="token")
    d = _model("default")
    d.reset_classifier(3, global_pool="avg")  # the class token stays, the mean leaves it out
    assert d.pool == "avg" and d.has_class_token
    feats = d.forward_features(_x())
    torch.testing.assert_close(d(_x()), d.head(feats[:, 1:].mean(1)), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="global_pool"):
        d.reset_classifier(3, global_pool="map")


def test_forward_analysis_refuses_fc_norm():
    with pytest.raises(ValueError, match="fc_norm"):
        _model("default", pool="avg", fc_norm=True).forward_analysis(_x())


@pytest.mark.parametrize(
    "name", ["deit_tiny_distilled_patch16_224", "cct_7_3x1_32", "swin_tiny_patch4_window7_224", "ceit_tiny_patch16_224"]
)
def test_head_hidden_size(name):
    from mpvg_kernels.models import create_model

    m = create_model(name, pe="mpvg", tiny=True).eval()
    x = torch.randn(1, *m.default_cfg["input_size"])
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape[-1] == m.head_hidden_size > 0


def test_no_weight_decay_names_only_parameters():
    """timm's contract: each no_weight_decay() entry is a parameter (a fixed sin-cos table is a buffer)."""
    assert "pos_embed" in _model("mpvg").no_weight_decay()
    m = _model("mpvg", pos_embed="sincos2d")
    assert "pos_embed" not in m.no_weight_decay() and "pos_embed" in dict(m.named_buffers())


@pytest.mark.parametrize(
    "name", ["deit_tiny_distilled_patch16_224", "cct_7_3x1_32", "swin_tiny_patch4_window7_224", "ceit_tiny_patch16_224"]
)
def test_reset_classifier_keeps_mode_device_and_dtype(name):
    from mpvg_kernels.models import create_model

    m = create_model(name, pe="mpvg", tiny=True).eval().to(torch.float64)
    m.reset_classifier(3)
    head = m.get_classifier()
    heads = head if isinstance(head, (tuple, list)) else (head,)
    assert all(p.dtype == torch.float64 for h in heads for p in h.parameters())
    assert not any(mod.training for mod in m.modules())
