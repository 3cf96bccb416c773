"""DeiT distilled against the real timm: a randomly initialised timm ``deit_tiny_distilled_patch16_224`` state dict
loads strictly into ``pe='default'`` and gives the same eval logits (skipped where timm cannot be imported)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip(
    "timm", reason="timm is not importable here; the timm tier runs in a venv with torch 2.14.1 + torchvision + timm"
)

from mpvg_kernels.models import create_model, load_pretrained  # noqa: E402


def test_timm_deit_tiny_distilled_loads_strictly_and_matches():
    torch.manual_seed(0)
    ref = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    with torch.no_grad():  # non-trivial LayerNorm affines and biases (timm initialises them to 1 / 0)
        g = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    ours = create_model("deit_tiny_distilled_patch16_224", pe="default").eval()
    sd = ref.state_dict()
    assert set(sd) == set(ours.state_dict())
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expect = ref(x)
        got = ours(x)
        torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
        assert expect.abs().max() > 1e-2  # the check is not vacuous
        # timm's pre-logits of a distilled DeiT: the mean of the two normalised tokens
        torch.testing.assert_close(
            ours.forward_pooled(x), ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-4, rtol=1e-4
        )
    # the same checkpoint into the PE modes through the loader: only the new PE LayerNorms are missing
    for pe in ("lape", "pvg", "mpvg"):
        m = create_model("deit_tiny_distilled_patch16_224", pe=pe)
        result = load_pretrained(m, sd, strict=False)  # the PE norms are not in it
        assert sorted(result.missing_keys) == sorted(m.pe_norm_parameter_names())
