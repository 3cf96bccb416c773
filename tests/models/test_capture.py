"""Captured inference never replays stale PE terms: after any PE parameter update the capture is redone (or the
call refuses). On CPU the same rule runs without a CUDA graph; tests/gpu exercises the graph itself."""

from __future__ import annotations

import pytest
import torch

from mpvg_kernels.models import create_model
from mpvg_kernels.models.capture import CapturedInference


def _model(pe: str = "mpvg") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vit_digits", pe=pe)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_step_triggers_a_new_capture(fused: bool) -> None:
    model = _model()
    cap = CapturedInference(model, _x())
    torch.testing.assert_close(cap(_x(1)), _eager(model, _x(1)))
    assert cap.captures == 1 and not cap.stale

    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)
    model.train()
    model(_x(2)).sum().backward()
    opt.step()
    assert cap.stale
    out = cap(_x(1))
    assert cap.captures == 2
    torch.testing.assert_close(out, _eager(model, _x(1)))


def test_load_state_dict_triggers_a_new_capture() -> None:
    model, other = _model(), create_model("vit_digits", pe="mpvg")
    cap = CapturedInference(model, _x())
    before = cap(_x(1))
    model.load_state_dict(other.state_dict())
    after = cap(_x(1))
    assert cap.captures == 2 and not torch.allclose(before, after)
    torch.testing.assert_close(after, _eager(other, _x(1)))


def test_raise_policy_and_invisible_writes() -> None:
    model = _model("lape")
    cap = CapturedInference(model, _x(), on_change="raise")
    with torch.no_grad():
        model.pos_embed.add_(0.5)  # an in-place edit bumps the version counter
    with pytest.raises(RuntimeError, match="stale PE terms"):
        cap(_x(1))

    cap = CapturedInference(model, _x())
    model.blocks[0].norm1.pos_bias.data.add_(1.0)  # bypasses the version counter: invisible, as documented
    assert not cap.stale
    cap.invalidate()
    torch.testing.assert_close(cap(_x(1)), _eager(model, _x(1)))
    assert cap.captures == 2


def test_shape_and_policy_errors() -> None:
    model = _model()
    cap = CapturedInference(model, _x())
    with pytest.raises(ValueError, match="shape"):
        cap(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="on_change"):
        CapturedInference(model, _x(), on_change="ignore")
