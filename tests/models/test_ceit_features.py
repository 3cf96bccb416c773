"""CeiT's timm feature contract without timm: ``feature_info``, ``forward_intermediates`` (taps, formats, the final
output == ``forward_features``, ``norm=True`` == the last norm by hand) and ``prune_intermediate_layers`` (taps kept,
no unused parameters, the head that reads every block removed or kept), in every PE mode (float64, tiny config)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mpvg_kernels.models import create_model
from mpvg_kernels.models.ceit import CeiT

MODES = ["default", "lape", "pvg", "mpvg"]
# 32 px -> I2T stem 8x8 -> 2x2 projection: a 4x4 token grid (reduction 8), 3 blocks
KW = dict(img_size=32, patch_size=2, stem_chans=16, embed_dim=32, depth=3, num_heads=2, num_classes=5)
D, GRID, LAST = 32, (4, 4), 2


def _model(pe: str, seed: int = 0, **kw) -> CeiT:
    """A float64 tiny CeiT with non-trivial LayerNorm/LN' affines, PE, layer embedding and class token."""
    torch.manual_seed(seed)
    m = CeiT(pe=pe, **{**KW, **kw}).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name in ("pos_embed", "pos_layer_embed", "cls_token"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    m.clear_pe_cache()
    return m


def _x(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _by_hand_norm(m: CeiT, tokens: torch.Tensor) -> torch.Tensor:
    """The last norm applied per token by hand: LN(x) (+ LN'_last(p) for MPVG, p = pos with last_pos=0)."""
    ln = m.norm
    y = F.layer_norm(tokens, (D,), ln.weight, ln.bias, m.norm_eps)
    if m.last_pos is not None:
        assert m.last_pos == 0
        y = y + F.layer_norm(m.pos_embed, (D,), ln.pos_weight, ln.pos_bias, m.norm_eps)
    return y


# ----------------------------------------------------------------------------- feature_info


def test_feature_info_one_entry_per_block_with_the_i2t_reduction():
    m = _model("mpvg")
    assert m.feature_info == [dict(module=f"blocks.{i}", num_chs=D, reduction=8) for i in range(3)]
    with torch.device("meta"):
        full = create_model("ceit_tiny_patch16_224", pe="mpvg")  # 224 px -> 14 x 14 tokens
    assert [f["reduction"] for f in full.feature_info] == [16] * 12
    assert [f["num_chs"] for f in full.feature_info] == [192] * 12
    assert [f["module"] for f in full.feature_info] == [f"blocks.{i}" for i in range(12)]
    odd = CeiT(pe="default", **{**KW, "img_size": 48})  # 48 px -> 12x12 stem -> 6x6 tokens
    assert odd.feature_info[0]["reduction"] == 8 and odd.i2t.grid_size == (6, 6)


# ----------------------------------------------------------------------------- forward_intermediates


@pytest.mark.parametrize("pe", MODES)
def test_forward_intermediates_taps_formats_and_final(pe):
    m = _model(pe).eval()
    x = _x()
    npt = m.num_prefix_tokens
    with torch.no_grad():
        an = m.forward_analysis(x)  # block l's output is block l+1's input; the last one gives the last readout
        final, taps = m.forward_intermediates(x)  # the PE cache
        assert len(taps) == 3 and all(t.shape == (2, D, *GRID) for t in taps)
        torch.testing.assert_close(final, m.forward_features(x), rtol=0, atol=0)
        assert final.shape == (2, D)
        for i in range(LAST):
            want = an["block_inputs"][i + 1][:, npt:].transpose(1, 2).reshape(2, D, *GRID)
            torch.testing.assert_close(taps[i], want)
        nlc = m.forward_intermediates(
            x, indices=[-1], output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
        ((patches, prefix),) = nlc
        assert patches.shape == (2, 16, D) and prefix.shape == (2, 1, D)
        torch.testing.assert_close(patches, taps[-1].flatten(2).transpose(1, 2))
        last_read = prefix[:, 0] if m.pool == "cls" else patches.mean(1)
        torch.testing.assert_close(last_read, an["readouts"][-1])
        d = m.forward_intermediates(x, indices=2, output_dict=True, return_prefix_tokens=True)
        assert set(d) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
        torch.testing.assert_close(d["image_intermediates"], taps[1:])
        torch.testing.assert_close(d["image_features"], final)
        early = m.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early, taps[:2])
    # live (train: BatchNorm batch statistics, the PE terms computed along the walk) and grad checkpointing
    m.train()
    live_final, live_taps = m.forward_intermediates(x)
    torch.testing.assert_close(live_final, m.forward_features(x), rtol=0, atol=0)
    m.set_grad_checkpointing(True)
    ckpt_final, ckpt_taps = m.forward_intermediates(x)
    torch.testing.assert_close(ckpt_final, live_final)
    torch.testing.assert_close(ckpt_taps, live_taps)
    m.eval()  # (the train-mode passes moved the BatchNorm running statistics)
    ckpt_final, _ = m.forward_intermediates(x)  # eval with gradients: live walk, checkpointed blocks
    with torch.no_grad():
        torch.testing.assert_close(ckpt_final, m.forward_features(x))  # the cache


@pytest.mark.parametrize("pe", MODES)
def test_norm_true_is_the_last_norm_per_token(pe):
    m = _model(pe).eval()
    x = _x()
    with torch.no_grad():
        raw = m.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
        normed = m.forward_intermediates(
            x, norm=True, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
        stopped = m.forward_intermediates(
            x,
            indices=[0],
            norm=True,
            stop_early=True,
            output_fmt="NLC",
            return_prefix_tokens=True,
            intermediates_only=True,
        )
    for (p, c), (pn, cn) in zip(raw, normed, strict=True):
        want = _by_hand_norm(m, torch.cat([c, p], dim=1))
        torch.testing.assert_close(torch.cat([cn, pn], dim=1), want)
    torch.testing.assert_close(stopped[0][0], normed[0][0])
    m.train()  # live: LN'_last from the walk's last source
    raw = m.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    normed = m.forward_intermediates(x, norm=True, output_fmt="NLC", intermediates_only=True)
    for p, pn in zip(raw, normed, strict=True):
        torch.testing.assert_close(pn, _by_hand_norm(m, torch.cat([torch.zeros_like(p[:, :1]), p], 1))[:, 1:])


# ----------------------------------------------------------------------------- prune_intermediate_layers


@pytest.mark.parametrize("pe", MODES)
def test_pruning_keeps_taps_and_leaves_no_unused_parameter(pe):
    model = _model(pe).eval()
    x = _x()
    npt = model.num_prefix_tokens
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
        kept = copy.deepcopy(model)
        assert kept.prune_intermediate_layers([LAST], prune_head=False) == [LAST]
        torch.testing.assert_close(kept(x), expected, rtol=0, atol=0)
        assert kept.lca is not None and kept.num_classes == 5
    for i in range(LAST + 1):
        for prune_norm in (False, True):
            pruned = copy.deepcopy(model)
            assert pruned.prune_intermediate_layers([i], prune_norm=prune_norm) == [i]
            assert len(pruned.blocks) == i + 1 and len(pruned.feature_info) == i + 1
            assert pruned.lca is None and pruned.pos_layer_embed is None and pruned.num_classes == 0
            assert not any(k.startswith(("lca.", "pos_layer_embed")) for k in pruned.state_dict())
            patches, prefix = taps[i]
            tokens = torch.cat([prefix, patches], dim=1)
            with torch.no_grad():
                sel = pruned.forward_intermediates(x, indices=[i], output_fmt="NLC", intermediates_only=True)
                torch.testing.assert_close(sel[0], patches)
                feats = pruned.forward_features(x)  # per-token features of the last kept block
                want = tokens if prune_norm else _by_hand_norm(model, tokens)
                torch.testing.assert_close(feats, want)
                pooled = feats[:, 0] if pruned.pool == "cls" else feats[:, npt:].mean(1)
                torch.testing.assert_close(pruned.forward_head(feats), pooled)
                torch.testing.assert_close(pruned(x), pooled)
                final, _ = pruned.forward_intermediates(x, indices=[i], stop_early=True)
                torch.testing.assert_close(final, feats)
            pruned.train()
            sel = pruned.forward_intermediates(x, indices=[i], intermediates_only=True)
            (sum(s.sum() for s in sel) + pruned.forward_features(x).sum()).backward()
            unused = [n for n, p in pruned.named_parameters() if p.requires_grad and p.grad is None]
            assert not unused, f"pruned to {i} (prune_norm={prune_norm}): unused {unused}"


def test_pruning_keeps_the_mpvg_last_source_block():
    m = _model("mpvg", last_pos=1)
    with pytest.raises(ValueError, match="prune_norm=True"):
        m.prune_intermediate_layers([0])
    assert len(m.blocks) == 3 and m.lca is not None  # nothing changed
    assert m.prune_intermediate_layers([0], prune_norm=True) == [0]
    assert m.last_pos is None and m(_x()).shape == (2, D)


def test_prune_head_false_keeps_norm_choice():
    m = _model("mpvg").eval()
    x = _x()
    with torch.no_grad():
        _, taps = m.forward_intermediates(x)
        m.prune_intermediate_layers([-1], prune_norm=True, prune_head=False)  # the LCA stays, its output unnormed
        z = m.forward_features(x)
        assert z.shape == (2, D) and m.last_pos is None
        torch.testing.assert_close(m.head(z), m(x))
        torch.testing.assert_close(m.forward_intermediates(x)[1], taps)


# ----------------------------------------------------------------------------- errors


def test_errors_name_what_is_wrong():
    m = _model("mpvg")
    x = _x()
    with pytest.raises(ValueError, match="LCA reads every block"):
        m.forward_intermediates(x, indices=[0], stop_early=True)
    with pytest.raises(ValueError, match="LCA reads every block"):
        m.prune_intermediate_layers([1], prune_head=False)
    assert len(m.blocks) == 3  # refused before any change
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, indices=[3])
    with pytest.raises(ValueError, match="out of range"):
        m.prune_intermediate_layers(4)
    terms = m.compute_pe_terms()
    m.prune_intermediate_layers([1])
    with pytest.raises(ValueError, match="pe_terms holds terms for 3 blocks, this model has 2"):
        m(x, pe_terms=terms)
    with pytest.raises(RuntimeError, match="prune_intermediate_layers"):
        m.forward_analysis(x)
