"""An independent, deliberately plain ViT for the model tests: nn.LayerNorm, nn.Linear and explicit softmax
attention, the four PE modes written out from the papers (docs/design.md#the-method) (no code from mpvg_kernels).

Knobs (MPVG Tables 5-6): ``layer0`` (PE at block 0), ``hier`` (pos_l = LN'_l(pos_{l-1}) vs LN'_l(pos)),
``x_plus_pe`` (tokens + pos before block 0), ``last`` (None, or k: LN(x) + LN'_last(p) with p = pos for k = 0 and
p = the PE term of block k otherwise), ``cct`` (Compact-Transformers block: the second norm acts on the stream).
"""

from __future__ import annotations

import torch
from torch import nn

MODE_DEFAULTS = {
    # mode: (layerwise, layer0, hier, x_plus_pe, last)
    "default": (False, False, False, True, None),
    "lape": (True, True, True, False, None),
    "pvg": (True, False, True, True, None),
    "mpvg": (True, False, True, True, 0),
}


class RefBlock(nn.Module):
    def __init__(self, dim, heads, hidden, qkv_bias, eps, with_pe, cct):
        super().__init__()
        self.heads, self.cct = heads, cct
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.pos_ln = nn.LayerNorm(dim, eps=eps) if with_pe else None
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def attention(self, a):
        B, T, D = a.shape
        h = self.heads
        q, k, v = self.qkv(a).split(D, dim=-1)
        q = q.view(B, T, h, D // h).transpose(1, 2)
        k = k.view(B, T, h, D // h).transpose(1, 2)
        v = v.view(B, T, h, D // h).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / (D // h) ** 0.5, dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(B, T, D))

    def mlp(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    def rest(self, x, a):
        x = x + self.attention(a)
        if self.cct:
            x = self.ln2(x)
            return x + self.mlp(x)
        return x + self.mlp(self.ln2(x))


class RefViT(nn.Module):
    def __init__(
        self,
        mode,
        pool,
        img=8,
        patch=2,
        chans=3,
        dim=32,
        depth=3,
        heads=2,
        mlp_ratio=2.0,
        classes=5,
        qkv_bias=True,
        eps=1e-6,
        cct=False,
        **knobs,
    ):
        super().__init__()
        layerwise, layer0, hier, x_plus_pe, last = MODE_DEFAULTS[mode]
        self.layer0 = knobs.get("layer0", layer0)
        self.hier = knobs.get("hier", hier)
        self.x_plus_pe = knobs.get("x_plus_pe", x_plus_pe)
        self.last = knobs.get("last", last)
        self.pool = pool
        pe_layers = knobs.get("pe_layers", depth)
        n = (img // patch) ** 2 + (1 if pool == "cls" else 0)
        self.conv = nn.Conv2d(chans, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos = nn.Parameter(torch.zeros(1, n, dim))
        self.blocks = nn.ModuleList(
            RefBlock(dim, heads, int(dim * mlp_ratio), qkv_bias, eps,
                     layerwise and (i > 0 or self.layer0) and i < pe_layers, cct)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.last_pos_ln = nn.LayerNorm(dim, eps=eps) if self.last is not None else None
        self.head = nn.Linear(dim, classes)

    def forward(self, img, everything=False):
        x = self.conv(img).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        if self.x_plus_pe:
            x = x + self.pos
        terms = []
        prev = self.pos
        for blk in self.blocks:
            if blk.pos_ln is None:
                term = None
                a = blk.ln1(x)
            else:
                term = blk.pos_ln(prev if self.hier else self.pos)
                if self.hier:
                    prev = term
                a = blk.ln1(x) + term
            terms.append(term)
            x = blk.rest(x, a)
        feats = self.norm(x)
        if self.last is not None:
            k = self.last % len(self.blocks)
            feats = feats + self.last_pos_ln(self.pos if k == 0 else terms[k])
        pooled = feats[:, 0] if self.pool == "cls" else feats.mean(dim=1)
        logits = self.head(pooled)
        if everything:
            return {"logits": logits, "features": feats, "pos_terms": terms, "last_norm_input": x}
        return logits


def ref_name(name: str) -> str | None:
    """mpvg_kernels VisionTransformer parameter name -> RefViT parameter name."""
    parts = name.split(".")
    if name.startswith("patch_embed.proj."):
        return "conv." + parts[-1]
    if name == "cls_token":
        return "cls"
    if name == "pos_embed":
        return "pos"
    if name.startswith("blocks."):
        i, rest = parts[1], ".".join(parts[2:])
        table = {
            "norm1.weight": "ln1.weight",
            "norm1.bias": "ln1.bias",
            "norm1.pos_weight": "pos_ln.weight",
            "norm1.pos_bias": "pos_ln.bias",
            "attn.qkv.weight": "qkv.weight",
            "attn.qkv.bias": "qkv.bias",
            "attn.proj.weight": "proj.weight",
            "attn.proj.bias": "proj.bias",
            "norm2.weight": "ln2.weight",
            "norm2.bias": "ln2.bias",
            "mlp.fc1.weight": "fc1.weight",
            "mlp.fc1.bias": "fc1.bias",
            "mlp.fc2.weight": "fc2.weight",
            "mlp.fc2.bias": "fc2.bias",
        }
        return f"blocks.{i}.{table[rest]}"
    if name in ("norm.weight", "norm.bias"):
        return name
    if name == "norm.pos_weight":
        return "last_pos_ln.weight"
    if name == "norm.pos_bias":
        return "last_pos_ln.bias"
    if name.startswith("head."):
        return name
    return None


def copy_into_ref(model: nn.Module, ref: RefViT) -> None:
    """Copy every parameter of ``model`` into ``ref``; both must have exactly the same parameters."""
    ours = dict(model.named_parameters())
    theirs = dict(ref.named_parameters())
    mapped = {ref_name(n): n for n in ours}
    assert set(mapped) == set(theirs), (sorted(set(mapped) ^ set(theirs)), "parameter sets differ")
    with torch.no_grad():
        for rn, n in mapped.items():
            assert theirs[rn].shape == ours[n].shape, (rn, n)
            theirs[rn].copy_(ours[n])


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Random values for every parameter (LayerNorm gammas around 1, everything else around 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * r)
            elif name in ("pos_embed", "pos"):
                p.copy_(0.5 * r)
            else:
                p.copy_(0.2 * r)
