"""VisionTransformer variants: fixed sin-cos position embeddings (1-D as T2T-ViT, 2-D as MAE), the tokenizer
option, DeiT's distilled model, CVT and CCT (sequence pooling, conv tokenizer), each checked against independent
plain implementations written here (float64, logits and gradients, every mode)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _vit_reference import MODE_DEFAULTS, RefBlock, RefViT, randomize_, ref_name
from torch import nn

from mpvg_kernels.layers.pe_walk import default_pool
from mpvg_kernels.layers.pos_embed import sincos_pos_embed, sincos_table_1d, sincos_table_2d
from mpvg_kernels.layers.tokenizers import TOKENIZERS, ConvTokenizer
from mpvg_kernels.models import VisionTransformer, count_parameters, create_model, load_pretrained

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
    # a checkpoint with the same fixed table (another grid, as T2T-ViT's official checkpoints hold it) loads
    src = VisionTransformer(pe="default", pos_embed="sincos1d", **{**SMALL, "img_size": 12})
    m = VisionTransformer(pe="mpvg", pool="cls", pos_embed="sincos1d", **SMALL)
    table = m.pos_embed.clone()
    result = load_pretrained(m, src.state_dict(), strict=False)  # the PE norms are not in it
    assert sorted(result.missing_keys) == sorted(m.pe_norm_parameter_names())
    torch.testing.assert_close(m.pos_embed, table, rtol=0, atol=0)
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    # a learned PE is never replaced by the table without a word
    learned = VisionTransformer(pe="default", **{**SMALL, "img_size": 12})
    with pytest.raises(ValueError, match="not the fixed 'sincos1d' table"):
        load_pretrained(m, learned.state_dict())


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
        VisionTransformer(tokenizer="no-such-tokenizer", **SMALL)
    with pytest.raises(ValueError, match="does not take these tokenizer_args"):
        VisionTransformer(tokenizer="patch", tokenizer_args={"n_conv_layers": 2}, **SMALL)
    with pytest.raises(ValueError, match="n_conv_layers"):
        ConvTokenizer(32, 3, 3, 16, n_conv_layers=0)


# ----------------------------------------------------------------------------- an independent reference


class RefVariant(nn.Module):
    """A plain ViT with the variants written out: optional class and distillation tokens, a patch conv or the CCT
    conv tokenizer (conv, ReLU, max-pool), and the pooling: class token, DeiT's two heads averaged, mean of the
    patch tokens, or sequence pooling softmax_n(w . z_n) weighted sum of the tokens z_n. The PE modes as in
    :class:`RefViT` (attention input LN1(x) + LN'_l(p_l), hierarchical p_l, LN(x) + LN'_last(p) at the end)."""

    def __init__(
        self,
        mode,
        pool,
        *,
        img,
        patch,
        chans,
        dim,
        depth,
        heads,
        mlp_ratio,
        classes,
        qkv_bias=True,
        cct=False,
        distilled=False,
        conv_tokenizer=False,
        eps=1e-6,
    ):
        super().__init__()
        layerwise, self.layer0, self.hier, self.x_plus_pe, self.last = MODE_DEFAULTS[mode]
        self.pool, self.distilled, self.conv_tokenizer = pool, distilled, conv_tokenizer
        if conv_tokenizer:  # kernel `patch`, stride 1, padding 1, then max-pool 3 / 2 / 1
            self.conv = nn.Conv2d(chans, dim, patch, 1, 1, bias=False)
            n = ((img - 1) // 2 + 1) ** 2
        else:
            self.conv = nn.Conv2d(chans, dim, patch, patch)
            n = (img // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.dist = nn.Parameter(torch.zeros(1, 1, dim)) if distilled else None
        prefix = int(self.cls is not None) + int(distilled)
        self.pos = nn.Parameter(torch.zeros(1, prefix + n, dim))
        self.prefix = prefix
        self.blocks = nn.ModuleList(
            RefBlock(dim, heads, int(dim * mlp_ratio), qkv_bias, eps, layerwise and (i > 0 or self.layer0), cct)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.last_pos_ln = nn.LayerNorm(dim, eps=eps) if self.last is not None else None
        self.attention_pool = nn.Linear(dim, 1) if pool == "seq" else None
        self.head = nn.Linear(dim, classes)
        self.head_dist = nn.Linear(dim, classes) if distilled else None

    def forward(self, img):
        x = self.conv(img)
        if self.conv_tokenizer:
            x = torch.nn.functional.max_pool2d(torch.relu(x), 3, 2, 1)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in (self.cls, self.dist) if t is not None] + [x], dim=1)
        if self.x_plus_pe:
            x = x + self.pos
        terms, prev = [], self.pos
        for blk in self.blocks:
            term = None
            if blk.pos_ln is not None:
                term = blk.pos_ln(prev if self.hier else self.pos)
                prev = term if self.hier else prev
            terms.append(term)
            x = blk.rest(x, blk.ln1(x) if term is None else blk.ln1(x) + term)
        z = self.norm(x)
        if self.last is not None:
            z = z + self.last_pos_ln(self.pos if self.last == 0 else terms[self.last])
        if self.distilled:
            return (self.head(z[:, 0]) + self.head_dist(z[:, 1])) / 2
        if self.pool == "cls":
            return self.head(z[:, 0])
        if self.pool == "seq":
            w = torch.softmax(self.attention_pool(z).squeeze(-1), dim=1)  # [B, T]
            return self.head((w.unsqueeze(-1) * z).sum(dim=1))
        return self.head(z[:, self.prefix :].mean(dim=1))


def variant_ref_name(name: str) -> str:
    """Our parameter name -> RefVariant's."""
    extra = {"dist_token": "dist", "patch_embed.conv_layers.0.0.weight": "conv.weight"}
    if name in extra:
        return extra[name]
    if name.startswith(("head_dist.", "attention_pool.")):
        return name
    mapped = ref_name(name)
    assert mapped is not None, name
    return mapped


def _variant_pair(model: VisionTransformer, ref: RefVariant, seed: int = 0) -> None:
    """Random float64 weights in ``model``, copied by name into ``ref`` (the parameter sets must be equal)."""
    model.double()
    ref.double()
    randomize_(model, seed)
    theirs = dict(ref.named_parameters())
    ours = {variant_ref_name(n): p for n, p in model.named_parameters()}
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    with torch.no_grad():
        for n, p in ours.items():
            theirs[n].copy_(p)


def _check_against_ref(model: VisionTransformer, ref: RefVariant, x: torch.Tensor) -> None:
    """Logits and every parameter gradient equal (float64); then the cache, given terms and the analysis agree."""
    w = torch.randn(x.shape[0], model.num_classes, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, expect = model(x), ref(x)
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
    (out * w).sum().backward()
    (expect * w).sum().backward()
    theirs = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        q = theirs[variant_ref_name(n)]
        assert p.grad is not None and q.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=RTOL, msg=lambda s, n=n: f"{n}: {s}")
    model.eval()
    with torch.no_grad():
        live = model(x)
        cached, cached_again = model(x), model(x)
        given = model(x, pe_terms=model.compute_pe_terms())
        analysis = model.forward_analysis(x)
        head = model.forward_head(model.forward_features(x))
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    if model.pos_embed is not None:
        assert model.pe_cache.hits >= 1
    torch.testing.assert_close(live, expect.detach(), atol=ATOL, rtol=RTOL)
    for y in (cached, cached_again, given, analysis["logits"], head):
        torch.testing.assert_close(y, live, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pre, model.forward_pooled(x), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(analysis["pooled"], pre, atol=ATOL, rtol=RTOL)
    assert analysis["num_prefix_tokens"] == model.num_prefix_tokens


def _x(b: int = 3, c: int = 3, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, c, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- DeiT distilled

#: DeiT paper (Touvron et al. 2021, Table 1): DeiT-Ti distilled 5,910,800 and DeiT-S distilled 22,436,432
#: parameters; the other modes add LN' gammas/betas: 2 D per PE block (12 for LaPE, 11 for PVG) + 2 D for MPVG's
#: LN'_last.
DISTILLED_PARAMS = {
    "deit_tiny_distilled_patch16_224": {"default": 5_910_800, "lape": 5_915_408, "pvg": 5_915_024, "mpvg": 5_915_408},
    "deit_small_distilled_patch16_224": {
        "default": 22_436_432,
        "lape": 22_445_648,
        "pvg": 22_444_880,
        "mpvg": 22_445_648,
    },
}


@pytest.mark.parametrize("name", sorted(DISTILLED_PARAMS))
@pytest.mark.parametrize("pe", MODES)
def test_distilled_parameter_counts(name, pe):
    with torch.device("meta"):
        m = create_model(name, pe=pe)
    assert m.distilled and m.pool == "cls" and m.num_prefix_tokens == 2
    assert count_parameters(m) == DISTILLED_PARAMS[name][pe]
    assert m.pos_embed.shape == (1, 196 + 2, m.embed_dim)
    assert m.default_cfg["classifier"] == ("head", "head_dist")


DISTILLED_SMALL = dict(SMALL, distilled=True, pool="cls")


@pytest.mark.parametrize("pe", MODES)
def test_distilled_every_mode_matches_reference(pe):
    torch.manual_seed(0)
    model = VisionTransformer(pe=pe, **DISTILLED_SMALL)
    ref = RefVariant(
        pe, "cls", img=8, patch=2, chans=3, dim=32, depth=3, heads=2, mlp_ratio=2.0, classes=5, distilled=True
    )
    _variant_pair(model, ref)
    _check_against_ref(model, ref, _x())


def test_distilled_structure_and_errors():
    m = VisionTransformer(pe="lape", **DISTILLED_SMALL)
    assert m.dist_token.shape == (1, 1, 32) and m.pos_embed.shape == (1, 18, 32)
    assert {"dist_token", "cls_token", "pos_embed"} <= m.no_weight_decay()
    head, head_dist = m.get_classifier()
    assert head is m.head and head_dist is m.head_dist
    m.reset_classifier(7)
    assert m.head.out_features == 7 and m.head_dist.out_features == 7 and m(torch.randn(2, 3, 8, 8)).shape == (2, 7)
    m.reset_classifier(0)
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 32)
    feats = m.forward_intermediates(torch.randn(2, 3, 8, 8), return_prefix_tokens=True, intermediates_only=True)
    assert feats[0][0].shape == (2, 32, 4, 4) and feats[0][1].shape == (2, 2, 32)
    with pytest.raises(ValueError, match="needs pool='cls'"):
        VisionTransformer(pe="mpvg", **{**SMALL, "distilled": True})  # the MPVG default is GAP
    # GAP asked for explicitly: one head on the patch mean, no head_dist (both prefix tokens stay in the sequence)
    for m in (create_model("deit_tiny_distilled_patch16_224", pe="mpvg", tiny=True, pool="avg"),
              VisionTransformer(pe="default", **DISTILLED_SMALL)):
        x = torch.randn(2, *m.default_cfg["input_size"])
        m.reset_classifier(5, global_pool="avg")
        assert m.head_dist is None and m.get_classifier() is m.head and m.dist_token is not None
        assert not any(k.startswith("head_dist") for k in m.state_dict()) and m.default_cfg["classifier"] == "head"
        feats, npt = m.forward_features(x), m.num_prefix_tokens
        torch.testing.assert_close(m(x), m.head(feats[:, npt:].mean(dim=1)))
        torch.testing.assert_close(m.forward_pooled(x), feats[:, npt:].mean(dim=1))
    m.reset_classifier(4, global_pool="token")  # DeiT's two heads again (this one has its class token)
    assert m.get_classifier() == (m.head, m.head_dist) and m(x).shape == (2, 4) and m.num_prefix_tokens == 2


def test_distilled_checkpoint_round_trip_and_from_plain_deit():
    src = VisionTransformer(pe="default", **DISTILLED_SMALL)
    m = VisionTransformer(pe="mpvg", **DISTILLED_SMALL)
    result = load_pretrained(m, src.state_dict(), strict=False)  # the PE norms are not in it
    assert sorted(result.missing_keys) == sorted(m.pe_norm_parameter_names())
    for k in ("dist_token", "pos_embed", "head_dist.weight"):
        torch.testing.assert_close(m.state_dict()[k], src.state_dict()[k], rtol=0, atol=0)
    plain = VisionTransformer(pe="default", **SMALL)  # a distilled checkpoint into a plain DeiT: dist row dropped
    load_pretrained(plain, src.state_dict(), strict=True)
    torch.testing.assert_close(plain.pos_embed, torch.cat([src.pos_embed[:, :1], src.pos_embed[:, 2:]], 1))
    own_dist_row = m.pos_embed[:, 1].clone()  # a plain checkpoint into a distilled model: its own dist row kept
    result = load_pretrained(m, plain.state_dict(), strict=False)
    assert set(result.missing_keys) >= {"dist_token", "head_dist.weight", "head_dist.bias"}
    torch.testing.assert_close(m.pos_embed[:, 1], own_dist_row, rtol=0, atol=0)
    torch.testing.assert_close(m.pos_embed[:, 0], plain.pos_embed[:, 0], rtol=0, atol=0)


def test_distilled_tiny_registered_variant_on_digits_channels():
    for name in DISTILLED_PARAMS:
        for pe in MODES:
            m = create_model(name, pe=pe, tiny=True, in_chans=1, num_classes=10)
            x = torch.randn(2, 1, 32, 32)
            m(x).sum().backward()
            assert m.default_cfg["input_size"] == (1, 32, 32)


# ----------------------------------------------------------------------------- CVT and CCT (sequence pooling)

#: Registered with 100 classes (CIFAR-100). With 10 classes (CIFAR-10) the default mode gives the Compact-Transformers
#: paper's 3.72 M (CVT-7/4) and 3.76 M (CCT-7/3x1).
SEQ_PARAMS = {
    ("cvt_7_4_32", 100): {"default": 3_739_749, "lape": 3_743_333, "pvg": 3_742_821, "mpvg": 3_743_333},
    ("cvt_7_4_32", 10): {"default": 3_716_619, "lape": 3_720_203, "pvg": 3_719_691, "mpvg": 3_720_203},
    ("cct_7_3x1_32", 100): {"default": 3_783_269, "lape": 3_786_853, "pvg": 3_786_341, "mpvg": 3_786_853},
    ("cct_7_3x1_32", 10): {"default": 3_760_139, "lape": 3_763_723, "pvg": 3_763_211, "mpvg": 3_763_723},
}


@pytest.mark.parametrize("key", sorted(SEQ_PARAMS), ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("pe", MODES)
def test_seq_pool_parameter_counts(key, pe):
    name, classes = key
    with torch.device("meta"):
        m = create_model(name, pe=pe, num_classes=classes)
    assert m.pool == "seq" and m.num_prefix_tokens == 0 and m.cls_token is None
    assert count_parameters(m) == SEQ_PARAMS[key][pe]
    assert m.patch_embed.num_patches == (256 if name.startswith("cct") else 64)
    assert m.pos_embed.shape == (1, m.patch_embed.num_patches, 256)
    if classes == 10:
        paper = {"cvt_7_4_32": 3.72, "cct_7_3x1_32": 3.76}[name]
        assert round(SEQ_PARAMS[key]["default"] / 1e6, 2) == paper


def test_registered_cvt_and_cct_follow_compact_transformers():
    cvt = create_model("cvt_7_4_32")
    cct = create_model("cct_7_3x1_32")
    for m in (cvt, cct):
        assert m.block_style == "cct" and m.blocks[0].attn.qkv.bias is None and m.num_classes == 100
        assert m.blocks[0].norm1.eps == 1e-5 and m.norm.eps == 1e-5 and m.attention_pool.out_features == 1
        assert m.default_cfg["input_size"] == (3, 32, 32) and m.default_cfg["pool"] == "seq"
    assert type(cvt.patch_embed).__name__ == "PatchEmbed" and cvt.patch_embed.proj.bias is not None
    conv, act, pool = cct.patch_embed.conv_layers[0]
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(act, nn.ReLU) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert cct.default_cfg["first_conv"] == "patch_embed.conv_layers.0.0"


SEQ_TINY = dict(
    img_size=8,
    in_chans=3,
    num_classes=5,
    embed_dim=32,
    depth=3,
    num_heads=2,
    mlp_ratio=2.0,
    qkv_bias=False,
    block_style="cct",
    pool="seq",
)
SEQ_VARIANTS = {
    "cvt": (dict(patch_size=2), dict(patch=2, conv_tokenizer=False)),
    "cct": (dict(patch_size=3, tokenizer="conv"), dict(patch=3, conv_tokenizer=True)),
}


@pytest.mark.parametrize("variant", sorted(SEQ_VARIANTS))
@pytest.mark.parametrize("pe", MODES)
def test_seq_pool_every_mode_matches_reference(variant, pe):
    kw, rkw = SEQ_VARIANTS[variant]
    torch.manual_seed(0)
    model = VisionTransformer(pe=pe, **SEQ_TINY, **kw)
    ref = RefVariant(
        pe, "seq", img=8, chans=3, dim=32, depth=3, heads=2, mlp_ratio=2.0, classes=5, qkv_bias=False, cct=True, **rkw
    )
    _variant_pair(model, ref)
    _check_against_ref(model, ref, _x())


@pytest.mark.parametrize("knobs", [dict(last_pos=2), dict(hierarchical=False), dict(include_layer0=True)])
def test_seq_pool_mpvg_knobs(knobs):
    """MPVG's knobs with sequence pooling: the last PE from block 2, non-hierarchical, layer 0 included."""
    model = VisionTransformer(pe="mpvg", **SEQ_TINY, patch_size=2, **knobs)
    ref = RefVariant(
        "mpvg",
        "seq",
        img=8,
        patch=2,
        chans=3,
        dim=32,
        depth=3,
        heads=2,
        mlp_ratio=2.0,
        classes=5,
        qkv_bias=False,
        cct=True,
    )
    ref.last = knobs.get("last_pos", 0)
    ref.hier = knobs.get("hierarchical", True)
    if knobs.get("include_layer0"):
        ref.blocks[0].pos_ln = nn.LayerNorm(32, eps=1e-6)
    _variant_pair(model, ref)
    _check_against_ref(model, ref, _x())


def test_seq_pool_tiny_registered_variants_on_digits_channels():
    for name in ("cvt_7_4_32", "cct_7_3x1_32"):
        for pe in MODES:
            m = create_model(name, pe=pe, tiny=True, in_chans=1, num_classes=10)
            assert m.pool == "seq" and m.default_cfg["input_size"] == (1, 16, 16)
            m(torch.randn(2, 1, 16, 16)).sum().backward()
            assert m.attention_pool.weight.grad is not None


def test_seq_pool_errors_and_timm_contract():
    with pytest.raises(ValueError, match="takes no class token"):
        VisionTransformer(pe="default", class_token=True, **SEQ_TINY, patch_size=2)
    m = VisionTransformer(pe="mpvg", **SEQ_TINY, patch_size=2)
    assert m.global_pool == "seq" and m.cls_token is None
    m.reset_classifier(3)
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    m.reset_classifier(0)
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 32)  # sequence-pooled features
    inter = m.forward_intermediates(torch.randn(2, 3, 8, 8), norm=True, intermediates_only=True)
    assert len(inter) == 3 and inter[0].shape == (2, 32, 4, 4)
    m.reset_classifier(3, global_pool="avg")  # the sequence pooling goes (tests/models/test_timm_contract.py)
    assert m.global_pool == "avg" and m.attention_pool is None


# official Compact-Transformers names of a 1-conv-layer model, written out from src/utils/transformers.py and
# src/utils/tokenizer.py; ``{i}`` is the block index
_OFFICIAL_BLOCK = [
    "pre_norm.weight",
    "pre_norm.bias",
    "self_attn.qkv.weight",
    "self_attn.proj.weight",
    "self_attn.proj.bias",
    "linear1.weight",
    "linear1.bias",
    "norm1.weight",
    "norm1.bias",
    "linear2.weight",
    "linear2.bias",
]
_OURS_BLOCK = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.proj.weight",
    "attn.proj.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
]


def _official_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    ours = model.state_dict()
    out = {
        "classifier.positional_emb": ours["pos_embed"],
        "classifier.norm.weight": ours["norm.weight"],
        "classifier.norm.bias": ours["norm.bias"],
        "classifier.fc.weight": ours["head.weight"],
        "classifier.fc.bias": ours["head.bias"],
        "classifier.attention_pool.weight": ours["attention_pool.weight"],
        "classifier.attention_pool.bias": ours["attention_pool.bias"],
    }
    first = "patch_embed." + model.patch_embed.first_conv
    for k in ("weight", "bias"):
        if f"{first}.{k}" in ours:
            out[f"tokenizer.conv_layers.0.0.{k}"] = ours[f"{first}.{k}"]
    for i in range(len(model.blocks)):
        for a, b in zip(_OFFICIAL_BLOCK, _OURS_BLOCK, strict=True):
            out[f"classifier.blocks.{i}.{a}"] = ours[f"blocks.{i}.{b}"]
    return out


@pytest.mark.parametrize("name", ["cvt_7_4_32", "cct_7_3x1_32"])
def test_official_compact_transformers_checkpoint_loads(name):
    src = create_model(name, pe="default", tiny=True).eval()
    randomize_(src)
    official = {"model": _official_state_dict(src)}  # as torch.save'd by their training script, wrapped or not
    for pe in MODES:
        m = create_model(name, pe=pe, tiny=True).eval()
        result = load_pretrained(m, official, strict=pe == "default")  # PE norms: not in it
        assert sorted(result.missing_keys) == sorted(m.pe_norm_parameter_names())
        if pe == "default":
            x = torch.randn(2, 3, 16, 16)
            with torch.no_grad():
                torch.testing.assert_close(m(x), src(x), rtol=0, atol=0)
    sine = create_model(name, pe="default", tiny=True, pos_embed="sincos1d")  # the official "_sine" variants
    table = sine.pos_embed.clone()
    with pytest.raises(ValueError, match="not the fixed 'sincos1d' table"):  # a learned PE is not a sine table
        load_pretrained(sine, official)
    official_sine = {**official["model"], "classifier.positional_emb": table.clone()}
    load_pretrained(sine, official_sine, strict=True)
    torch.testing.assert_close(sine.pos_embed, table, rtol=0, atol=0)


def test_official_sine_pe_is_sincos1d():
    """Compact-Transformers' ``sinusoidal_embedding(n, dim)`` (no class token with sequence pooling) is the 1-D
    table over the n tokens."""
    m = create_model("cct_7_3x1_32", pe="mpvg", tiny=True, pos_embed="sincos1d")
    n, d = m.patch_embed.num_patches, m.embed_dim
    np.testing.assert_allclose(m.pos_embed[0].double().numpy(), _t2t_sinusoid(n, d), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- ONNX


ONNX_MODELS = ["deit_tiny_distilled_patch16_224", "cvt_7_4_32", "cct_7_3x1_32"]


@pytest.mark.parametrize("name", ONNX_MODELS)
@pytest.mark.parametrize("pe", MODES)
def test_onnx_of_tiny_variants(name, pe, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed here; the timm venv has onnx + onnxruntime")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed here; run in the timm venv")
    from mpvg_kernels.export import custom_domain_ops, export_model

    torch.manual_seed(0)
    m = create_model(name, pe=pe, tiny=True, in_chans=1, num_classes=10).eval()
    randomize_(m)
    result = export_model(m, tmp_path / f"{name}-{pe}.onnx", "onnx")
    assert custom_domain_ops(result.path) == set()
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    size = m.default_cfg["input_size"][1]
    for b in (1, 3):
        x = torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(b))
        got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            expect = m(x)
        assert got.shape == expect.shape == (b, 10)
        torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
