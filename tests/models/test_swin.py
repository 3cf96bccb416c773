"""Swin family: parameter counts against the papers, every mode against an independent plain-PyTorch Swin written
here from the Swin equations (logits and gradients, float64), the PE cache (live == cached == given terms,
invalidation through every tensor the terms depend on), forward_analysis, ONNX, configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpvg_kernels.models import count_parameters, create_model
from mpvg_kernels.models.swin import SwinTransformer

# Three stages (the PE crosses two patch mergings), shifted windows in stages 0 and 1, a 4x4 last stage whose
# window covers the map (no shift there, as timm).
SMALL = dict(img_size=32, patch_size=2, in_chans=3, num_classes=5, embed_dim=8, depths=(2, 2, 2),
             num_heads=(1, 2, 2), window_size=4, mlp_ratio=2.0)

TIMM_SWIN_T = 28_288_354  # timm swin_tiny_patch4_window7_224, relative bias only
TIMM_SWIN_S = 49_606_258  # timm swin_small_patch4_window7_224
APE = 56 * 56 * 96

# (pe, pos_embed, model knobs)
CASES = [
    ("default", "learn", {}),
    ("lape", "learn", {}),
    ("pvg", "learn", {}),
    ("mpvg", "learn", {}),
    ("default", "rpe", {}),
    ("lape", "rpe", {}),
    ("lape", "learn", {"rpe_norm": False}),
    ("pvg", "learn", {"hierarchical": False}),
    ("pvg", "learn", {"include_layer0": False}),
    ("mpvg", "learn", {"last_pos": 3}),
    ("mpvg", "learn", {"last_pos": -1, "hierarchical": False}),
    ("mpvg", "learn", {"add_pos_to_input": False}),
]


def _ids(case):
    pe, pos, kw = case
    return f"{pe}-{pos}" + "".join(f"-{k}={v}" for k, v in kw.items())


# ----------------------------------------------------------------------------- the independent reference


class RefSwin(nn.Module):
    """Swin written out from the equations: tokens on the (H, W) map; block l: x += W-MSA(LN1(x) [+ LN'_l(p_l)]),
    x += MLP(LN2(x)); windows gathered by coordinates, the relative bias B[h, i, j] = table[(dy + wh - 1) *
    (2ww - 1) + dx + ww - 1, h], shifted windows masked where two tokens of a window were not neighbours before
    the cyclic shift; patch merging [x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)] -> LN -> Linear.
    The PE p reaches stage s through the patch mergings; hierarchical p_l = the previous PE term."""

    def __init__(self, model: SwinTransformer):
        super().__init__()
        self.x_plus_pe = model.add_pos_to_input
        self.hier = model.hierarchical
        self.last = model.last_pos
        self.window_size = model.window_size
        self.dims = model.dims
        self.grids = model.grids
        self.depths = model.depths
        c0 = self.dims[0]
        conv = model.patch_embed.proj
        self.conv = nn.Conv2d(conv.in_channels, c0, conv.kernel_size, conv.stride)
        self.embed_ln = nn.LayerNorm(c0)
        self.pos = nn.Parameter(torch.zeros(1, self.grids[0][0] * self.grids[0][1], c0)) if (
            model.pos_embed is not None
        ) else None
        self.merges = nn.ModuleList(
            nn.ModuleDict({"ln": nn.LayerNorm(4 * self.dims[s - 1]), "lin": nn.Linear(4 * self.dims[s - 1],
                                                                                   self.dims[s], bias=False)})
            for s in range(1, len(self.dims))
        )
        self.blocks = nn.ModuleList()
        self.block_info = []
        for i, blk in enumerate(model.blocks):
            s = model.block_stage[i]
            d, heads = self.dims[s], blk.attn.num_heads
            g = self.grids[s]
            w = min(g[0], self.window_size)
            j = i - sum(self.depths[:s])
            shift = w // 2 if (j % 2 == 1 and g[0] > self.window_size) else 0
            n = w * w
            m = nn.ModuleDict({
                "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d), "ln2": nn.LayerNorm(d),
                "fc1": nn.Linear(d, int(d * 2.0)), "fc2": nn.Linear(int(d * 2.0), d),
            })
            m["table"] = _Table((2 * w - 1) ** 2, heads)
            if blk.use_pos:
                m["pos_ln"] = nn.LayerNorm(d)
            if blk.attn.rpe_norm is not None:
                m["rpe_ln"] = nn.LayerNorm(n)
            self.blocks.append(m)
            self.block_info.append((s, heads, w, shift))
        self.norm = nn.LayerNorm(self.dims[-1])
        self.last_pos_ln = nn.LayerNorm(self.dims[-1]) if self.last is not None else None
        self.fc = nn.Linear(self.dims[-1], model.num_classes)

    def merge(self, s, x):
        """Stage s's patch merging of x [B, H*W, C] on the grid of stage s - 1."""
        H, W = self.grids[s - 1]
        B, _, C = x.shape
        m = x.reshape(B, H, W, C)
        cat = torch.cat([m[:, 0::2, 0::2], m[:, 1::2, 0::2], m[:, 0::2, 1::2], m[:, 1::2, 1::2]], dim=-1)
        mod = self.merges[s - 1]
        return mod["lin"](mod["ln"](cat.reshape(B, -1, 4 * C)))

    def bring(self, p, s):
        cur = self.dims.index(p.shape[-1])
        for k in range(cur + 1, s + 1):
            p = self.merge(k, p)
        return p

    def attend(self, blk, a, s, heads, w, shift):
        H, W = self.grids[s]
        B, _, C = a.shape
        hd = C // heads
        m = a.reshape(B, H, W, C)
        m = torch.roll(m, shifts=(-shift, -shift), dims=(1, 2))
        out = torch.zeros_like(m)
        ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        rel = (ys[:, None] - ys[None, :] + w - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
        bias = blk["table"].table[rel].permute(2, 0, 1)  # [heads, N, N]
        if "rpe_ln" in blk:
            bias = blk["rpe_ln"](bias)
        for r0 in range(0, H, w):
            for c0 in range(0, W, w):
                tok = m[:, r0:r0 + w, c0:c0 + w].reshape(B, w * w, C)
                q, k, v = blk["qkv"](tok).split(C, dim=-1)
                q, k, v = (t.reshape(B, w * w, heads, hd).transpose(1, 2) for t in (q, k, v))
                logits = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
                # the rolled coordinates and where those tokens were before the roll: a pair is allowed when the
                # roll did not wrap between them (their offset is the same before and after)
                rr, cc = r0 + ys, c0 + xs
                orr, occ = (rr + shift) % H, (cc + shift) % W
                ok = ((orr[:, None] - orr[None, :]) == (rr[:, None] - rr[None, :])) & (
                    (occ[:, None] - occ[None, :]) == (cc[:, None] - cc[None, :]))
                logits = logits.masked_fill(~ok, float("-inf"))
                o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, w, w, C)
                out[:, r0:r0 + w, c0:c0 + w] = o
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return blk["proj"](out.reshape(B, H * W, C))

    def forward(self, img, everything=False):
        x = self.embed_ln(self.conv(img).flatten(2).transpose(1, 2))
        if self.x_plus_pe:
            x = x + self.pos
        p = self.pos
        terms = []
        for i, (blk, (s, heads, w, shift)) in enumerate(zip(self.blocks, self.block_info, strict=True)):
            if i == sum(self.depths[:s]) and s > 0:
                x = self.merge(s, x)
            a = blk["ln1"](x)
            term = None
            if "pos_ln" in blk:
                term = blk["pos_ln"](self.bring(p if self.hier else self.pos, s))
                if self.hier:
                    p = term
                a = a + term
            terms.append(term)
            x = x + self.attend(blk, a, s, heads, w, shift)
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["ln2"](x))))
        feats = self.norm(x)
        if self.last is not None:
            src = self.pos if self.last == 0 else terms[self.last]
            feats = feats + self.last_pos_ln(self.bring(src, len(self.dims) - 1))
        logits = self.fc(feats.mean(dim=1))
        return {"logits": logits, "features": feats, "pos_terms": terms} if everything else logits


class _Table(nn.Module):
    def __init__(self, rows, heads):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(rows, heads))


def ref_name(model: SwinTransformer, name: str) -> str:
    """Our parameter name -> the reference's."""
    parts = name.split(".")
    if name.startswith("patch_embed.proj."):
        return "conv." + parts[-1]
    if name.startswith("patch_embed.norm."):
        return "embed_ln." + parts[-1]
    if name == "pos_embed":
        return "pos"
    if name.startswith("layers.") and parts[2] == "downsample":
        sub = {"norm": "ln", "reduction": "lin"}[parts[3]]
        return f"merges.{int(parts[1]) - 1}.{sub}.{parts[-1]}"
    if name.startswith("layers."):
        s, j = int(parts[1]), int(parts[3])
        i = sum(model.depths[:s]) + j
        rest = ".".join(parts[4:])
        table = {
            "norm1.weight": "ln1.weight", "norm1.bias": "ln1.bias",
            "norm1.pos_weight": "pos_ln.weight", "norm1.pos_bias": "pos_ln.bias",
            "attn.qkv.weight": "qkv.weight", "attn.qkv.bias": "qkv.bias",
            "attn.proj.weight": "proj.weight", "attn.proj.bias": "proj.bias",
            "attn.relative_position_bias_table": "table.table",
            "attn.rpe_norm.pos_weight": "rpe_ln.weight", "attn.rpe_norm.pos_bias": "rpe_ln.bias",
            "norm2.weight": "ln2.weight", "norm2.bias": "ln2.bias",
            "mlp.fc1.weight": "fc1.weight", "mlp.fc1.bias": "fc1.bias",
            "mlp.fc2.weight": "fc2.weight", "mlp.fc2.bias": "fc2.bias",
        }
        return f"blocks.{i}.{table[rest]}"
    if name in ("norm.weight", "norm.bias"):
        return name
    if name.startswith("norm.pos_"):
        return "last_pos_ln." + {"pos_weight": "weight", "pos_bias": "bias"}[parts[-1]]
    if name.startswith("head.fc."):
        return "fc." + parts[-1]
    raise KeyError(name)


def randomize_(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * r)
            elif name == "pos_embed":
                p.copy_(0.5 * r)
            else:
                p.copy_(0.2 * r)
    if isinstance(model, SwinTransformer):
        model.clear_pe_cache()


def _pair(pe, pos, kw, seed=0, dtype=torch.float64, **extra):
    model = SwinTransformer(pe=pe, pos_embed=pos, **{**SMALL, **kw, **extra}).to(dtype)
    randomize_(model, seed)
    ref = RefSwin(model).to(dtype)
    ours = dict(model.named_parameters())
    theirs = dict(ref.named_parameters())
    mapped = {ref_name(model, n): n for n in ours}
    assert set(mapped) == set(theirs), sorted(set(mapped) ^ set(theirs))
    with torch.no_grad():
        for rn, n in mapped.items():
            assert theirs[rn].shape == ours[n].shape, (rn, n)
            theirs[rn].copy_(ours[n])
    return model, ref, mapped


def _images(b=2, seed=1, dtype=torch.float64, chans=3, size=32):
    return torch.randn(b, chans, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_mode_matches_independent_reference(case):
    pe, pos, kw = case
    model, ref, mapped = _pair(pe, pos, kw)
    x = _images()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w = torch.linspace(-1, 1, 5, dtype=torch.float64)
    ya, yb = model(xa), ref(xb)
    torch.testing.assert_close(ya, yb, atol=1e-10, rtol=1e-9)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-10, rtol=1e-9)
    theirs = dict(ref.named_parameters())
    ours = dict(model.named_parameters())
    for rn, n in mapped.items():
        assert ours[n].grad is not None, n
        torch.testing.assert_close(ours[n].grad, theirs[rn].grad, atol=1e-10, rtol=1e-9, msg=n)
    # the PE reaches the later stages: the terms of stage-1/2 blocks (and LN'_last) depend on the merging weights
    if pe in ("pvg", "mpvg") and pos == "learn":
        assert model.layers[1].downsample.reduction.weight.grad.abs().sum() > 0
    # the features and every block's PE term
    feats = ref(x, everything=True)
    with torch.no_grad():
        terms = model.compute_pe_terms()
    if terms is None:
        assert model.pos_embed is None
    else:
        for t, r in zip(terms.terms, feats["pos_terms"], strict=True):
            assert (t is None) == (r is None)
            if t is not None:
                torch.testing.assert_close(t, r.detach(), atol=1e-10, rtol=1e-9)


def test_modes_place_pe_where_expected():
    for pe, uses, last, rpe in (("default", 0, False, False), ("lape", 6, False, True), ("pvg", 6, False, False),
                                ("mpvg", 6, True, False)):
        m = SwinTransformer(pe=pe, **SMALL)
        assert sum(b.use_pos for b in m.blocks) == uses and m.has_last_pos == last and m.pool == "avg"
        assert all((b.attn.rpe_norm is not None) == rpe for b in m.blocks)
        assert m.add_pos_to_input == (pe != "lape") and m.pos_embed is not None
    m = SwinTransformer(pe="lape", pos_embed="rpe", **SMALL)
    assert m.pos_embed is None and not any(b.use_pos for b in m.blocks) and m.compute_pe_terms() is None
    assert m.pe_norm_parameter_names() == [n for n, _ in m.named_parameters() if ".attn.rpe_norm." in n]
    # LaPE's LayerNorm of the relative bias normalises over the keys of a window: [N] parameters
    assert m.blocks[0].attn.rpe_norm.pos_weight.shape == (16,)


# ----------------------------------------------------------------------------- parameter counts


def _count(name, pe, **kw):
    with torch.device("meta"):
        return count_parameters(create_model(name, pe=pe, **kw))


def test_param_counts_swin_tiny():
    counts = {pe: _count("swin_tiny_patch4_window7_224", pe) for pe in ("default", "lape", "pvg", "mpvg")}
    ln_prime = 2 * (2 * 96 + 2 * 192 + 6 * 384 + 2 * 768)
    assert ln_prime == 8_832
    rpe_ln = 12 * 2 * 49
    assert counts == {
        "default": TIMM_SWIN_T + APE,  # 28,589,410
        "lape": TIMM_SWIN_T + APE + ln_prime + rpe_ln,  # 28,599,418
        "pvg": TIMM_SWIN_T + APE + ln_prime,  # 28,598,242
        "mpvg": TIMM_SWIN_T + APE + ln_prime + 2 * 768,  # 28,599,778
    }
    paper = {"default": 28.589, "lape": 28.599, "pvg": 28.598, "mpvg": 28.599}  # MPVG Table 1
    for pe, n in counts.items():
        assert abs(n / 1e6 - paper[pe]) < 0.0015, (pe, n)
        assert math.floor(n / 1e3) / 1e3 == pytest.approx(paper[pe])  # the paper truncates to 3 decimals
    assert _count("swin_tiny_patch4_window7_224", "default", pos_embed="rpe") == TIMM_SWIN_T
    assert _count("swin_tiny_patch4_window7_224", "lape", pos_embed="rpe") == TIMM_SWIN_T + rpe_ln


def test_param_counts_swin_small():
    ln_prime = 2 * (2 * 96 + 2 * 192 + 18 * 384 + 2 * 768)
    rpe_ln = 24 * 2 * 49
    assert _count("swin_small_patch4_window7_224", "default", pos_embed="rpe") == TIMM_SWIN_S
    assert _count("swin_small_patch4_window7_224", "lape", pos_embed="rpe") == TIMM_SWIN_S + rpe_ln
    assert _count("swin_small_patch4_window7_224", "default") == TIMM_SWIN_S + APE
    assert _count("swin_small_patch4_window7_224", "lape") == TIMM_SWIN_S + APE + ln_prime + rpe_ln
    assert _count("swin_small_patch4_window7_224", "pvg") == TIMM_SWIN_S + APE + ln_prime
    assert _count("swin_small_patch4_window7_224", "mpvg") == TIMM_SWIN_S + APE + ln_prime + 1_536


# ----------------------------------------------------------------------------- PE cache


def _cache_model(pe="mpvg", seed=0, **kw):
    model = SwinTransformer(pe=pe, **{**SMALL, **kw})
    randomize_(model, seed)
    return model.eval()


def _live(model, x):
    """Logits with every PE term computed along the walk (grad mode on: the cache is never served)."""
    with torch.enable_grad():
        return model(x).detach()


@pytest.mark.parametrize("pe", ["default", "lape", "pvg", "mpvg"])
def test_cache_live_and_given_terms_agree(pe):
    model = _cache_model(pe)
    x = _images(dtype=torch.float32)
    live = _live(model, x)
    assert model.pe_cache.hits == 0 and model.pe_cache.misses == 0
    with torch.no_grad():
        cached1 = model(x)
        cached2 = model(x)
        given = model(x, pe_terms=model.compute_pe_terms())
        feats = model.forward_features(x)
    assert model.pe_cache.hits >= 1
    torch.testing.assert_close(cached1, live, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached1, cached2, atol=0, rtol=0)
    torch.testing.assert_close(given, cached1, atol=0, rtol=0)
    torch.testing.assert_close(model.forward_head(feats), live, atol=1e-5, rtol=1e-4)
    # float64: the live and the cached path are the same functions
    m64 = _cache_model(pe).double()
    x64 = _images()
    with torch.no_grad():
        cached = m64(x64)
    torch.testing.assert_close(cached, _live(m64, x64), atol=1e-12, rtol=1e-12)


def test_pe_tensors_cover_the_downsample_layers():
    model = _cache_model()
    ids = {id(t) for t in model._pe_tensors()}
    for s in (1, 2):
        for p in model.layers[s].downsample.parameters():
            assert id(p) in ids
    assert id(model.pos_embed) in ids and id(model.norm.pos_weight) in ids and id(model.norm.bias) in ids
    with torch.no_grad():
        terms = model.compute_pe_terms()
    assert terms.last_term.shape == (1, 16, 32) and terms.pooled_bias.shape == (32,)
    torch.testing.assert_close(terms.pooled_bias, model.norm.bias + terms.last_term.mean(dim=(0, 1)))
    assert [t.shape[-2:] for t in terms.terms] == [(256, 8)] * 2 + [(64, 16)] * 2 + [(16, 32)] * 2


def _edit_then_expect_change(model, edit):
    x = _images(dtype=torch.float32)
    with torch.no_grad():
        before = model(x)
    edit(model)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, _live(model, x), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(after, before, atol=1e-4), "the edit did not change the output: test is vacuous"


@pytest.mark.parametrize(
    "make_opt",
    [lambda ps: torch.optim.SGD(ps, lr=0.5), lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True)],
    ids=["sgd", "adamw-fused"],
)
def test_cache_invalidated_by_optimizer_step(make_opt):
    model = _cache_model()
    # only the merging layers the PE passes through: the cache must see them change
    opt = make_opt([model.layers[1].downsample.reduction.weight, model.layers[2].downsample.norm.weight])

    def step(m):
        m.train()
        m(_images(seed=3, dtype=torch.float32)).square().sum().backward()
        opt.step()
        m.eval()

    _edit_then_expect_change(model, step)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.pos_embed.mul_(1.5),
        lambda m: m.layers[2].downsample.reduction.weight.mul_(-1.0),
        lambda m: m.layers[1].blocks[0].norm1.pos_bias.add_(1.0),
        lambda m: m.norm.pos_weight.mul_(3.0),
    ],
    ids=["pos_embed", "downsample", "block-pos_bias", "last-pos_weight"],
)
def test_cache_invalidated_by_inplace_edit(edit):
    def run(m):
        with torch.no_grad():
            edit(m)

    _edit_then_expect_change(_cache_model(), run)


def test_cache_invalidated_by_load_state_dict():
    model = _cache_model()
    other = _cache_model(seed=4)
    _edit_then_expect_change(model, lambda m: m.load_state_dict(other.state_dict()))


def test_grad_checkpointing_same_grads():
    model, _, _ = _pair("mpvg", "learn", {})
    x = _images()
    model(x).sum().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g[n], msg=n)


# ----------------------------------------------------------------------------- contract


def test_forward_analysis():
    model, ref, _ = _pair("mpvg", "learn", {})
    x = _images()
    out = model.forward_analysis(x)
    keys = {"block_inputs", "token_terms", "pos_terms", "attn_inputs", "last_norm_input", "last_norm_output",
            "last_pos_term", "features", "pooled", "logits", "grid", "num_prefix_tokens"}
    assert keys <= set(out)
    assert len(out["block_inputs"]) == 6 and out["grid"] == (16, 16) and out["num_prefix_tokens"] == 0
    assert out["grids"] == [(16, 16)] * 2 + [(8, 8)] * 2 + [(4, 4)] * 2 and out["last_grid"] == (4, 4)
    with torch.no_grad():
        r = ref(x, everything=True)
        torch.testing.assert_close(out["logits"], model(x), atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(out["features"], r["features"], atol=1e-10, rtol=1e-9)
    for a, tok, term in zip(out["attn_inputs"], out["token_terms"], out["pos_terms"], strict=True):
        torch.testing.assert_close(a, tok + term)
    torch.testing.assert_close(out["features"], out["last_norm_output"] + out["last_pos_term"])
    torch.testing.assert_close(out["pooled"], out["features"].mean(1))


def test_forward_intermediates_and_features():
    model = _cache_model()
    x = _images(dtype=torch.float32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True, output_fmt="NHWC")
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        feats = model.forward_features(x)
    assert [t.shape for t in inter] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)]
    assert [t.shape for t in only] == [(2, 16, 16, 8), (2, 8, 8, 16)]
    assert feats.shape == (2, 4, 4, 32) and model.output_fmt == "NHWC" and model.default_cfg["pool_size"] == (4, 4)
    torch.testing.assert_close(final, feats, rtol=0, atol=0)
    torch.testing.assert_close(normed[0].permute(0, 2, 3, 1), feats)
    assert model.feature_info[2] == dict(num_chs=32, reduction=8, module="layers.2")


@pytest.mark.parametrize("pe", ["default", "lape", "pvg", "mpvg"])
def test_no_pooling_gives_the_features_map(pe):
    """global_pool='' (timm's "no pooling"), at build or by reset_classifier: forward returns [B, H, W, ...] and the
    head is applied per position; 'avg' brings the pooling back."""
    x = _images(dtype=torch.float32)
    model = _cache_model(pe, num_classes=0, pool="")
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model(x), feats, rtol=0, atol=0)
        model.reset_classifier(3)
        assert model(x).shape == (2, 4, 4, 3) and model.global_pool == ""
        torch.testing.assert_close(model(x), model.head.fc(feats))
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), feats.mean(dim=(1, 2)))
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), feats, rtol=0, atol=0)
    with pytest.raises(ValueError, match="global_pool must be 'avg', '' "):
        model.reset_classifier(0, "token")


def _grads_missing(model):
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("pe", ["default", "lape", "pvg", "mpvg"])
def test_prune_intermediate_layers(pe):
    """timm's pruning contract on every stage: pruned (and stop_early) taps equal the whole model's, the last norm
    and the classifier go with the last stage, every kept parameter is used, and prune_head=False at the last
    stage changes nothing."""
    import copy

    model = _cache_model(pe)
    x = _images(dtype=torch.float32)
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        kept = copy.deepcopy(model)
        assert kept.prune_intermediate_layers([2], prune_head=False) == [2]
        torch.testing.assert_close(kept(x), expected, rtol=0, atol=0)
    for i in range(3):
        with torch.no_grad():
            early = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(early[0], taps[i], rtol=0, atol=0)
        for prune_norm in (False, True):
            pruned = copy.deepcopy(model)
            take = pruned.prune_intermediate_layers([i], prune_norm=prune_norm)
            assert take == [i] and len(pruned.layers) == i + 1 and len(pruned.feature_info) == i + 1
            assert pruned.num_features == pruned.head_hidden_size == model.dims[i if i < 2 else 2]
            with torch.no_grad():
                torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0],
                                           taps[i], rtol=0, atol=0)
                feats = pruned.forward_features(x)
                if i < 2 or prune_norm:  # the features end at the tap (the last norm is gone)
                    torch.testing.assert_close(feats.permute(0, 3, 1, 2), taps[i], rtol=0, atol=0)
                torch.testing.assert_close(pruned(x), feats, rtol=0, atol=0)  # no head, no pooling
            pruned.train()
            out = pruned.forward_intermediates(x, indices=take, norm=not prune_norm, intermediates_only=True)
            (out[0].sum() + pruned.forward_features(x).sum()).backward()
            assert not _grads_missing(pruned), (i, prune_norm, _grads_missing(pruned))
    pruned = copy.deepcopy(model)
    pruned.prune_intermediate_layers([0])
    pruned.reset_classifier(7, "avg")
    assert pruned(x).shape == (2, 7)
    with pytest.raises(RuntimeError, match="prune_intermediate_layers removed"):
        pruned.forward_analysis(x)


def test_registry_tiny_one_channel_and_contract():
    for name in ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224"):
        for pe in ("default", "lape", "pvg", "mpvg"):
            m = create_model(name, pe=pe, tiny=True, in_chans=1, num_classes=10)
            assert m.default_cfg["input_size"] == (1, 32, 32) and m.default_cfg["crop_pct"] == 0.9 and m.in_chans == 1
            assert m.default_cfg["classifier"] == "head.fc" and m.default_cfg["pe"] == pe and m.pool == "avg"
            x = _images(chans=1, dtype=torch.float32)
            y = m(x)
            assert y.shape == (2, 10)
            y.sum().backward()
    m = create_model("swin_tiny_patch4_window7_224", pe="mpvg", tiny=True)
    assert m.get_classifier() is m.head.fc and m.no_weight_decay() >= {"pos_embed", "relative_position_bias_table"}
    m.reset_classifier(0)
    assert m(_images(dtype=torch.float32)).shape == (2, 32)
    with torch.device("meta"):
        full = create_model("swin_tiny_patch4_window7_224", pe="mpvg")
    assert full.patch_embed.grid_size == (56, 56) and full.pos_embed.shape == (1, 3136, 96)
    assert full.embed_dim == 96 and full.num_features == 768 and len(full.blocks) == 12
    assert full.blocks[1].shift == (3, 3) and full.blocks[11].shift == (0, 0) and full.blocks[11].window == (7, 7)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pe="pvg", pos_embed="rpe"), "pos_embed='rpe' has none"),
        (dict(pe="mpvg", pos_embed="rpe"), "pos_embed='rpe' has none"),
        (dict(pe="lape", pos_embed="rpe", rpe_norm=False), "rpe_norm=False"),
        (dict(pe="default", pos_embed="rpe", add_pos_to_input=True), "needs an absolute position embedding"),
        (dict(pos_embed="sin"), "pos_embed must be one of"),
        (dict(pool="cls"), "pool must be 'avg', '' "),
        (dict(pe="vit"), "pe must be one of"),
        (dict(img_size=33), "not divisible by patch_size"),
        (dict(img_size=36), "divisible by 4"),
        (dict(window_size=3), "not divisible by the window"),
        (dict(depths=(2, 2), num_heads=(1, 2, 2)), "same length"),
        (dict(num_heads=(3, 2, 2)), "not divisible by num_heads"),
        (dict(patch_size=0), "patch_size"),
        (dict(pe="default", hierarchical=False), "layer-wise modes"),
        (dict(pe="mpvg", last_pos=12), "last_pos must be in"),
        (dict(pe="pvg", include_layer0=False, last_pos=0, hierarchical=True), None),
    ],
)
def test_bad_combinations_are_clear_errors(kwargs, match):
    if match is None:  # a valid combination for contrast
        SwinTransformer(**{**SMALL, **kwargs})
        return
    with pytest.raises(ValueError, match=match):
        SwinTransformer(**{**SMALL, **kwargs})


def test_bad_input_is_a_clear_error():
    model = _cache_model()
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="own token grid"):
        model.compute_pe_terms((8, 8))


# ----------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("pe,pos", [("default", "learn"), ("lape", "learn"), ("pvg", "learn"), ("mpvg", "learn"),
                                    ("default", "rpe"), ("lape", "rpe")])
def test_onnx_export_runs_in_onnxruntime(pe, pos, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed here (the timm venv has it)")
    from mpvg_kernels.export import export_onnx

    model = create_model("swin_tiny_patch4_window7_224", pe=pe, pos_embed=pos, tiny=True, num_classes=7)
    randomize_(model, seed=2)
    model.eval()
    path = export_onnx(model, tmp_path / "swin.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _images(b=3, dtype=torch.float32)
    (got,) = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_analysis_measures_every_stage():
    from mpvg_kernels.analysis.collect import FIGURES, analysis_to_json, analyze_model, describe_model, term_grid

    model = create_model("swin_tiny_patch4_window7_224", pe="mpvg", tiny=True, in_chans=1, num_classes=10)
    spec = describe_model(model, "mpvg")
    a = analyze_model(model, spec, _images(b=4, chans=1, dtype=torch.float32))
    doc = analysis_to_json(a, FIGURES)
    maps = doc["pos_maps"]["maps"]
    # the stage-1 PE term and LN'_last live on the 8x8 grid of the merged patches
    assert len(maps["block 0"]) == 16 and len(maps["block 1"]) == 8 and len(maps["last LN"]) == 8
    assert maps["block 1"][4][4] == pytest.approx(1.0)  # the reference token (8, 8) of the 16x16 grid is (4, 4)
    assert all(c is not None for c in doc["correlation"]["mean"]) and doc["dim"] == 32
    assert term_grid((16, 16), 136, 64) == ((8, 8), 36)
    with pytest.raises(ValueError, match="fits neither"):
        term_grid((16, 16), 0, 48)
