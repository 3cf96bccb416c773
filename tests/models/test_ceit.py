"""CeiT family: parameter counts (CeiT-Ti/S, every mode, against MPVG Table 1), every mode of the tiny variant against
an independent plain-PyTorch CeiT written here from the CeiT and MPVG/LaPE equations (float64, logits and gradients,
eval and train BatchNorm), the PE cache (cache == live == given terms, invalidation), ONNX export, the analysis
intermediates and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpvg_kernels as mk
from mpvg_kernels.models import count_parameters, create_model
from mpvg_kernels.models.ceit import CeiT

TINY = "ceit_tiny_patch16_224"
SMALL_NAME = "ceit_small_patch16_224"
ATOL, RTOL = 1e-10, 1e-8  # float64
# the tiny variant (registry "tiny" kwargs) with 5 classes; depth 3 where a knob needs more blocks
TINY_KW = dict(img_size=32, patch_size=2, stem_chans=16, embed_dim=32, depth=2, num_heads=2, num_classes=5)

# ----------------------------------------------------------------------------- an independent CeiT

# mode: (layer-wise, PE at block 0, hierarchical, tokens + PE before block 0, last-LN PE source)
MODE_DEFAULTS = {
    "default": (False, False, False, True, None),
    "lape": (True, True, True, False, None),
    "pvg": (True, False, True, True, None),
    "mpvg": (True, False, True, True, 0),
}


class RefLeFF(nn.Module):
    """Token-wise linear up + BN + GELU, depthwise conv on the grid + BN + GELU, linear down + BN (CeiT Eqs. 4-6
    as the official code runs them: no GELU after the last BN unless ``out_act``, the paper's Eq. 6)."""

    def __init__(self, dim, hidden, grid, out_act=False):
        super().__init__()
        self.grid, self.out_act = grid, out_act
        self.up = nn.Linear(dim, hidden)
        self.bn_up = nn.BatchNorm1d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.bn_dw = nn.BatchNorm2d(hidden)
        self.down = nn.Linear(hidden, dim)
        self.bn_down = nn.BatchNorm1d(dim)

    def forward(self, t):  # t: patch tokens [B, N, D]
        B, N, _ = t.shape
        h, w = self.grid
        u = F.gelu(self.bn_up(self.up(t).reshape(B * N, -1)))  # BN over the B*N token positions per channel
        g = u.reshape(B, h, w, -1).permute(0, 3, 1, 2)
        g = F.gelu(self.bn_dw(self.dw(g)))
        u = g.permute(0, 2, 3, 1).reshape(B * N, -1)
        u = self.bn_down(self.down(u))
        return (F.gelu(u) if self.out_act else u).reshape(B, N, -1)


class RefBlock(nn.Module):
    def __init__(self, dim, heads, hidden, grid, with_pe, eps, out_act=False):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.pos_ln = nn.LayerNorm(dim, eps=eps) if with_pe else None
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.leff = RefLeFF(dim, hidden, grid, out_act)


def _softmax_attention(q, k, v, heads):
    B, Tq, D = q.shape
    Tk = k.shape[1]
    d = D // heads
    q = q.reshape(B, Tq, heads, d).transpose(1, 2)
    k = k.reshape(B, Tk, heads, d).transpose(1, 2)
    v = v.reshape(B, Tk, heads, d).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    return (w @ v).transpose(1, 2).reshape(B, Tq, D)


class RefCeiT(nn.Module):
    """Plain CeiT: I2T -> [class token] -> + pos -> blocks (MSA on LN1(x) [+ PE term], LeFF on LN2(x) with the class
    row passed through) -> per-layer readouts (class token or patch mean) + layer embedding -> LCA (the last token
    queries all) -> LN (+ the readout of LN'_last(p)) -> head."""

    def __init__(
        self,
        mode,
        pool,
        class_token=True,
        img=32,
        patch=2,
        chans=3,
        stem=16,
        dim=32,
        depth=2,
        heads=2,
        ratio=4,
        classes=5,
        eps=1e-6,
        **knobs,
    ):
        super().__init__()
        layerwise, layer0, hier, x_plus_pe, last = MODE_DEFAULTS[mode]
        self.layer0 = knobs.get("layer0", layer0)
        self.hier = knobs.get("hier", hier)
        self.x_plus_pe = knobs.get("x_plus_pe", x_plus_pe)
        self.last = knobs.get("last", last)
        self.pool, self.heads = pool, heads
        self.P = 1 if class_token else 0
        conv_side = -(-img // 2)  # the stride-2 conv (padding 3) and the stride-2 max-pool (padding 1) round up
        side = -(-conv_side // 2) // patch
        self.grid = (side, side)
        self.stem_conv = nn.Conv2d(chans, stem, 7, stride=2, padding=3, bias=False)
        self.stem_bn = nn.BatchNorm2d(stem)
        self.tok = nn.Conv2d(stem, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos = nn.Parameter(torch.zeros(1, side * side + self.P, dim))
        self.blocks = nn.ModuleList(
            RefBlock(
                dim,
                heads,
                dim * ratio,
                self.grid,
                layerwise and (i > 0 or self.layer0),
                eps,
                knobs.get("out_act", False),
            )
            for i in range(depth)
        )
        self.layer_pos = nn.Parameter(torch.zeros(1, depth, dim))
        self.lca_ln1 = nn.LayerNorm(dim, eps=eps)
        self.lca_qkv = nn.Linear(dim, 3 * dim)
        self.lca_proj = nn.Linear(dim, dim)
        self.lca_ln2 = nn.LayerNorm(dim, eps=eps)
        self.lca_fc1 = nn.Linear(dim, dim * ratio)
        self.lca_fc2 = nn.Linear(dim * ratio, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.last_pos_ln = nn.LayerNorm(dim, eps=eps) if self.last is not None else None
        self.head = nn.Linear(dim, classes)

    def readout(self, t):
        return t[:, 0] if self.pool == "cls" else t[:, self.P :].mean(dim=1)

    def forward(self, img, everything=False):
        f = F.max_pool2d(self.stem_bn(self.stem_conv(img)), 3, stride=2, padding=1)
        x = self.tok(f).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        if self.x_plus_pe:
            x = x + self.pos
        terms, reads, prev = [], [], self.pos
        for blk in self.blocks:
            a = blk.ln1(x)
            term = None
            if blk.pos_ln is not None:
                term = blk.pos_ln(prev if self.hier else self.pos)
                prev = term if self.hier else prev
                a = a + term
            terms.append(term)
            q, k, v = blk.qkv(a).chunk(3, dim=-1)
            x = x + blk.proj(_softmax_attention(q, k, v, self.heads))
            y = blk.ln2(x)
            x = x + torch.cat([y[:, : self.P], blk.leff(y[:, self.P :])], dim=1)
            reads.append(self.readout(x))
        r = torch.stack(reads, dim=1) + self.layer_pos
        q, k, v = self.lca_qkv(self.lca_ln1(r)).chunk(3, dim=-1)
        z = r[:, -1:] + self.lca_proj(_softmax_attention(q[:, -1:], k, v, self.heads))
        z = z + self.lca_fc2(F.gelu(self.lca_fc1(self.lca_ln2(z))))
        y = self.norm(z)[:, 0]
        if self.last is not None:
            k = self.last % len(self.blocks)
            y = y + self.readout(self.last_pos_ln(self.pos if k == 0 else terms[k]))
        logits = self.head(y)
        if everything:
            return {"logits": logits, "pos_terms": terms, "readouts": reads, "features": y, "lca_out": z}
        return logits


_BLOCK_NAMES = {
    "norm1.weight": "ln1.weight",
    "norm1.bias": "ln1.bias",
    "norm1.pos_weight": "pos_ln.weight",
    "norm1.pos_bias": "pos_ln.bias",
    "attn.qkv": "qkv",
    "attn.proj": "proj",
    "norm2": "ln2",
    "leff.conv1": "leff.up",
    "leff.bn1": "leff.bn_up",
    "leff.conv2": "leff.dw",
    "leff.bn2": "leff.bn_dw",
    "leff.conv3": "leff.down",
    "leff.bn3": "leff.bn_down",
}
_TOP_NAMES = {
    "i2t.backbone.conv": "stem_conv",
    "i2t.backbone.bn": "stem_bn",
    "i2t.proj": "tok",
    "cls_token": "cls",
    "pos_embed": "pos",
    "pos_layer_embed": "layer_pos",
    "lca.norm1": "lca_ln1",
    "lca.attn.qkv": "lca_qkv",
    "lca.attn.proj": "lca_proj",
    "lca.norm2": "lca_ln2",
    "lca.feedforward.fc1": "lca_fc1",
    "lca.feedforward.fc2": "lca_fc2",
    "norm.pos_weight": "last_pos_ln.weight",
    "norm.pos_bias": "last_pos_ln.bias",
    "norm": "norm",
    "head": "head",
}


def ref_name(name: str) -> str:
    """CeiT state-dict key -> RefCeiT key (longest matching prefix)."""
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        table, prefix = _BLOCK_NAMES, f"blocks.{i}."
    else:
        table, prefix, rest = _TOP_NAMES, "", name
    for key in sorted(table, key=len, reverse=True):
        if rest == key or rest.startswith(key + "."):
            return prefix + table[key] + rest[len(key) :]
    raise KeyError(name)


def copy_into_ref(model: nn.Module, ref: nn.Module) -> None:
    """Every parameter and buffer of ``model`` into ``ref`` (1x1 conv weights -> Linear weights)."""
    theirs = ref.state_dict()
    new = {}
    for k, v in model.state_dict().items():
        r = ref_name(k)
        new[r] = v.reshape(theirs[r].shape).clone()
    assert set(new) == set(theirs), set(new) ^ set(theirs)
    ref.load_state_dict(new)


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere a wrong PE term, readout or BatchNorm statistic would show: LayerNorm and
    BatchNorm affines away from 1/0, a large PE, a non-zero layer embedding, random running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name in ("pos_embed", "pos_layer_embed", "cls_token"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype))
    model.clear_pe_cache()


def _pair(pe, pool=None, kw=None, rkw=None, depth=2, seed=0):
    kw, rkw = dict(kw or {}), dict(rkw or {})
    torch.manual_seed(seed)
    model = CeiT(pe=pe, pool=pool, **{**TINY_KW, "depth": depth}, **kw).double()
    randomize_(model, seed)
    ref = RefCeiT(pe, model.pool, class_token=model.has_class_token, depth=depth, **rkw).double()
    copy_into_ref(model, ref)
    return model, ref


def _images(b=3, seed=1, size=32, chans=3):
    return torch.randn(b, chans, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_logits_and_grads(model, ref, x):
    w = torch.randn(x.shape[0], 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out, expect = model(x), ref(x)
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
    (out * w).sum().backward()
    (expect * w).sum().backward()
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = theirs[ref_name(name)]
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(
            p.grad, q.grad.reshape(p.shape), atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}"
        )


# (pe, pool, model knobs, reference knobs, depth)
CASES = [
    ("default", None, {}, {}, 2),
    ("lape", None, {}, {}, 2),
    ("pvg", None, {}, {}, 2),
    ("mpvg", None, {}, {}, 2),
    ("default", "avg", {}, {}, 2),
    ("lape", "avg", {}, {}, 2),
    ("pvg", "cls", {}, {}, 2),
    ("mpvg", "cls", {}, {}, 2),
    ("pvg", "avg", {"class_token": False}, {}, 2),
    ("mpvg", "avg", {"class_token": False}, {}, 2),
    ("lape", "cls", {"hierarchical": False}, {"hier": False}, 3),
    ("mpvg", "avg", {"include_layer0": True}, {"layer0": True}, 3),
    ("mpvg", "avg", {"hierarchical": False}, {"hier": False}, 3),
    ("mpvg", "avg", {"add_pos_to_input": False}, {"x_plus_pe": False}, 3),
    ("mpvg", "avg", {"last_pos": 1}, {"last": 1}, 3),
    ("mpvg", "cls", {"last_pos": -1}, {"last": 2}, 3),
    ("default", "cls", {"last_pos": 0}, {"last": 0}, 2),
    ("mpvg", "avg", {"leff_out_act": True}, {"out_act": True}, 2),  # the paper's GELU after LeFF's last BN
]


def _ids(case):
    pe, pool, kw, _, depth = case
    return f"{pe}-{pool or 'auto'}-d{depth}" + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_mode_matches_independent_reference_eval(case):
    """Eval mode (BatchNorm with its running statistics): logits and every gradient."""
    pe, pool, kw, rkw, depth = case
    model, ref = _pair(pe, pool, kw, rkw, depth)
    model.eval()
    ref.eval()
    _check_logits_and_grads(model, ref, _images())


@pytest.mark.parametrize("pe", ["default", "mpvg"])
def test_mode_matches_independent_reference_train(pe):
    """Train mode: BatchNorm uses the batch statistics and updates its running ones identically."""
    model, ref = _pair(pe)
    model.train()
    ref.train()
    _check_logits_and_grads(model, ref, _images(b=4))
    theirs = ref.state_dict()
    for k, v in model.state_dict().items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(v, theirs[ref_name(k)].reshape(v.shape), atol=ATOL, rtol=RTOL, msg=k)


def test_registered_tiny_variant_every_mode_in_chans_1():
    """The registered tiny variant runs every mode on 1-channel 32x32 images with a 4x4 token grid."""
    for pe in mk.models.PE_MODES:
        m = create_model(TINY, pe=pe, tiny=True, in_chans=1, num_classes=10)
        assert m.patch_embed.grid_size == (4, 4) and m.default_cfg["input_size"] == (1, 32, 32)
        x = torch.randn(2, 1, 32, 32)
        out = m(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        out.sum().backward()
        assert all(p.grad is not None for p in m.parameters())


# ----------------------------------------------------------------------------- parameter counts

# exact counts: CeiT-Ti 6,356,904 (the official code's count), + 2D per LN' (12 for lape, 11 for pvg, 11 + LN'_last
# for mpvg); the class token and its PE row are kept by default (see the module docstring)
EXPECTED = {
    (TINY, "default"): 6_356_904,
    (TINY, "lape"): 6_361_512,
    (TINY, "pvg"): 6_361_128,
    (TINY, "mpvg"): 6_361_512,
    (SMALL_NAME, "default"): 24_204_840,
    (SMALL_NAME, "lape"): 24_214_056,
    (SMALL_NAME, "pvg"): 24_213_288,
    (SMALL_NAME, "mpvg"): 24_214_056,
}
# MPVG Table 1 (M), CeiT-Ti
PAPER_TINY_M = {"default": 6.356, "lape": 6.361, "pvg": 6.361, "mpvg": 6.361}


def _count(name, pe, **kw):
    with torch.device("meta"):
        return count_parameters(create_model(name, pe=pe, **kw))


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}-{k[1]}")
def test_parameter_counts(key):
    name, pe = key
    n = _count(name, pe)
    assert n == EXPECTED[key]
    if name == TINY:
        assert abs(n / 1e6 - PAPER_TINY_M[pe]) < 0.0015
        assert int(n / 1e3) / 1e3 == PAPER_TINY_M[pe]  # the paper's three decimals, truncated


def test_parameter_counts_of_the_variants():
    d = 192
    base = EXPECTED[(TINY, "default")]
    assert _count(TINY, "pvg", class_token=False) == base + 11 * 2 * d - 2 * d  # no class token, no class PE row
    assert _count(TINY, "mpvg", pool="cls") == base + 12 * 2 * d
    assert _count(TINY, "default", pool="avg") == base
    # CeiT paper: 6.4 M and 24.2 M
    assert round(EXPECTED[(TINY, "default")] / 1e6, 1) == 6.4
    assert round(EXPECTED[(SMALL_NAME, "default")] / 1e6, 1) == 24.2


def test_modes_place_pe_where_the_table_says():
    expect = {
        "default": ((False, False), True, None, "cls"),
        "lape": ((True, True), False, None, "cls"),
        "pvg": ((False, True), True, None, "avg"),
        "mpvg": ((False, True), True, 0, "avg"),
    }
    for pe, (blocks, add_pos, last, pool) in expect.items():
        m = CeiT(pe=pe, **TINY_KW)
        assert m.block_uses_pos == blocks and m.add_pos_to_input == add_pos and m.last_pos == last
        assert m.pool == pool and m.has_class_token and m.num_prefix_tokens == 1
        assert m.pos_embed.shape == (1, 17, 32) and m.pos_layer_embed.shape == (1, 2, 32)
        assert [isinstance(b.norm1, mk.layers.DualLayerNorm) for b in m.blocks] == list(blocks)
        assert len(m.pe_norm_parameter_names()) == 2 * (sum(blocks) + (last is not None))
        assert m.norm.use_pos == (last is not None)


# ----------------------------------------------------------------------------- PE cache


@pytest.mark.parametrize("pe,pool", [("lape", "cls"), ("pvg", "avg"), ("mpvg", "avg"), ("mpvg", "cls")])
def test_cache_equals_live_equals_given_terms(pe, pool):
    model, ref = _pair(pe, pool)
    model.eval()
    x = _images()
    with torch.no_grad():
        expect = ref.eval()(x)
        cached = model(x)
        again = model(x)
        assert model.pe_cache.misses == 1 and model.pe_cache.hits == 1
        given = model(x, pe_terms=model.compute_pe_terms())
        model.pe_cache_enabled = False
        live = model(x)
    with_grad = model(x)  # gradients needed: computed along the walk with the fused ops
    for out in (cached, again, given, live, with_grad):
        torch.testing.assert_close(out, expect, atol=ATOL, rtol=RTOL)
    terms = model.compute_pe_terms()
    assert len(terms.terms) == 2 and (terms.pooled_bias is not None) == (pe == "mpvg" and pool == "avg")
    assert (terms.last_term is not None) == (pe == "mpvg")


def test_pe_tensors_cover_every_term_input():
    model, _ = _pair("mpvg")
    names = {id(p): n for n, p in model.named_parameters()}
    listed = {names[id(t)] for t in model._pe_tensors()}
    assert listed == {
        "pos_embed",
        "blocks.1.norm1.pos_weight",
        "blocks.1.norm1.pos_bias",
        "norm.bias",
        "norm.pos_weight",
        "norm.pos_bias",
    }


def test_load_official_layout_checkpoint_into_every_mode():
    """An official-CeiT-layout state dict (the default model's keys) loads into every mode; only the PE
    LayerNorms are missing, and the class token and its PE row are dropped for ``class_token=False``."""
    from mpvg_kernels.models import load_pretrained

    src, _ = _pair("default")
    sd = src.state_dict()
    for pe, kw in [("lape", {}), ("pvg", {}), ("mpvg", {}), ("mpvg", {"class_token": False})]:
        m = CeiT(pe=pe, **TINY_KW, **kw).double()
        res = load_pretrained(m, sd, strict=False)  # the PE norms are not in it
        assert sorted(res.missing_keys) == sorted(m.pe_norm_parameter_names()) and not res.unexpected_keys
        torch.testing.assert_close(m.i2t.proj.weight, src.i2t.proj.weight)
        npt = m.num_prefix_tokens
        torch.testing.assert_close(m.pos_embed, src.pos_embed[:, 1 - npt :])


@pytest.mark.parametrize("pe", ["lape", "mpvg"])
def test_cache_invalidated_by_optimizer_step_and_load_state_dict(pe):
    model, _ = _pair(pe)
    model.eval()
    x = _images()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        before = model(x)
    model(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after = model(x)
        model.pe_cache_enabled = False
        live = model(x)
        model.pe_cache_enabled = True
    torch.testing.assert_close(after, live, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(before, after)
    other, _ = _pair(pe, seed=3)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), other.eval()(x), atol=ATOL, rtol=RTOL)


def test_grad_checkpointing_same_grads():
    a, _ = _pair("mpvg")
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    x = _images()
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-9, rtol=1e-7, msg=n)


def test_dynamic_img_size_resamples_the_pe():
    model, _ = _pair("mpvg", kw={"dynamic_img_size": True})
    model.eval()
    with torch.no_grad():
        big = model(_images(size=48))  # 6x6 grid
        live = model(_images(size=48), pe_terms=model.compute_pe_terms((6, 6)))
    assert big.shape == (3, 5)
    torch.testing.assert_close(big, live, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- analysis, contract, errors


def test_forward_analysis_matches_the_reference():
    model, ref = _pair("mpvg", depth=3)
    model.eval()
    ref.eval()
    x = _images()
    with torch.no_grad():
        it = model.forward_analysis(x)
        r = ref(x, everything=True)
    keys = {
        "block_inputs",
        "token_terms",
        "pos_terms",
        "attn_inputs",
        "last_norm_input",
        "last_norm_output",
        "last_pos_term",
        "features",
        "pooled",
        "logits",
        "grid",
        "num_prefix_tokens",
    }
    assert keys <= set(it)
    torch.testing.assert_close(it["logits"], r["logits"], atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        torch.testing.assert_close(it["logits"], model(x), atol=ATOL, rtol=RTOL)
    assert it["pos_terms"][0] is None and len(it["block_inputs"]) == 3 and len(it["token_terms"]) == 3
    for mine, theirs in zip(it["pos_terms"][1:], r["pos_terms"][1:], strict=True):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=RTOL)
    for mine, theirs in zip(it["readouts"], r["readouts"], strict=True):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=RTOL)
    for tok, term, a in zip(it["token_terms"], it["pos_terms"], it["attn_inputs"], strict=True):
        torch.testing.assert_close(a, tok if term is None else tok + term)
    torch.testing.assert_close(it["last_norm_input"], r["lca_out"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(it["pooled"], r["features"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(it["features"], it["last_norm_output"] + it["last_pos_readout"])
    ln = model.norm
    torch.testing.assert_close(
        it["last_pos_term"], F.layer_norm(model.pos_embed, (32,), ln.pos_weight, ln.pos_bias, 1e-6)
    )
    assert it["last_pos_term"].shape == (1, 17, 32) and it["grid"] == (4, 4) and it["num_prefix_tokens"] == 1


def test_contract():
    m = create_model(TINY, pe="mpvg", tiny=True)
    cfg = m.default_cfg
    for k in (
        "architecture",
        "input_size",
        "mean",
        "std",
        "num_classes",
        "crop_pct",
        "interpolation",
        "pe",
        "pool",
        "first_conv",
        "classifier",
    ):
        assert k in cfg, k
    assert cfg["architecture"] == TINY and cfg["pe"] == "mpvg" and cfg["pool"] == "avg"
    names = dict(m.named_parameters())
    assert cfg["first_conv"] + ".weight" in names and cfg["classifier"] + ".weight" in names
    assert m.get_classifier() is m.head and m.no_weight_decay() == {"pos_embed", "cls_token"}
    assert m.pe_norm_parameter_names() == [
        "blocks.1.norm1.pos_weight",
        "blocks.1.norm1.pos_bias",
        "norm.pos_weight",
        "norm.pos_bias",
    ]
    feats = m.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 32) and m.forward_head(feats).shape == (2, 1000)
    assert m.forward_head(feats, pre_logits=True) is feats
    m.reset_classifier(7, global_pool="token")
    assert m.pool == "cls" and m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    m.reset_classifier(0)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    gm = m.group_matcher()
    assert set(gm) == {"stem", "blocks"}
    assert isinstance(m.blocks[0], mk.models.ceit.CeiTBlock) and m.patch_embed is m.i2t


def test_errors():
    with pytest.raises(ValueError, match="pool='cls' feeds the class token"):
        CeiT(pe="lape", pool="cls", class_token=False, **TINY_KW)
    with pytest.raises(ValueError, match="pool='cls' feeds the class token"):
        CeiT(pe="default", class_token=False, **TINY_KW)  # default pools the class token
    with pytest.raises(ValueError, match="layer-wise"):
        CeiT(pe="default", hierarchical=False, **TINY_KW)
    with pytest.raises(ValueError, match="block 1 takes no PE"):
        CeiT(pe="default", last_pos=1, **TINY_KW)
    with pytest.raises(ValueError, match="last_pos must be in"):
        CeiT(pe="mpvg", last_pos=2, **TINY_KW)
    with pytest.raises(ValueError, match="pe must be one of"):
        CeiT(pe="rope", **TINY_KW)
    with pytest.raises(ValueError, match="pool must be one of"):
        CeiT(pe="mpvg", pool="max", **TINY_KW)
    with pytest.raises(ValueError, match="gives no token"):
        CeiT(pe="mpvg", **{**TINY_KW, "img_size": 4})
    with pytest.raises(ValueError, match="leff_kernel_size must be odd"):
        CeiT(pe="mpvg", leff_kernel_size=2, **TINY_KW)
    with pytest.raises(ValueError, match="not divisible"):
        CeiT(pe="mpvg", **{**TINY_KW, "num_heads": 3})
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        CeiT(pe="mpvg", **TINY_KW)(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="expected images"):
        CeiT(pe="mpvg", **TINY_KW)(torch.randn(3, 32, 32))
    m = CeiT(pe="default", add_pos_to_input=False, **TINY_KW)
    assert m.pos_embed is None and m.compute_pe_terms() is None and m(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# ----------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("pe", mk.models.PE_MODES)
def test_onnx_export_every_mode(pe, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
    ort = pytest.importorskip("onnxruntime", reason="running the exported graph needs onnxruntime")
    from mpvg_kernels import export as E

    torch.manual_seed(0)
    m = create_model(TINY, pe=pe, tiny=True, in_chans=1, num_classes=10)
    randomize_(m)
    m.eval()
    result = E.export_model(m, tmp_path / f"ceit-{pe}.onnx", "onnx", verify=True)
    path = tmp_path / f"ceit-{pe}.onnx"
    assert E.custom_domain_ops(path) == set()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        x = torch.randn(b, 1, 32, 32, generator=torch.Generator().manual_seed(b))
        got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            expect = m(x)
        assert got.shape == (b, 10)
        assert (got - expect).abs().max().item() <= 1e-4, (pe, b)
    assert result is not None


@pytest.mark.parametrize("kind", ["sincos1d", "sincos2d"])
def test_fixed_sincos_pe_is_a_buffer_that_every_mode_normalises(kind):
    from mpvg_kernels.layers.pos_embed import sincos_pos_embed

    learned = create_model("ceit_tiny_patch16_224", pe="mpvg", tiny=True)
    m = create_model("ceit_tiny_patch16_224", pe="mpvg", tiny=True, pos_embed=kind, dynamic_img_size=True)
    assert "pos_embed" not in dict(m.named_parameters()) and "pos_embed" in dict(m.named_buffers())
    assert count_parameters(learned) - count_parameters(m) == learned.pos_embed.numel()
    table = sincos_pos_embed(kind, m.i2t.grid_size, m.embed_dim, m.num_prefix_tokens)
    m.init_weights()
    torch.testing.assert_close(m.pos_embed, table, rtol=0, atol=0)
    with torch.no_grad():
        m.norm.pos_weight.fill_(1.5)
    terms = m.compute_pe_terms()
    torch.testing.assert_close(terms.last_term, m.norm.pos_term(table))  # LN'_last of the fixed table
    grid = m.i2t.grid_for(48, 48)  # another input size: the table is recomputed for the grid, not interpolated
    torch.testing.assert_close(m._pos_for_grid(grid), sincos_pos_embed(kind, grid, m.embed_dim, 1))
    assert m.eval()(torch.randn(2, 3, 48, 48)).shape == (2, m.num_classes)
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        create_model("ceit_tiny_patch16_224", tiny=True, pos_embed="rope")
