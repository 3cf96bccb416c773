"""The timm tier: registry, create_model, from_timm parity, data config, optimizer grouping, features_only, EMA and
torch.compile against the real timm (skipped where timm cannot be imported)."""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip(
    "timm", reason="timm is not importable here; the timm tier runs in a venv with torch 2.14.1 + torchvision + timm"
)

import mpvg_kernels  # noqa: E402
from mpvg_kernels.models import VisionTransformer, from_timm, list_models  # noqa: E402
from mpvg_kernels.models.timm_bridge import TIMM_MODELS  # noqa: E402

TOL = dict(atol=1e-5, rtol=0)
SMALL = dict(img_size=32, depth=2)  # behaviour tests: DeiT-Ti width at 32x32, 2 blocks


def _x(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- registry


def test_lean_import_and_registry():
    assert not hasattr(mpvg_kernels, "timm_bridge")
    names = timm.list_models("*mpvg*")
    assert set(names) >= {f"mpvg_{m}" for m in list_models()}
    assert set(timm.list_models(module="timm_bridge")) == set(TIMM_MODELS)
    assert len(TIMM_MODELS) == 4 * len(list_models())
    for pe in ("default", "lape", "pvg", "mpvg"):
        assert f"{pe}_deit_tiny_patch16_224" in timm.list_models(f"{pe}_*")


@pytest.mark.parametrize("pe", ["default", "lape", "pvg", "mpvg"])
def test_create_model_kwargs(pe):
    m = timm.create_model(f"{pe}_deit_tiny_patch16_224", num_classes=7, drop_path_rate=0.1, **SMALL)
    assert isinstance(m, VisionTransformer) and m.pe == pe and m.num_classes == 7 and len(m.blocks) == 2
    assert m.pool == ("avg" if pe in ("pvg", "mpvg") else "cls")
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["classifier"] == "head" and cfg["pe"] == pe
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert m(_x()).shape == (2, 7)


def test_create_model_knobs_and_errors():
    m = timm.create_model("mpvg_vit_digits", last_pos=-1, global_pool="avg", in_chans=1)
    assert m.last_pos == 3 and m.pretrained_cfg["input_size"] == (1, 16, 16)
    m = timm.create_model("lape_deit_tiny_patch16_224", hierarchical=False, global_pool="avg", **SMALL)
    assert not m.hierarchical and m.pool == "avg"
    with pytest.raises(ValueError, match="lape_deit_tiny_patch16_224"):
        timm.create_model("mpvg_deit_tiny_patch16_224", pe="lape")
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("mpvg_deit_tiny_patch16_224", pretrained=True, **SMALL)


def test_data_config_and_transform():
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    m = timm.create_model("mpvg_vit_lite_7_4_32")
    cfg = resolve_data_config(model=m)
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == pytest.approx((0.5071, 0.4867, 0.4408))
    tf = create_transform(**cfg)
    img = Image.fromarray((torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy())
    t = tf(img)
    assert t.shape == (3, 32, 32)
    assert m.eval()(t[None]).shape == (1, 100)
    cfg = resolve_data_config(model=timm.create_model("pvg_deit_tiny_patch16_224", depth=1))
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875


def test_pretrained_file_timm_and_own(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_patch16_224", num_classes=10, **SMALL).eval()
    f = tmp_path / "deit.pth"
    torch.save(src.state_dict(), f)
    ov = dict(file=str(f), num_classes=10)
    m = timm.create_model("default_deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=ov, num_classes=10,
                          **SMALL).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x), **TOL)
    mp = timm.create_model("mpvg_deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=ov, num_classes=10,
                           **SMALL)
    torch.testing.assert_close(mp.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(mp.pos_embed, src.pos_embed[:, 1:])  # class-token row dropped (GAP)
    assert mp.cls_token is None and torch.equal(mp.norm.pos_weight, torch.ones(192))
    # another class count: timm drops the head; a project checkpoint (with PE norms) round-trips
    m5 = timm.create_model("mpvg_deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=ov, num_classes=5,
                           **SMALL)
    assert m5.head.out_features == 5
    with torch.no_grad():
        mp.blocks[1].norm1.pos_weight.mul_(1.5)
    g = tmp_path / "own.pth"
    torch.save({"model": mp.state_dict()}, g)
    back = timm.create_model("mpvg_deit_tiny_patch16_224", pretrained=True, num_classes=10,
                             pretrained_cfg_overlay=dict(file=str(g), num_classes=10), **SMALL)
    for k, v in mp.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)


# ----------------------------------------------------------------------------- from_timm parity

R64 = {"img_size": 64}  # full width and depth at 64x64 (16 tokens) to keep the tier fast on 2 cores
PARITY = [
    ("deit_tiny_patch16_224", {}),  # the full DeiT-Ti: class token, norm before pooling
    ("deit_tiny_patch16_224", {"global_pool": "avg", **R64}),  # timm's default GAP: class token kept, fc_norm
    ("deit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": False, **R64}),  # norm first
    ("deit_small_patch16_224", R64),
    ("deit_small_patch16_224", {"global_pool": "avg", **R64}),
    ("deit_small_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": False, **R64}),
    ("vit_small_patch16_224", {"img_size": 64, "depth": 4}),  # ViT (AugReg layout), smaller for speed
    ("vit_base_patch16_gap_224", {"img_size": 64, "depth": 2}),  # timm's GAP ViT: no class token, fc_norm=False
]


_IDS = ["deit_ti-cls", "deit_ti-gap-fc_norm", "deit_ti-gap-norm", "deit_s-cls", "deit_s-gap-fc_norm",
        "deit_s-gap-norm", "vit_s-cls", "vit_gap-norm"]


@pytest.mark.parametrize(("name", "kw"), PARITY, ids=_IDS)
def test_from_timm_default_parity(name, kw):
    torch.manual_seed(0)
    src = timm.create_model(name, num_classes=10, **kw)
    ours = from_timm(src)
    assert isinstance(ours, VisionTransformer) and ours.pe == "default"
    assert set(ours.state_dict()) == set(src.state_dict())  # same keys: a timm checkpoint loads strict=True
    ours.load_state_dict(src.state_dict(), strict=True)
    size = src.patch_embed.img_size[0]
    x = _x(size=size)
    src.train()  # no dropout configured: train and eval compute the same, and autograd runs the fused backward
    ours.train()
    a, ga, pa = _grads(src, x)
    b, gb, pb = _grads(ours, x)
    torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(gb, ga, **TOL)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
    with torch.no_grad():  # inference path (PE cache, fused pooled last step)
        torch.testing.assert_close(ours.eval()(x), src.eval()(x), **TOL)


def test_from_timm_intermediates_match_timm():
    src = timm.create_model("deit_tiny_patch16_224", num_classes=0, **{**SMALL, "depth": 3}).eval()
    ours = from_timm(src).eval()
    x = _x()
    with torch.no_grad():
        for kw in (dict(indices=2), dict(indices=[0, -1], norm=True, output_fmt="NLC"),
                   dict(indices=1, return_prefix_tokens=True)):
            fa, ia = src.forward_intermediates(x, **kw)
            fb, ib = ours.forward_intermediates(x, **kw)
            torch.testing.assert_close(fb, fa, **TOL)
            for u, v in zip(ib, ia, strict=True):
                torch.testing.assert_close(u, v, **TOL)
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   src.forward_head(src.forward_features(x), pre_logits=True), **TOL)
        d = ours.forward_intermediates(x, indices=1, output_dict=True, return_prefix_tokens=True)
        assert set(d) == {"image_intermediates", "image_intermediates_prefix", "image_features"}


@pytest.mark.parametrize("pe", ["lape", "pvg", "mpvg"])
def test_from_timm_pe_modes(pe):
    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_patch16_224", num_classes=10, **SMALL)
    ours = from_timm(src, pe=pe)
    assert ours.pe == pe and set(ours.pe_norm_parameter_names()) == set(ours.state_dict()) - set(src.state_dict())
    for n in ours.pe_norm_parameter_names():
        p = ours.get_parameter(n)
        assert torch.equal(p, torch.ones_like(p) if n.endswith("weight") else torch.zeros_like(p))
    if pe == "lape":
        assert ours.pool == "cls" and torch.equal(ours.pos_embed, src.pos_embed)
    else:
        assert ours.pool == "avg" and ours.cls_token is None and ours.pos_embed.shape[1] == 4
        torch.testing.assert_close(ours.pos_embed, src.pos_embed[:, 1:])
    torch.testing.assert_close(ours.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    _, g, _ = _grads(ours, _x())
    assert torch.isfinite(g).all()
    # timm's GAP model with fc_norm into MPVG: the norm stays after pooling, LN'_last's mean is added there
    gap = timm.create_model("deit_tiny_patch16_224", num_classes=10, global_pool="avg", **SMALL)
    m = from_timm(gap, pe=pe)
    assert m.use_fc_norm and m.cls_token is None or pe == "lape"
    m2 = from_timm(gap, pe=pe, fc_norm=False)  # the norm moved before pooling (the papers' placement)
    torch.testing.assert_close(m2.norm.weight, gap.fc_norm.weight)
    assert m2(_x()).shape == (2, 10)


def test_from_timm_fused_kernels_in_use(monkeypatch):
    from mpvg_kernels.ops import layer_norm as ops_ln

    src = timm.create_model("deit_tiny_patch16_224", num_classes=10, **SMALL)
    ours = from_timm(src, pe="mpvg")
    calls = []
    for name in ("dual_layer_norm", "layer_norm_pool"):
        orig = getattr(ops_ln, name)
        monkeypatch.setattr(ops_ln, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    import mpvg_kernels.layers.norms as norms

    for name in ("dual_layer_norm", "layer_norm_pool"):
        monkeypatch.setattr(norms, name, getattr(ops_ln, name))
    _grads(ours, _x())
    assert calls.count("dual_layer_norm") == 1 and calls.count("layer_norm_pool") == 1  # block 1 + last step


def test_from_timm_unsupported_is_clear():
    m = timm.create_model("vit_small_patch16_224", reg_tokens=4, init_values=1e-5, qk_norm=True, img_size=32, depth=1)
    with pytest.raises(ValueError, match=r"register tokens.*LayerScale.*q_norm"):
        from_timm(m)
    with pytest.raises(ValueError, match="subclass VisionTransformerDistilled"):
        from_timm(timm.create_model("deit_tiny_distilled_patch16_224", **SMALL))
    with pytest.raises(ValueError, match="global_pool='map'"):
        from_timm(timm.create_model("vit_small_patch16_224", global_pool="map", **SMALL))
    with pytest.raises(TypeError, match="VisionTransformer instances"):
        from_timm(timm.create_model("resnet18"))


# ----------------------------------------------------------------------------- the model contract in timm's tools


def _lr_scales(model: torch.nn.Module) -> tuple[dict[str, float], dict[str, float]]:
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    names = {id(p): n for n, p in model.named_parameters()}
    scale, wd = {}, {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[names[id(p)]] = g["lr_scale"]
            wd[names[id(p)]] = g["weight_decay"]
    assert len(scale) == len(names)
    return scale, wd


def test_layer_decay_groups_by_block():
    m = timm.create_model("mpvg_deit_tiny_patch16_224", num_classes=10, img_size=32, depth=4)
    ref = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, depth=4, global_pool="avg",
                            class_token=False, fc_norm=False)
    scale, wd = _lr_scales(m)
    ref_scale, ref_wd = _lr_scales(ref)
    for k in ref_scale:  # every shared parameter lands where timm's own ViT puts it
        assert scale[k] == pytest.approx(ref_scale[k]) and wd[k] == ref_wd[k], k
    assert scale["pos_embed"] == pytest.approx(0.65**5)
    for i in range(1, 4):  # one group per block; the PE LayerNorm LN'_i goes with its block (block 0 has none)
        assert scale[f"blocks.{i}.norm1.pos_weight"] == scale[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(
            0.65 ** (4 - i))
    assert scale["norm.pos_weight"] == scale["norm.weight"]
    assert wd["pos_embed"] == wd["blocks.1.norm1.pos_weight"] == wd["norm.pos_bias"] == 0.0
    assert wd["blocks.0.attn.qkv.weight"] == 0.05


@pytest.mark.parametrize("pe", ["default", "mpvg"])
def test_features_only(pe):
    f = timm.create_model(f"{pe}_deit_tiny_patch16_224", features_only=True, out_indices=(1, 3), img_size=64, depth=4)
    assert f.feature_info.channels() == [192, 192] and f.feature_info.reduction() == [16, 16]
    out = f(_x(size=64))
    assert [tuple(o.shape) for o in out] == [(2, 192, 4, 4)] * 2
    assert len(f.model.blocks) == 4 and isinstance(f.model.head, torch.nn.Identity)
    f3 = timm.create_model(f"{pe}_deit_tiny_patch16_224", features_only=True, out_indices=(0,), **SMALL)
    assert len(f3.model.blocks) == 1 and f3(_x())[0].shape == (2, 192, 2, 2)


@pytest.mark.parametrize("name", ["mpvg_deit_tiny_patch16_224", "mpvg_swin_tiny_patch4_window7_224"])
def test_features_only_takes_the_callers_feature_cfg(name):
    """feature_cfg=dict(norm=True) (timm's FeatureGetterNet option) joins ours instead of colliding with it: the
    features are the normalised ones (MPVG: LN(x) + LN'_last(p)), as forward_intermediates(norm=True) gives them."""
    kw = dict(img_size=64, window_size=4) if "swin" in name else SMALL
    torch.manual_seed(0)
    f = timm.create_model(name, features_only=True, feature_cfg=dict(norm=True), out_indices=(-1,), **kw).eval()
    torch.manual_seed(0)
    m = timm.create_model(name, **kw).eval()
    x = _x(size=kw["img_size"])
    with torch.no_grad():
        expected = m.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        torch.testing.assert_close(f(x), expected, rtol=0, atol=0)
    assert not isinstance(f.model.norm, torch.nn.Identity)


def test_intermediates_norm_gives_mpvg_features():
    m = timm.create_model("mpvg_deit_tiny_patch16_224", **{**SMALL, "depth": 3}).eval()
    x = _x()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, indices=[2], norm=True, output_fmt="NLC")
        torch.testing.assert_close(final, m.forward_features(x))
        torch.testing.assert_close(inter[0], final)
        pos_term = torch.nn.functional.layer_norm(m.pos_embed, (192,), m.norm.pos_weight, m.norm.pos_bias, 1e-6)
        torch.testing.assert_close(final, m.norm.norm_tokens(m.forward_intermediates(x, indices=[2],
                                                                              intermediates_only=True,
                                                                              output_fmt="NLC")[0]) + pos_term)


def test_model_methods():
    m = timm.create_model("mpvg_deit_tiny_patch16_224", num_classes=10, **SMALL)
    assert m.get_classifier() is m.head and m.no_weight_decay() >= {"pos_embed"}
    m.reset_classifier(3)
    assert m(_x()).shape == (2, 3)
    m.reset_classifier(0)
    assert m(_x()).shape == (2, 192)
    a = timm.create_model("pvg_deit_tiny_patch16_224", num_classes=10, **SMALL)
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    _, ga, pa = _grads(a, _x())
    _, gb, pb = _grads(b, _x())
    torch.testing.assert_close(gb, ga)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k])


def test_model_ema_v3():
    from timm.utils import ModelEmaV3

    m = timm.create_model("mpvg_deit_tiny_patch16_224", num_classes=10, **SMALL)
    ema = ModelEmaV3(m, decay=0.5)
    assert isinstance(ema.module, VisionTransformer)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = _x()
    with torch.no_grad():
        before = ema.module(x)
    m(x).square().mean().backward()
    opt.step()
    ema.update(m, step=1)
    fresh = timm.create_model("mpvg_deit_tiny_patch16_224", num_classes=10, **SMALL)
    fresh.load_state_dict(ema.module.state_dict())
    with torch.no_grad():
        after = ema.module(x)  # the EMA copy's inference PE cache notices the in-place EMA update
        torch.testing.assert_close(after, fresh(x))
    assert not torch.allclose(before, after)


def test_compile_fullgraph_converted():
    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_patch16_224", num_classes=10, global_pool="avg", **SMALL)
    ours = from_timm(src, pe="mpvg")
    x = _x()
    eager, gx, gp = _grads(ours, x)
    # aot_eager: the same full-graph capture and AOT autograd as inductor without its C++ compile time (CPU CI)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    out, cgx, cgp = _grads(compiled, x)
    torch.testing.assert_close(out, eager, **TOL)
    torch.testing.assert_close(cgx, gx, **TOL)
    for k in gp:
        torch.testing.assert_close(cgp[k.removeprefix("_orig_mod.")] if k in cgp else cgp["_orig_mod." + k], gp[k],
                                   **TOL)


# ----------------------------------------------------------------------------- timm's own Block with the fused norms


@pytest.mark.parametrize("pe", ["pvg", "mpvg"])
def test_attach_pe_timm_block_matches_from_timm(pe, monkeypatch):
    from timm.models.vision_transformer import Block as TimmBlock

    from mpvg_kernels.models.timm_bridge import attach_pe

    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_patch16_224", global_pool="avg", class_token=False, fc_norm=False,
                            num_classes=5, **{**SMALL, "depth": 3})
    ours = from_timm(src, pe=pe)
    with torch.no_grad():  # non-trivial LN' so that the chain matters
        for n, p in ours.named_parameters():
            if ".pos_" in n:
                p.normal_()
    t = attach_pe(copy.deepcopy(src), pe=pe)
    assert all(type(b) is TimmBlock for b in t.blocks) and isinstance(t.blocks[0].norm1, torch.nn.LayerNorm)
    t.load_state_dict(ours.state_dict(), strict=True)  # same keys as the project's model
    x = _x()
    a, ga, pa = _grads(ours, x)
    b, gb, pb = _grads(t, x)
    torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(gb, ga, **TOL)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], **TOL)
    t.set_grad_checkpointing(True)  # stateless chain: recomputation in backward gives the same gradients
    _, gc, pc = _grads(t, x)
    torch.testing.assert_close(gc, gb, **TOL)
    with torch.no_grad():
        feats = t.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)[0]
        torch.testing.assert_close(feats, ours.eval().forward_features(x), **TOL)
    ema = copy.deepcopy(t)  # copies keep their own PE binding
    assert ema.blocks[1].norm1.stream.owner is ema
    from mpvg_kernels.ops import layer_norm as ops_ln

    calls = []
    orig = ops_ln.dual_layer_norm
    import mpvg_kernels.layers.norms as norms

    monkeypatch.setattr(norms, "dual_layer_norm", lambda *a, **k: calls.append(1) or orig(*a, **k))
    t(x)
    assert len(calls) == 2  # blocks 1 and 2 run the fused op


def test_attach_pe_refuses():
    from mpvg_kernels.models.timm_bridge import attach_pe

    with pytest.raises(ValueError, match="lape"):
        attach_pe(timm.create_model("deit_tiny_patch16_224", **SMALL), pe="lape")
    with pytest.raises(ValueError, match="fc_norm=False"):
        attach_pe(timm.create_model("deit_tiny_patch16_224", global_pool="avg", **SMALL), pe="mpvg")


@pytest.mark.parametrize("arch", ["ceit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "t2t_vit_7",
                                  "cct_7_3x1_32", "deit_tiny_distilled_patch16_224"])
def test_every_family_through_timm_create_model(arch):
    from mpvg_kernels.models import MODEL_CFGS, create_model

    m = timm.create_model(f"mpvg_{arch}", **MODEL_CFGS[arch]["tiny"], in_chans=1, num_classes=3)
    ours = create_model(arch, pe="mpvg", tiny=True, in_chans=1, num_classes=3)
    assert type(m) is type(ours) and m.pe == "mpvg" and m.num_classes == 3
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == ours.default_cfg["input_size"] and cfg["first_conv"] == ours.default_cfg["first_conv"]
    c, h, w = cfg["input_size"]
    assert m.eval()(torch.randn(2, c, h, w)).shape == (2, 3)
