"""Published checkpoints of every family load through the family's key map (models/pretrained.py ``KEY_MAPS``):
the official LaPE DeiT checkpoints into ``pe='lape'`` and the original Microsoft Swin-Transformer checkpoints,
strictly (every parameter from the checkpoint), and give the logits of the official model.

The official layouts are written out here from the official code's module names (no code copied):

- LaPE (github Ingrid725/LaPE, DeiT code base, ``--adding-type LaPE``): the DeiT keys plus ``blocks.i.pe_norm``
  (an ``nn.LayerNorm(dim)`` per block, applied to the PE carried from the previous block:
  p_i = pe_norm_i(p_{i-1}), p_0 = pos_embed; block input LN1(x) + p_i; the PE is not added to the tokens; the
  last norm is the plain ``norm``); saved by DeiT's main.py as ``{"model": state_dict, "optimizer": ..., ...}``.
- Swin (github microsoft/Swin-Transformer): ``layers.i.downsample.reduction/norm`` at the END of stage i,
  ``layers.i.blocks.j.attn.relative_position_index`` and (shifted blocks) ``layers.i.blocks.j.attn_mask``
  buffers, ``absolute_pos_embed`` (ape=True only), ``head.weight/bias``; saved as ``{"model": ...}``.
"""

from __future__ import annotations

import re

import pytest
import torch
from _vit_reference import RefViT

from mpvg_kernels.models import VisionTransformer, load_pretrained
from mpvg_kernels.models.swin import SwinTransformer

D, DEPTH, HEADS, PATCH, CLASSES, IMG = 32, 3, 2, 4, 7, 16
HIDDEN = 2 * D


def lape_official_layout(distilled: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official LaPE DeiT (``VisionTransformer(join_type='LaPE')``, its distilled subclass)."""
    n = (IMG // PATCH) ** 2 + (2 if distilled else 1)
    keys: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, D), "pos_embed": (1, n, D)}
    if distilled:
        keys["dist_token"] = (1, 1, D)
    keys.update({"patch_embed.proj.weight": (D, 3, PATCH, PATCH), "patch_embed.proj.bias": (D,)})
    for i in range(DEPTH):
        b = f"blocks.{i}."
        for name, shape in (
            ("pe_norm.weight", (D,)),
            ("pe_norm.bias", (D,)),
            ("norm1.weight", (D,)),
            ("norm1.bias", (D,)),
            ("attn.qkv.weight", (3 * D, D)),
            ("attn.qkv.bias", (3 * D,)),
            ("attn.proj.weight", (D, D)),
            ("attn.proj.bias", (D,)),
            ("norm2.weight", (D,)),
            ("norm2.bias", (D,)),
            ("mlp.fc1.weight", (HIDDEN, D)),
            ("mlp.fc1.bias", (HIDDEN,)),
            ("mlp.fc2.weight", (D, HIDDEN)),
            ("mlp.fc2.bias", (D,)),
        ):
            keys[b + name] = shape
    keys.update({"norm.weight": (D,), "norm.bias": (D,), "head.weight": (CLASSES, D), "head.bias": (CLASSES,)})
    if distilled:
        keys.update({"head_dist.weight": (CLASSES, D), "head_dist.bias": (CLASSES,)})
    return keys


def random_state_dict(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for a layout; LayerNorm weights around 1 (and every PE norm far from identity)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        v = 0.3 * torch.randn(*shape, generator=g)
        out[k] = v + 1.0 if re.search(r"norm\w*\.weight$", k) else v
    return out


def _lape_model(**kw) -> VisionTransformer:
    args = dict(
        img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0, num_classes=CLASSES
    )
    args.update(kw)
    return VisionTransformer(pe="lape", **args).eval()


def _official_to_ref(name: str) -> str:
    """Official LaPE key -> the plain reference ViT's (tests/models/_vit_reference.py) parameter name."""
    table = {
        "cls_token": "cls",
        "pos_embed": "pos",
        "patch_embed.proj.weight": "conv.weight",
        "patch_embed.proj.bias": "conv.bias",
    }
    if name in table:
        return table[name]
    m = re.match(r"blocks\.(\d+)\.(.*)$", name)
    if m is None:
        return name  # norm.*, head.*
    rest = {
        "pe_norm": "pos_ln",
        "norm1": "ln1",
        "norm2": "ln2",
        "attn.qkv": "qkv",
        "attn.proj": "proj",
        "mlp.fc1": "fc1",
        "mlp.fc2": "fc2",
    }
    mod, param = m.group(2).rsplit(".", 1)
    return f"blocks.{m.group(1)}.{rest[mod]}.{param}"


X = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


def test_official_lape_checkpoint_loads_strict_with_the_official_logits():
    """Failed before: 6 unexpected ``blocks.i.pe_norm.*`` keys under strict, PE norms left at init otherwise."""
    official = random_state_dict(lape_official_layout())
    model = _lape_model()
    result = load_pretrained(model, {"model": official, "epoch": 299, "args": {}})  # strict by default
    assert result.missing_keys == [] and result.unexpected_keys == []
    for i in range(DEPTH):
        assert torch.equal(model.blocks[i].norm1.pos_weight, official[f"blocks.{i}.pe_norm.weight"])
        assert torch.equal(model.blocks[i].norm1.pos_bias, official[f"blocks.{i}.pe_norm.bias"])
    ref = RefViT("lape", "cls", img=IMG, patch=PATCH, chans=3, dim=D, depth=DEPTH, heads=HEADS, classes=CLASSES)
    ref.load_state_dict({_official_to_ref(k): v for k, v in official.items()})
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=2e-5, rtol=1e-4)


def test_our_lape_weights_in_the_official_layout_round_trip_exactly():
    """Our lape model's weights renamed to the official layout (the inverse of the key map) load back exactly."""
    ours = _lape_model()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    back = {re.sub(r"\.norm1\.pos_(weight|bias)$", r".pe_norm.\1", k): v for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in back.items()} == lape_official_layout()
    fresh = _lape_model()
    load_pretrained(fresh, {"model": back})
    with torch.no_grad():
        assert torch.equal(fresh(X), ours(X))


def test_official_lape_distilled_checkpoint():
    official = random_state_dict(lape_official_layout(distilled=True), seed=1)
    model = _lape_model(distilled=True)
    result = load_pretrained(model, {"model": official})
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.head_dist.weight, official["head_dist.weight"])
    assert torch.equal(model.blocks[2].norm1.pos_bias, official["blocks.2.pe_norm.bias"])


def test_missing_pe_norms_are_an_error_under_strict_and_reported_otherwise():
    """A plain DeiT checkpoint (no PE norms) into pe='lape': strict (the default) raises naming them; strict=False
    warns naming every one and returns them (they stay at identity)."""
    official = random_state_dict(lape_official_layout())
    plain = {k: v for k, v in official.items() if ".pe_norm." not in k}
    model = _lape_model()
    with pytest.raises(RuntimeError, match=r"blocks\.0\.norm1\.pos_weight.*PE LayerNorms"):
        load_pretrained(model, plain)
    with pytest.warns(UserWarning, match=r"blocks\.2\.norm1\.pos_bias"):
        result = load_pretrained(model, plain, strict=False)
    assert sorted(result.missing_keys) == sorted(model.pe_norm_parameter_names()) and len(result.missing_keys) == 6


# ----------------------------------------------------------------------------------------------- Swin


def _swin(seed: int = 0, **kw) -> SwinTransformer:
    args = dict(
        img_size=32,
        patch_size=2,
        embed_dim=8,
        depths=(2, 2, 2),
        num_heads=(1, 2, 2),
        window_size=4,
        num_classes=5,
        pos_embed="rpe",
    )
    args.update(kw)
    torch.manual_seed(seed)
    return SwinTransformer(**args).eval()


def to_microsoft_layout(model: SwinTransformer) -> dict[str, torch.Tensor]:
    """A timm-layout Swin state dict (ours) rewritten as microsoft/Swin-Transformer saves it."""
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", k)
        if m:  # timm: start of stage i + 1 -> Microsoft: end of stage i
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        k = re.sub(r"^head\.fc\.", "head.", k)
        k = "absolute_pos_embed" if k == "pos_embed" else k
        out[k] = v.clone()
    for name, buf in model.named_buffers():  # the persistent buffers of the official code
        if name.endswith(("relative_position_index", "attn_mask")):
            out[name] = buf.clone()
    return out


@pytest.mark.parametrize("pos_embed", ["rpe", "learn"])
def test_microsoft_swin_checkpoint_loads_strict_with_its_head_and_exact_logits(pos_embed):
    """Failed before: a size mismatch on layers.1/2.downsample and the head dropped without a word."""
    src = _swin(pos_embed=pos_embed)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ms = to_microsoft_layout(src)
    assert "layers.0.downsample.reduction.weight" in ms and "layers.2.downsample.norm.weight" not in ms
    assert "head.weight" in ms and "layers.0.blocks.1.attn_mask" in ms
    fresh = _swin(pos_embed=pos_embed, seed=1)
    result = load_pretrained(fresh, {"model": ms})
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(fresh.head.fc.weight, ms["head.weight"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fresh(x), src(x))


def test_microsoft_swin_into_lape_swin_reports_the_bias_norms():
    ms = to_microsoft_layout(_swin())
    model = _swin(pe="lape")
    with pytest.raises(RuntimeError, match="rpe_norm.pos_weight"):
        load_pretrained(model, ms)
    with pytest.warns(UserWarning, match="rpe_norm"):
        result = load_pretrained(model, ms, strict=False)
    assert sorted(result.missing_keys) == sorted(model.pe_norm_parameter_names()) and not result.unexpected_keys
