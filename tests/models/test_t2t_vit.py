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
    assert {"attention1.kqv.weight", "attention1.mlp.0.weight", "attention1.mlp.2.bias", "attention2.norm1.weight",
            "project.weight"} <= names
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
