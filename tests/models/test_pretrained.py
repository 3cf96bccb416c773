"""Checkpoint compatibility: timm/DeiT-format state dicts (built here from timm's documented key layout, plain,
wrapped, from a file, from another grid size), DeiT's distilled variant, Compact-Transformers ViT-Lite keys, and,
where timm imports, a real timm model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _vit_reference import RefViT, ref_name

from mpvg_kernels.layers import resample_abs_pos_embed
from mpvg_kernels.models import (
    VisionTransformer,
    create_model,
    load_pretrained,
)

D, DEPTH, HEADS, PATCH, CLASSES = 32, 3, 2, 4, 7
CFG = dict(img_size=16, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0)


def timm_state_dict(grid=4, chans=3, classes=CLASSES, qkv_bias=True, dist=False, seed=0):
    """The key layout of timm's VisionTransformer / DeiT (``deit_*_patch16_224``) with random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2, center=0.0):
        return center + scale * torch.randn(*shape, generator=g)

    hidden = 2 * D
    prefix = 2 if dist else 1
    sd = {
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, prefix + grid * grid, D, scale=0.5),
        "patch_embed.proj.weight": r(D, chans, PATCH, PATCH),
        "patch_embed.proj.bias": r(D),
    }
    if dist:
        sd["dist_token"] = r(1, 1, D)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = r(D, center=1.0), r(D)
        sd[p + "attn.qkv.weight"] = r(3 * D, D)
        if qkv_bias:
            sd[p + "attn.qkv.bias"] = r(3 * D)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(D, D), r(D)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = r(D, center=1.0), r(D)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(hidden, D), r(hidden)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(D, hidden), r(D)
    sd["norm.weight"], sd["norm.bias"] = r(D, center=1.0), r(D)
    sd["head.weight"], sd["head.bias"] = r(classes, D), r(classes)
    if dist:
        sd["head_dist.weight"], sd["head_dist.bias"] = r(classes, D), r(classes)
    return sd


def _model(pe, **kw):
    args = dict(CFG, num_classes=CLASSES)
    args.update(kw)
    return VisionTransformer(pe=pe, **args)


def _bicubic(grid_rows, old, new):
    img = grid_rows.reshape(1, old, old, D).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(new, new), mode="bicubic", antialias=True)
    return img.permute(0, 2, 3, 1).reshape(1, new * new, D)


@pytest.mark.parametrize("pe", ["default", "lape", "pvg", "mpvg"])
@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_timm_state_dict_loads_with_only_pe_norms_missing(pe, pool):
    sd = timm_state_dict()
    model = _model(pe, pool=pool)
    result = load_pretrained(model, sd, strict=False)
    assert sorted(result.missing_keys) == sorted(model.pe_norm_parameter_names())
    assert result.unexpected_keys == []
    assert all(".pos_" in k for k in result.missing_keys)
    msd = model.state_dict()
    for k in ("blocks.2.attn.qkv.weight", "blocks.1.norm1.weight", "norm.bias", "head.weight"):
        assert torch.equal(msd[k], sd[k]), k
    expect = sd["pos_embed"] if pool == "cls" else sd["pos_embed"][:, 1:]  # GAP: class-token row dropped
    assert torch.equal(msd["pos_embed"], expect)
    assert ("cls_token" in msd) == (pool == "cls")
    if pe == "default":
        load_pretrained(model, sd)  # strict by default: every parameter comes from the checkpoint
    else:  # the PE norms are not in the checkpoint: strict (the default) refuses to leave them at init
        with pytest.raises(RuntimeError, match="PE LayerNorms"):
            load_pretrained(model, sd)


def test_loaded_default_model_computes_timm_vit():
    """default + cls after loading a timm state dict = the plain ViT of the reference implementation."""
    sd = timm_state_dict()
    model = _model("default", pool="cls").eval()
    load_pretrained(model, sd, strict=True)
    ref = RefViT("default", "cls", img=16, patch=PATCH, chans=3, dim=D, depth=DEPTH, heads=HEADS, classes=CLASSES)
    ref.load_state_dict({ref_name(k): v for k, v in sd.items()})
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=2e-5, rtol=1e-4)


def test_wrapped_prefixed_and_file_checkpoints(tmp_path):
    sd = timm_state_dict()
    expect = sorted(_model("mpvg").pe_norm_parameter_names())
    for ckpt in (
        {"model": sd, "epoch": 3, "args": {"lr": 5e-4}},
        {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        {f"_orig_mod.{k}": v for k, v in sd.items()},
    ):
        model = _model("mpvg")
        result = load_pretrained(model, ckpt, strict=False)
        assert sorted(result.missing_keys) == expect and result.unexpected_keys == []
        assert torch.equal(model.blocks[0].mlp.fc2.weight, sd["blocks.0.mlp.fc2.weight"])
    path = tmp_path / "deit.pth"
    torch.save({"model": sd}, path)
    model = _model("mpvg")
    result = model.load_pretrained(path, strict=False)
    assert sorted(result.missing_keys) == expect
    with pytest.raises(RuntimeError, match="PE LayerNorms"):
        create_model("vit_digits", pe="pvg", checkpoint_path=path, in_chans=3, num_classes=CLASSES, **CFG)
    made = create_model("vit_digits", pe="pvg", checkpoint_path=path, checkpoint_strict=False, in_chans=3,
                        num_classes=CLASSES, **CFG)
    assert torch.equal(made.head.weight, sd["head.weight"])


@pytest.mark.parametrize("src_grid", [6, 3])
@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_pos_embed_resampled_from_another_grid(src_grid, pool):
    sd = timm_state_dict(grid=src_grid)
    model = _model("mpvg", pool=pool)
    result = load_pretrained(model, sd, strict=False)
    assert result.unexpected_keys == []
    grid = _bicubic(sd["pos_embed"][:, 1:], src_grid, 4)
    expect = torch.cat([sd["pos_embed"][:, :1], grid], 1) if pool == "cls" else grid
    torch.testing.assert_close(model.pos_embed.detach(), expect)
    # the same function serves other input resolutions
    torch.testing.assert_close(resample_abs_pos_embed(sd["pos_embed"], (4, 4), num_prefix_tokens=1)[:, 1:], grid)


def test_other_img_size_model_loads_224_style_checkpoint():
    sd = timm_state_dict(grid=4)
    model = _model("default", img_size=24)  # 6x6 grid
    load_pretrained(model, sd, strict=True)
    assert model.pos_embed.shape == (1, 37, D)
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, CLASSES)


def test_head_mismatch_distilled_and_grey_input():
    sd = timm_state_dict(dist=True)
    model = _model("mpvg", num_classes=5)
    result = load_pretrained(model, sd, strict=False)
    assert sorted(result.missing_keys) == sorted(model.pe_norm_parameter_names() + ["head.bias", "head.weight"])
    assert result.unexpected_keys == []  # dist_token, head_dist and the class token are dropped on purpose
    torch.testing.assert_close(model.pos_embed.detach(), sd["pos_embed"][:, 2:])
    with pytest.raises(RuntimeError, match="missing"):
        load_pretrained(_model("mpvg", num_classes=5), sd, strict=True)
    grey = _model("default", in_chans=1)
    load_pretrained(grey, timm_state_dict(), strict=True)
    torch.testing.assert_close(
        grey.patch_embed.proj.weight.detach(), timm_state_dict()["patch_embed.proj.weight"].sum(1, True)
    )
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        load_pretrained(_model("pvg", patch_size=2), timm_state_dict())


def test_unexpected_keys_reported_and_strict_raises():
    sd = timm_state_dict()
    sd["fc_norm.weight"] = torch.ones(D)
    model = _model("default")
    assert load_pretrained(model, sd, strict=False).unexpected_keys == ["fc_norm.weight"]
    with pytest.raises(RuntimeError, match="unexpected"):
        load_pretrained(model, sd, strict=True)


def test_compact_transformers_vit_lite_keys():
    """SHI-Labs Compact-Transformers ViT-Lite names (tokenizer./classifier.) map onto the timm names."""
    sd = timm_state_dict(qkv_bias=False)
    rename = {
        "cls_token": "classifier.class_emb",
        "pos_embed": "classifier.positional_emb",
        "patch_embed.proj.weight": "tokenizer.conv_layers.0.0.weight",
        "patch_embed.proj.bias": "tokenizer.conv_layers.0.0.bias",
        "norm.weight": "classifier.norm.weight",
        "norm.bias": "classifier.norm.bias",
        "head.weight": "classifier.fc.weight",
        "head.bias": "classifier.fc.bias",
    }
    blk = {"norm1": "pre_norm", "attn": "self_attn", "norm2": "norm1", "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
    cct = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for a, b in blk.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
                    break
            cct[f"classifier.blocks.{i}.{rest}"] = v
        else:
            cct[rename[k]] = v
    model = _model("lape", block_style="cct", qkv_bias=False)
    result = load_pretrained(model, cct, strict=False)
    assert sorted(result.missing_keys) == sorted(model.pe_norm_parameter_names()) and result.unexpected_keys == []
    assert torch.equal(model.blocks[1].norm2.weight, sd["blocks.1.norm2.weight"])
    assert torch.equal(model.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])


def test_real_timm_model():
    timm = pytest.importorskip(
        "timm", reason="timm is not installed in this environment; the timm key layout is covered above"
    )
    kw = dict(img_size=16, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0)
    t = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, **kw).eval()
    sd = t.state_dict()
    ours = _model("default", pool="cls").eval()
    load_pretrained(ours, sd, strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), t(x), atol=2e-5, rtol=1e-4)
    for pe in ("lape", "pvg", "mpvg"):
        m = _model(pe)
        result = load_pretrained(m, sd, strict=False)
        assert sorted(result.missing_keys) == sorted(m.pe_norm_parameter_names()) and not result.unexpected_keys
