"""StreamDualLayerNorm / StreamLastNorm: the one-argument PE norms for timm's own Block (no timm needed here)."""

from __future__ import annotations

import torch
from torch import nn

from mpvg_kernels.layers import DualLayerNorm
from mpvg_kernels.layers.blocks import PEStream, StreamDualLayerNorm, StreamLastNorm


class _Owner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))  # class row + 2x2 grid
        self.num_prefix_tokens = 1
        self.patch_embed = nn.Module()
        self.patch_embed.grid_size = (2, 2)


def _norms(owner: nn.Module, hierarchical: bool) -> tuple[PEStream, list[StreamDualLayerNorm]]:
    stream = PEStream(owner, hierarchical=hierarchical)
    norms = []
    for _ in range(3):
        n = StreamDualLayerNorm(8)
        with torch.no_grad():
            for p in n.parameters():
                p.normal_()
        n.stream = stream
        stream.norms.append(n)
        norms.append(n)
    return stream, norms


def test_stream_norm_chain_matches_dual_layer_norm():
    owner = _Owner()
    x = torch.randn(2, 5, 8)
    for hierarchical in (True, False):
        _, norms = _norms(owner, hierarchical)
        p = owner.pos_embed
        for n in norms:
            plain = DualLayerNorm(8)
            plain.load_state_dict(n.state_dict())
            y, term = plain(x, p)
            torch.testing.assert_close(n(x), y)
            y2, term2 = n(x, p)  # with pos: DualLayerNorm's two outputs
            torch.testing.assert_close(term2, term)
            if hierarchical:
                p = term


def test_stream_last_norm_and_resampling():
    owner = _Owner()
    stream, _ = _norms(owner, True)
    last = StreamLastNorm(8)
    last.stream = stream
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(last(x), last.norm_tokens(x) + last.pos_term(owner.pos_embed))
    assert stream.pos(1 + 16).shape == (1, 17, 8)  # another grid: resampled, class row kept
    torch.testing.assert_close(stream.pos(17)[:, :1], owner.pos_embed[:, :1])
    unbound = StreamDualLayerNorm(8)
    try:
        unbound(x)
    except RuntimeError as e:
        assert "attach_pe" in str(e)
    else:
        raise AssertionError("an unbound norm must refuse one-argument calls")
