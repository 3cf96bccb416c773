"""CeiT through timm: ``features_only=True`` (timm's FeatureGetterNet over CeiT's ``forward_intermediates``, the
model pruned by ``prune_intermediate_layers``) in every PE mode (skipped where timm cannot be imported)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip(
    "timm", reason="timm is not importable here; the timm tier runs in a venv with torch 2.14.1 + torchvision + timm"
)

import mpvg_kernels  # noqa: E402, F401  (registers the models with timm)

# the registered tiny variant's stem and width at 64 px: 16x16 after the stem, 8x8 tokens (reduction 8), 4 blocks
TINY = dict(img_size=64, patch_size=2, stem_chans=16, embed_dim=32, depth=4, num_heads=2)


def _x(b: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("pe", ["default", "lape", "pvg", "mpvg"])
def test_features_only_gives_the_last_three_blocks_nchw(pe):
    f = timm.create_model(f"{pe}_ceit_tiny_patch16_224", features_only=True, **TINY).eval()
    assert f.feature_info.channels() == [32] * 3 and f.feature_info.reduction() == [8] * 3
    assert f.feature_info.module_name() == ["blocks.1", "blocks.2", "blocks.3"]
    model = f.model
    assert model.lca is None and isinstance(model.head, torch.nn.Identity)
    full = timm.create_model(f"{pe}_ceit_tiny_patch16_224", **TINY).eval()
    full.load_state_dict(model.state_dict(), strict=False)  # the pruned model's weights (no LCA, no head)
    with torch.no_grad():
        out = f(_x())
        want = full.forward_intermediates(_x(), indices=3, intermediates_only=True)
    assert [tuple(o.shape) for o in out] == [(2, 32, 8, 8)] * 3
    torch.testing.assert_close(out, want)


def test_features_only_at_224_has_reduction_16():
    f = timm.create_model("mpvg_ceit_tiny_patch16_224", features_only=True, out_indices=(0, 5, 11))
    assert f.feature_info.channels() == [192] * 3 and f.feature_info.reduction() == [16] * 3
    with torch.no_grad():
        out = f.eval()(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape) for o in out] == [(1, 192, 14, 14)] * 3
