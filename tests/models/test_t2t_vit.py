"""T2T-ViT-7 (Yuan et al. 2021): the Tokens-to-Token module and the whole model in every PE mode against an
independent plain-PyTorch implementation (float64, logits and gradients), parameter counts against the papers, the
PE cache, official-checkpoint loading and ONNX export."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _vit_reference import MODE_DEFAULTS, RefBlock, randomize_, ref_name
from torch import nn

from mpvg_kernels.layers.t2t import T2TTokenizer, orthogonal_random_features
from mpvg_kernels.models import PE_MODES, count_parameters, create_model, load_pretrained

# ----------------------------------------------------------------------------- the independent reference


def ref_soft_split(x: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """Soft split written out: [B, C, H, W] -> [B, L, C*k*k], column c*k*k + i*k + j = pixel (i, j) of the k x k
    window of channel c (zero padding p, stride s), windows in row-major order."""
    B, C, H, W = x.shape
    xp = F.pad(x, (p, p, p, p))
    oh, ow = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    cols = [
        xp[:, c, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s].reshape(B, oh * ow)
        for c in range(C)
        for i in range(k)
        for j in range(k)
    ]
    return torch.stack(cols, dim=2)


class RefPerformer(nn.Module):
    """Performer layer with its kernel written as the explicit T x T matrix K_ts = phi(q_t) . phi(k_s)."""

    def __init__(self, dim, emb, m):
        super().__init__()
        self.m = m
        self.kqv = nn.Linear(dim, 3 * emb)
        self.proj = nn.Linear(emb, emb)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(emb, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(emb, emb), nn.GELU(), nn.Linear(emb, emb))
        self.register_buffer("w", torch.zeros(m, emb))

    def phi(self, t):
        return torch.exp(t @ self.w.T - 0.5 * (t * t).sum(-1, keepdim=True)) / math.sqrt(self.m)

    def forward(self, x):
        k, q, v = self.kqv(self.norm1(x)).chunk(3, dim=-1)
        K = self.phi(q) @ self.phi(k).transpose(1, 2)
        y = v + self.proj((K @ v) / (K.sum(-1, keepdim=True) + 1e-8))
        return y + self.mlp(self.norm2(y))


class RefAttn(nn.Module):
    def __init__(self, dim, emb):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * emb, bias=False)
        self.proj = nn.Linear(emb, emb)


class RefMlp(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.fc1 = nn.Linear(emb, emb)
        self.fc2 = nn.Linear(emb, emb)


class RefTokenTransformer(nn.Module):
    """One-head softmax attention scaled by the input width, value residual, 1x MLP."""

    def __init__(self, dim, emb):
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = RefAttn(dim, emb)
        self.norm2 = nn.LayerNorm(emb, eps=1e-5)
        self.mlp = RefMlp(emb)

    def forward(self, x):
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.dim), dim=-1)
        y = v + self.attn.proj(a @ v)
        return y + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(y))))


class RefT2T(nn.Module):
    def __init__(self, chans, token_dim, embed_dim, token_type="performer", splits=((7, 4, 2), (3, 2, 1), (3, 2, 1))):
        super().__init__()
        self.splits, self.token_dim = splits, token_dim
        d0, d1 = chans * splits[0][0] ** 2, token_dim * splits[1][0] ** 2
        if token_type == "performer":
            self.attention1 = RefPerformer(d0, token_dim, token_dim // 2)
            self.attention2 = RefPerformer(d1, token_dim, token_dim // 2)
        else:
            self.attention1 = RefTokenTransformer(d0, token_dim)
            self.attention2 = RefTokenTransformer(d1, token_dim)
        self.project = nn.Linear(token_dim * splits[2][0] ** 2, embed_dim)

    def forward(self, img):
        x = img
        for i, layer in enumerate((self.attention1, self.attention2)):
            k, s, p = self.splits[i]
            h, w = (x.shape[2] + 2 * p - k) // s + 1, (x.shape[3] + 2 * p - k) // s + 1
            t = layer(ref_soft_split(x, k, s, p))  # [B, h*w, token_dim]
            x = t.transpose(1, 2).reshape(x.shape[0], self.token_dim, h, w)
        return self.project(ref_soft_split(x, *self.splits[2]))


def ref_sinusoid(n: int, d: int) -> torch.Tensor:
    """The 1-D sinusoid table [1, n, d] of "Attention is all you need", element by element."""
    t = torch.empty(n, d, dtype=torch.float64)
    for pos in range(n):
        for j in range(d):
            angle = pos / 10000 ** (2 * (j // 2) / d)
            t[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return t.unsqueeze(0)


class RefT2TViT(nn.Module):
    """T2T-ViT from the papers' equations: T2T tokens, class token (cls pooling), fixed 1-D sinusoid PE, pre-norm
    blocks (qkv without bias, LayerNorm eps 1e-5) with the PE modes of _vit_reference."""

    def __init__(self, mode, pool, img, chans, token_dim, dim, depth, heads, mlp_ratio, classes, token_type):
        super().__init__()
        layerwise, layer0, self.hier, self.x_plus_pe, self.last = MODE_DEFAULTS[mode]
        self.pool = pool
        self.t2t = RefT2T(chans, token_dim, dim, token_type)
        n = (img // 16) ** 2 + (pool == "cls")
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.register_buffer("pos", ref_sinusoid(n, dim))
        self.blocks = nn.ModuleList(
            RefBlock(dim, heads, int(dim * mlp_ratio), False, 1e-5, layerwise and (i > 0 or layer0), False)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.last_pos_ln = nn.LayerNorm(dim, eps=1e-5) if self.last is not None else None
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.t2t(img)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        if self.x_plus_pe:
            x = x + self.pos
        prev = self.pos
        for blk in self.blocks:
            a = blk.ln1(x)
            if blk.pos_ln is not None:
                prev = blk.pos_ln(prev if self.hier else self.pos)
                a = a + prev
            x = blk.rest(x, a)
        feats = self.norm(x)
        if self.last is not None:
            feats = feats + self.last_pos_ln(self.pos)
        return self.head(feats[:, 0] if self.pool == "cls" else feats.mean(dim=1))


def t2t_ref_name(name: str) -> str:
    """Our parameter/buffer name -> the reference's."""
    if name.startswith("patch_embed."):
        return "t2t." + name[len("patch_embed.") :]
    if name == "cls_token":
        return "cls"
    return ref_name(name)


def copy_into(model: nn.Module, ref: nn.Module, rename=t2t_ref_name) -> None:
    """Copy every parameter and the random features of ``model`` into ``ref`` (same parameter sets)."""
    ours = dict(model.named_parameters())
    ours.update({n: b for n, b in model.named_buffers() if n.endswith(".w")})
    theirs = dict(ref.named_parameters())
    theirs.update({n: b for n, b in ref.named_buffers() if n.endswith(".w")})
    mapped = {rename(n): n for n in ours}
    assert set(mapped) == set(theirs), sorted(set(mapped) ^ set(theirs))
    with torch.no_grad():
        for rn, n in mapped.items():
            theirs[rn].copy_(ours[n])


# ----------------------------------------------------------------------------- the T2T module

TOKEN_TYPES = ("performer", "transformer")


def _images(b=2, chans=3, size=64, seed=1, dtype=torch.float64):
    return torch.randn(b, chans, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    randomize_(model, seed)
    with torch.no_grad():  # random features of the size phi's exponent sees in training, not 0.2 * N(0, 1)
        for n, b in model.named_buffers():
            if n.endswith(".w"):
                b.copy_(orthogonal_random_features(*b.shape, seed=seed + len(n)).to(b.dtype))


@pytest.mark.parametrize("token_type", TOKEN_TYPES)
@pytest.mark.parametrize("chans", [3, 1])
def test_t2t_module_matches_reference(token_type, chans):
    tok = T2TTokenizer(64, 16, chans, 32, token_type=token_type, token_dim=16).double().eval()
    _randomize(tok)
    ref = RefT2T(chans, 16, 32, token_type).double()
    copy_into(tok, ref, rename=lambda n: n)
    x = _images(chans=chans).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    out, expect = tok(x), ref(x2)
    assert out.shape == (2, 16, 32) and out.is_contiguous() and tok.grid_size == (4, 4)
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=1e-9)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out * g).sum().backward()
    (expect * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-10, rtol=1e-9)
    theirs = dict(ref.named_parameters())
    for n, p in tok.named_parameters():
        torch.testing.assert_close(p.grad, theirs[n].grad, atol=1e-10, rtol=1e-9, msg=lambda m, n=n: f"{n}: {m}")


def test_t2t_module_shapes_and_names():
    with torch.device("meta"):
        tok = T2TTokenizer(224, 16, 3, 256)
    assert tok.grid_size == (14, 14) and tok.num_patches == 196 and tok.patch_size == (16, 16)
    assert tok.grid_for(224, 160) == (14, 10) and tok.grid_for(230, 230) == (15, 15)  # the unfold arithmetic
    names = {n for n, _ in tok.named_parameters()}
    assert {
        "attention1.kqv.weight",
        "attention1.mlp.0.weight",
        "attention1.mlp.2.bias",
        "attention2.norm1.weight",
        "project.weight",
    } <= names
    assert tok.attention1.kqv.weight.shape == (192, 147) and tok.attention2.kqv.weight.shape == (192, 576)
    assert {n for n, _ in tok.named_buffers()} == {"attention1.w", "attention2.w"}
    assert tok.attention1.w.shape == (32, 64)
    with torch.device("meta"):
        t = T2TTokenizer(224, 16, 3, 256, token_type="transformer")
    assert {"attention1.attn.qkv.weight", "attention2.mlp.fc2.bias"} <= {n for n, _ in t.named_parameters()}
    assert t.attention1.attn.qkv.bias is None and not list(t.buffers())


def test_random_features_are_fixed_orthogonal_buffers():
    torch.manual_seed(0)
    a = T2TTokenizer(64, 16, 1, 32, token_dim=16)
    torch.manual_seed(1)
    b = T2TTokenizer(64, 16, 1, 32, token_dim=16)
    assert torch.equal(a.attention1.w, b.attention1.w)  # from the seed, not the global RNG
    assert not torch.equal(a.attention1.w, a.attention2.w)
    c = T2TTokenizer(64, 16, 1, 32, token_dim=16, feature_seed=5)
    assert not torch.equal(a.attention1.w, c.attention1.w)
    w = a.attention1.w
    m = w.shape[0]
    torch.testing.assert_close(w @ w.T, m * torch.eye(m), atol=1e-4, rtol=1e-5)  # rows orthogonal, norm sqrt(m)
    assert "attention1.w" in a.state_dict() and not any(n.endswith(".w") for n, _ in a.named_parameters())


def test_performer_half_precision_runs_the_kernel_in_float32():
    tok = T2TTokenizer(64, 16, 1, 32, token_dim=16).eval()
    x = _images(chans=1, dtype=torch.float32)
    with torch.no_grad():
        ref = tok(x)
        got = copy.deepcopy(tok).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(token_type="linformer"), "token_type"),
        (dict(patch_size=8), "total stride"),
        (dict(strides=(4, 2)), "strides"),
        (dict(paddings=(2, -1, 1)), "paddings"),
        (dict(token_dim=0), "token_dim"),
        (dict(kernel_ratio=0.0), "kernel_ratio"),
        (dict(img_size=2), "too small"),
    ],
)
def test_t2t_module_bad_arguments(kwargs, match):
    args = dict(img_size=64, patch_size=16, in_chans=1, embed_dim=32, token_dim=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        T2TTokenizer(**args)


def test_t2t_module_rejects_wrong_channels():
    tok = T2TTokenizer(64, 16, 1, 32, token_dim=16)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        tok(torch.zeros(1, 3, 64, 64))


# ----------------------------------------------------------------------------- the whole model

#: MPVG Table 1 (ImageNet-1K, 1000 classes) and Table 2 (CIFAR-100, 100 classes): T2T-ViT-7 #Params (M).
PAPER_M = {
    1000: {"default": 4.310, "lape": 4.313, "pvg": 4.312, "mpvg": 4.313},
    100: {"default": 4.078, "lape": 4.082, "pvg": 4.081, "mpvg": 4.081},
}
#: Our trainable parameters (the performer T2T module; pvg/mpvg average-pool without a class token).
EXACT = {
    1000: {"default": 4_255_694, "lape": 4_259_278, "pvg": 4_258_510, "mpvg": 4_259_022},
    100: {"default": 4_024_394, "lape": 4_027_978, "pvg": 4_027_210, "mpvg": 4_027_722},
}


def _fixed_numel(model: nn.Module) -> int:
    """Elements of the fixed tensors the official code holds as non-trainable parameters: the sinusoid PE and
    the performer's random features (buffers here)."""
    return sum(b.numel() for n, b in model.named_buffers() if n == "pos_embed" or n.endswith(".w"))


@pytest.mark.parametrize("num_classes", [1000, 100])
@pytest.mark.parametrize("pe", PE_MODES)
def test_param_counts_match_the_papers(pe, num_classes):
    with torch.device("meta"):
        model = create_model("t2t_vit_7", pe=pe, num_classes=num_classes)
    assert count_parameters(model) == EXACT[num_classes][pe]
    # the papers count every nn.Parameter of the official model, the non-trainable PE table and features included
    fixed = _fixed_numel(model)
    assert fixed == 2 * 32 * 64 + model.pos_embed.numel()
    assert abs((count_parameters(model) + fixed) / 1e6 - PAPER_M[num_classes][pe]) < 0.0015
    assert (
        count_parameters(model) - EXACT[num_classes]["default"]
        == {"default": 0, "lape": 7 * 512, "pvg": 6 * 512 - 256, "mpvg": 7 * 512 - 256}[pe]
    )  # LN'_l of 2 * 256 each; pvg/mpvg have no class token


def test_transformer_token_layers_do_not_match_the_papers():
    """The T2T-ViT_t variant (softmax token layers) of the same size: 4.306 M counted as the papers count, 0.004 M
    short of the 4.310 M of MPVG Table 1; the performer variant (official t2t_vit_7) is the one the papers used."""
    with torch.device("meta"):
        model = create_model("t2t_vit_7", tokenizer_args=dict(token_type="transformer", token_dim=64))
    assert count_parameters(model) == 4_255_310 and _fixed_numel(model) == 197 * 256
    assert abs((count_parameters(model) + _fixed_numel(model)) / 1e6 - PAPER_M[1000]["default"]) > 0.004


def test_registered_architecture_follows_the_official_code():
    with torch.device("meta"):
        model = create_model("t2t_vit_7")
    assert isinstance(model.patch_embed, T2TTokenizer) and model.patch_embed.token_type == "performer"
    assert model.patch_embed.grid_size == (14, 14) and model.num_prefix_tokens == 1
    assert "pos_embed" in dict(model.named_buffers()) and "pos_embed" not in dict(model.named_parameters())
    blk = model.blocks[0]
    assert blk.attn.qkv.bias is None and blk.attn.scale == 64**-0.5 and blk.mlp.fc1.out_features == 512
    assert blk.norm1.eps == 1e-5 and model.norm.eps == 1e-5 and len(model.blocks) == 7
    assert model.patch_embed.attention1.dp.p == 0.1 and model.patch_embed.attention1.norm1.eps == 1e-5
    cfg = model.default_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.9 and cfg["num_classes"] == 1000
    assert cfg["first_conv"] == "patch_embed.attention1.kqv" and cfg["architecture"] == "t2t_vit_7"


def _tiny(pe, chans=1, token_type="performer", seed=0):
    torch.manual_seed(seed)
    model = create_model(
        "t2t_vit_7",
        pe=pe,
        tiny=True,
        num_classes=5,
        in_chans=chans,
        tokenizer_args=dict(token_type=token_type, token_dim=16),
    )
    return model.double().eval()


def _ref_for(model, pe, chans, token_type="performer"):
    ref = RefT2TViT(pe, model.pool, 64, chans, 16, 32, 2, 2, 2.0, 5, token_type).double()
    # the fixed 1-D sinusoid PE: the model's buffer (float32 table) is the reference's, to float32 precision
    torch.testing.assert_close(model.pos_embed, ref.pos, atol=1e-7, rtol=0)
    copy_into(model, ref)
    with torch.no_grad():
        ref.pos.copy_(model.pos_embed)
    return ref


MODEL_CASES = [
    ("default", 1, "performer"),
    ("lape", 3, "performer"),
    ("pvg", 1, "performer"),
    ("mpvg", 1, "performer"),
    ("mpvg", 3, "transformer"),
]


@pytest.mark.parametrize("pe,chans,token_type", MODEL_CASES)
def test_model_matches_reference(pe, chans, token_type):
    model = _tiny(pe, chans, token_type)
    _randomize(model)
    ref = _ref_for(model, pe, chans, token_type)
    x = _images(chans=chans)
    out, expect = model(x), ref(x)
    assert out.shape == (2, 5) and model.pool == ("avg" if pe in ("pvg", "mpvg") else "cls")
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=1e-9)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * g).sum().backward()
    (expect * g).sum().backward()
    theirs = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        q = theirs[t2t_ref_name(n)]
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-9, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("pe", PE_MODES)
def test_cache_live_and_given_terms_agree(pe):
    model = _tiny(pe).float()
    _randomize(model, seed=2)
    x = _images(chans=1, dtype=torch.float32)
    live = model(x)  # gradients enabled: the terms are computed along the walk
    given = model(x, pe_terms=model.compute_pe_terms())
    with torch.no_grad():
        hits = model.pe_cache.hits + model.pe_cache.misses
        cached = model(x)
        cached2 = model(x)
    assert model.pe_cache.hits + model.pe_cache.misses > hits and model.pe_cache.hits >= 1
    torch.testing.assert_close(given, live, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, live.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(cached, cached2)


def test_forward_analysis_keys_and_values():
    model = _tiny("mpvg").float()
    _randomize(model, seed=3)
    x = _images(chans=1, dtype=torch.float32)
    with torch.no_grad():
        it = model.forward_analysis(x)
        logits = model(x)
    assert set(it) == {
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
    torch.testing.assert_close(it["logits"], logits, atol=1e-5, rtol=1e-5)
    assert it["grid"] == (4, 4) and it["num_prefix_tokens"] == 0 and len(it["block_inputs"]) == 2
    assert it["pos_terms"][0] is None and it["pos_terms"][1].shape == (1, 16, 32)
    torch.testing.assert_close(it["block_inputs"][0], model.patch_embed(x) + model.pos_embed)


def _official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights in the official layout: ``tokens_to_token.*``, the PE table and features included."""
    sd = {}
    for k, v in model.state_dict().items():
        sd[k.replace("patch_embed.", "tokens_to_token.", 1) if k.startswith("patch_embed.") else k] = v.clone()
    return sd


def test_official_checkpoint_loads():
    src = _tiny("default", chans=3).float()
    _randomize(src, seed=4)
    sd = _official_state_dict(src)
    assert "tokens_to_token.attention1.w" in sd and sd["pos_embed"].shape == (1, 17, 32)
    x = _images(chans=3, dtype=torch.float32)
    for pe in PE_MODES:
        dst = _tiny(pe, chans=3, seed=9).float()
        result = load_pretrained(dst, {"model": sd}, strict=pe == "default")  # PE norms: not in it
        assert sorted(result.missing_keys) == sorted(dst.pe_norm_parameter_names()) and not result.unexpected_keys
        for name, b in dst.named_buffers():
            if name.endswith(".w"):
                assert torch.equal(b, sd[name.replace("patch_embed.", "tokens_to_token.", 1)])
        if pe == "default":
            with torch.no_grad():
                torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
        else:  # the fixed table stays the model's own for its token count (no class-token row for pvg/mpvg)
            assert dst.pos_embed.shape[1] == 16 + dst.num_prefix_tokens
            torch.testing.assert_close(dst.pos_embed, ref_sinusoid(dst.pos_embed.shape[1], 32).float())


def test_tiny_variant_trains_one_step_on_one_channel():
    model = create_model("t2t_vit_7", pe="mpvg", tiny=True, num_classes=10, in_chans=1)
    assert model.default_cfg["input_size"] == (1, 64, 64) and model.patch_embed.grid_size == (4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w_before = model.patch_embed.attention1.w.clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "patch_embed.attention1.kqv.weight" in changed and "norm.pos_weight" in changed
    assert torch.equal(model.patch_embed.attention1.w, w_before)  # the random features are not trained


@pytest.mark.parametrize("pe", PE_MODES)
def test_onnx_export_runs_in_onnxruntime(pe, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
    pytest.importorskip("onnxruntime", reason="running the exported graph needs onnxruntime")
    from mpvg_kernels.export import export_model, onnx_op_types

    model = _tiny(pe).float()
    _randomize(model, seed=5)
    result = export_model(model, tmp_path / f"t2t_{pe}.onnx", "onnx", verify=True)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    ops = onnx_op_types(result.path)
    assert "LayerNormalization" in ops and "Pad" in ops  # the soft splits (nn.Unfold) as standard operators
