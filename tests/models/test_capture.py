"""Captured inference never replays a stale model: after any change (PE parameters, any module attribute such as a
LayerNorm's eps, a swapped submodule or parameter) the capture is redone (or the call refuses), and every call runs
the model in eval mode, giving each module its own mode back. On CPU the same rule runs without a CUDA graph;
tests/gpu exercises the graph itself."""

from __future__ import annotations

import copy

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


def _uncached(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An eval-mode output computed from the model as it is now (PE cache off), leaving its modes as they were."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    model.pe_cache_enabled = False
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.pe_cache_enabled = True
        for m, t in modes:
            m.training = t


def _perturbed(m: torch.nn.Module) -> torch.nn.Module:
    new = copy.deepcopy(m)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.1)
    return new


CHANGES = {
    "blocks.1.norm1.eps": lambda m: setattr(m.blocks[1].norm1, "eps", 0.3),
    "norm.eps": lambda m: setattr(m.norm, "eps", 0.3),
    "pe_walk.hierarchical": lambda m: setattr(m.pe_walk, "hierarchical", False),
    "blocks.2.norm1 swapped": lambda m: setattr(m.blocks[2], "norm1", _perturbed(m.blocks[2].norm1)),
    "head swapped": lambda m: setattr(m, "head", _perturbed(m.head)),
    # a perturbation that differs per feature: a constant added to every weight leaves the logits of LayerNormed
    # features (whose entries sum to 0 at init) unchanged up to rounding
    "head.weight replaced": lambda m: setattr(m.head, "weight", torch.nn.Parameter(
        m.head.weight.detach() + 0.1 * torch.randn(m.head.weight.shape, generator=torch.Generator().manual_seed(2)))),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_of_the_model_triggers_a_new_capture(change: str) -> None:
    model = _model()
    cap = CapturedInference(model, _x())
    before = cap(_x(1))
    CHANGES[change](model)
    want = _uncached(model, _x(1))
    assert not torch.allclose(want, before), "the change does not change the output"
    assert cap.stale
    torch.testing.assert_close(cap(_x(1)), want)
    assert cap.captures == 2 and not cap.stale


def test_every_call_runs_in_eval_mode_and_restores_the_callers_mode() -> None:
    torch.manual_seed(0)
    model = create_model("vit_digits", pe="mpvg", drop_rate=0.3, attn_drop_rate=0.3, drop_path_rate=0.3)
    cap = CapturedInference(model, _x())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(_x(2)).sum().backward()
    opt.step()
    model.blocks[0].eval()  # a caller's mixed modes come back as they were
    modes = [m.training for m in model.modules()]
    first, second = cap(_x(1)), cap(_x(1))
    assert torch.equal(first, second), "dropout was live in a captured call"
    assert [m.training for m in model.modules()] == modes
    torch.testing.assert_close(first, _uncached(model, _x(1)))
    assert cap.captures == 2  # the step changed the parameters: captured again, in eval mode

    fresh = create_model("vit_digits", pe="mpvg", drop_rate=0.3).train()
    CapturedInference(fresh, _x())
    assert all(m.training for m in fresh.modules()), "the constructor changed the caller's mode"


def test_input_of_another_dtype_or_device_is_refused() -> None:
    cap = CapturedInference(_model(), _x())
    with pytest.raises(ValueError, match="dtype"):
        cap(_x(1).double())
