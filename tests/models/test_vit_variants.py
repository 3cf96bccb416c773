"""VisionTransformer variants: fixed sin-cos position embeddings (1-D as T2T-ViT, 2-D as MAE) and the tokenizer
option, each checked against independent plain implementations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _vit_reference import RefViT, randomize_, ref_name

from mpvg_kernels.layers.pos_embed import sincos_pos_embed, sincos_table_1d, sincos_table_2d
from mpvg_kernels.layers.tokenizers import TOKENIZERS, ConvTokenizer
from mpvg_kernels.models import VisionTransformer, count_parameters, load_pretrained

MODES = ("default", "lape", "pvg", "mpvg")
SMALL = dict(img_size=8, patch_size=2, in_chans=3, num_classes=5, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
ATOL, RTOL = 1e-10, 1e-8  # float64


# ----------------------------------------------------------------------------- independent tables


def _t2t_sinusoid(n_position: int, d_hid: int) -> np.ndarray:
    """T2T-ViT's get_sinusoid_encoding, written out: angle(n, j) = n / 10000^(2 (j // 2) / d); sin even j, cos odd."""
    table = np.array([[n / np.power(10000, 2 * (j // 2) / d_hid) for j in range(d_hid)] for n in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return table


def _mae_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_2d(dim: int, h: int, w: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (generalised to h x w): meshgrid(w, h), the first half from grid[0]."""
    grid = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    grid = np.stack(grid, axis=0).reshape(2, 1, h, w)
    return np.concatenate([_mae_1d(dim // 2, grid[0]), _mae_1d(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("n,d", [(17, 32), (50, 7), (1, 4)])
def test_sincos_1d_is_t2t_sinusoid_encoding(n, d):
    np.testing.assert_allclose(sincos_table_1d(n, d).numpy(), _t2t_sinusoid(n, d), rtol=0, atol=1e-12)


@pytest.mark.parametrize("h,w,d", [(4, 4, 32), (3, 5, 16), (14, 14, 192)])
def test_sincos_2d_is_mae_table(h, w, d):
    np.testing.assert_allclose(sincos_table_2d((h, w), d).numpy(), _mae_2d(d, h, w), rtol=0, atol=1e-12)


def test_sincos_pos_embed_prefix_rows():
    one = sincos_pos_embed("sincos1d", (3, 3), 16, num_prefix_tokens=2, dtype=torch.float64)
    assert one.shape == (1, 11, 16)
    torch.testing.assert_close(one[0], torch.from_numpy(_t2t_sinusoid(11, 16)))  # prefix rows are positions 0, 1
    two = sincos_pos_embed("sincos2d", (3, 3), 16, num_prefix_tokens=1, dtype=torch.float64)
    assert two.shape == (1, 10, 16) and two[0, 0].abs().max() == 0  # zero prefix row
    torch.testing.assert_close(two[0, 1:], torch.from_numpy(_mae_2d(16, 3, 3)))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_table_2d((2, 2), 6)
    with pytest.raises(ValueError, match="sincos1d"):
        sincos_pos_embed("rope", (2, 2), 8)


# ----------------------------------------------------------------------------- the model with a fixed table


@pytest.mark.parametrize("kind", ["sincos1d", "sincos2d"])
@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_fixed_pos_embed_is_a_buffer(kind, pool):
    learned = VisionTransformer(pe="mpvg", pool=pool, **SMALL)
    m = VisionTransformer(pe="mpvg", pool=pool, pos_embed=kind, **SMALL)
    assert not isinstance(m.pos_embed, torch.nn.Parameter)
    assert "pos_embed" in dict(m.named_buffers()) and "pos_embed" in m.state_dict()
    assert "pos_embed" not in dict(m.named_parameters())
    assert count_parameters(learned) - count_parameters(m) == learned.pos_embed.numel()
    npt = int(pool == "cls")
    expect = sincos_pos_embed(kind, (4, 4), 32, npt)
    torch.testing.assert_close(m.pos_embed, expect, rtol=0, atol=0)
    m2 = VisionTransformer(pe="mpvg", pool=pool, pos_embed=kind, **SMALL)
    m2.load_state_dict(m.state_dict())  # round trip (strict)


def _ref_pair(pe: str, pool: str, kind: str, seed: int = 0) -> tuple[VisionTransformer, RefViT]:
    torch.manual_seed(seed)
    model = VisionTransformer(pe=pe, pool=pool, pos_embed=kind, **SMALL).double()
    randomize_(model, seed)
    ref = RefViT(pe, pool, img=8, patch=2, chans=3, dim=32, depth=3, heads=2, classes=5).double()
    theirs = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            theirs[ref_name(n)].copy_(p)
        ref.pos.copy_(model.pos_embed)  # the fixed table in the reference's PE slot
    ref.pos.requires_grad_(False)
    assert {ref_name(n) for n, _ in model.named_parameters()} == {
        n for n, p in ref.named_parameters() if p.requires_grad
    }
    return model, ref


@pytest.mark.parametrize("kind", ["sincos1d", "sincos2d"])
@pytest.mark.parametrize("pe", MODES)
def test_fixed_pos_embed_every_mode_matches_reference(pe, kind):
    from mpvg_kernels.layers.pe_walk import default_pool

    model, ref = _ref_pair(pe, default_pool(pe), kind)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, expect = model(x), ref(x)
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
    (out * w).sum().backward()
    (expect * w).sum().backward()
    theirs = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            p.grad, theirs[ref_name(n)].grad, atol=ATOL, rtol=RTOL, msg=lambda s, n=n: f"{n}: {s}"
        )
    model.eval()
    with torch.no_grad():
        live = model(x)
        cached = model(x)
        given = model(x, pe_terms=model.compute_pe_terms())
        analysis = model.forward_analysis(x)["logits"]
    assert model.pe_cache.hits >= 1
    for y in (cached, given, analysis):
        torch.testing.assert_close(y, live, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["sincos1d", "sincos2d"])
def test_fixed_pos_embed_other_grid_is_recomputed(kind):
    m = VisionTransformer(pe="mpvg", pool="cls", pos_embed=kind, dynamic_img_size=True, **SMALL)
    terms = m.compute_pe_terms((3, 5))
    torch.testing.assert_close(terms.pos, sincos_pos_embed(kind, (3, 5), 32, 1), rtol=0, atol=0)
    assert m(torch.randn(2, 3, 6, 10)).shape == (2, 5)
    m.set_input_size(12)
    assert m.patch_embed.grid_size == (6, 6) and m.default_cfg["input_size"] == (3, 12, 12)
    assert not isinstance(m.pos_embed, torch.nn.Parameter) and "pos_embed" in dict(m.named_buffers())
    torch.testing.assert_close(m.pos_embed, sincos_pos_embed(kind, (6, 6), 32, 1), rtol=0, atol=0)


def test_fixed_pos_embed_checkpoint_keeps_own_table():
    src = VisionTransformer(pe="default", **{**SMALL, "img_size": 12})  # a learned PE of another grid
    m = VisionTransformer(pe="mpvg", pool="cls", pos_embed="sincos1d", **SMALL)
    table = m.pos_embed.clone()
    result = load_pretrained(m, src.state_dict(), strict=True)
    assert sorted(result.missing_keys) == sorted(m.pe_norm_parameter_names())
    torch.testing.assert_close(m.pos_embed, table, rtol=0, atol=0)
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_pos_embed_option_errors():
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        VisionTransformer(pos_embed="rope", **SMALL)
    with pytest.raises(ValueError, match="divisible by 4"):
        VisionTransformer(pos_embed="sincos2d", **{**SMALL, "embed_dim": 30, "num_heads": 3})


# ----------------------------------------------------------------------------- tokenizers


def test_patch_tokenizer_is_the_default():
    m = VisionTransformer(pe="mpvg", **SMALL)
    assert m.tokenizer == "patch" and type(m.patch_embed) is TOKENIZERS["patch"]
    assert m.patch_embed.in_chans == 3 and m.in_chans == 3
    assert m.default_cfg["first_conv"] == "patch_embed.proj"
    one = VisionTransformer(pe="mpvg", **{**SMALL, "in_chans": 1})
    assert one.default_cfg["input_size"] == (1, 8, 8) and len(one.default_cfg["mean"]) == 1


def _conv_tokens(x: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
    """CCT tokenizer written out: conv 3x3 / stride 1 / pad 1 (no bias), ReLU, max-pool 3 / 2 / 1, flatten."""
    y = torch.nn.functional.conv2d(x, conv, stride=1, padding=1).relu()
    y = torch.nn.functional.max_pool2d(y, 3, 2, 1)
    return y.flatten(2).transpose(1, 2)


def test_conv_tokenizer():
    tok = ConvTokenizer(32, 3, 3, 16)
    assert tok.grid_size == (16, 16) and tok.num_patches == 256 and tok.patch_size == (2, 2)
    assert tok.grid_for(17, 9) == (9, 5) and tok.in_chans == 3
    assert [type(m).__name__ for m in tok.conv_layers[0]] == ["Conv2d", "ReLU", "MaxPool2d"]
    assert tok.conv_layers[0][0].bias is None
    x = torch.randn(2, 3, 32, 32)
    y = tok(x)
    assert y.is_contiguous() and y.shape == (2, 256, 16)
    torch.testing.assert_close(y, _conv_tokens(x, tok.conv_layers[0][0].weight))
    for h, w in [(17, 9), (5, 30)]:
        assert tuple(tok(torch.randn(1, 3, h, w)).shape[1:]) == (math.prod(tok.grid_for(h, w)), 16)
    two = ConvTokenizer(224, 7, 3, 16, n_conv_layers=2, in_planes=8)
    assert two.patch_size == (16, 16) and two.grid_size == (14, 14)  # CCT-14/7x2: conv stride 2, pad 3, pool 2
    assert two(torch.randn(1, 3, 224, 224)).shape == (1, 196, 16)


def test_model_with_conv_tokenizer():
    m = VisionTransformer(
        pe="mpvg",
        tokenizer="conv",
        patch_size=3,
        img_size=16,
        in_chans=1,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=3,
        patch_init="kaiming_normal",
    )
    assert m.patch_embed.grid_size == (8, 8) and m.pos_embed.shape == (1, 64, 16)
    assert m.default_cfg["first_conv"] == "patch_embed.conv_layers.0.0"
    conv = m.get_submodule(m.default_cfg["first_conv"])
    assert isinstance(conv, torch.nn.Conv2d) and conv.in_channels == 1
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    m.set_input_size(24)
    assert m.patch_embed.grid_size == (12, 12) and m.pos_embed.shape == (1, 144, 16)
    assert m(torch.randn(2, 1, 24, 24)).shape == (2, 3)
    inter = m.forward_intermediates(torch.randn(2, 1, 24, 24), intermediates_only=True)
    assert inter[-1].shape == (2, 16, 12, 12)


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        VisionTransformer(tokenizer="t2t", **SMALL)
    with pytest.raises(ValueError, match="does not take these tokenizer_args"):
        VisionTransformer(tokenizer="patch", tokenizer_args={"n_conv_layers": 2}, **SMALL)
    with pytest.raises(ValueError, match="n_conv_layers"):
        ConvTokenizer(32, 3, 3, 16, n_conv_layers=0)
