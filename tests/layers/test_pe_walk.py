"""The one rule of which block takes which PE term: the modes' knobs and the walk every family runs."""

from __future__ import annotations

import pytest
import torch

from mpvg_kernels.layers.pe_walk import (
    NO_ABSOLUTE_PE_PRESETS,
    PE_MODES,
    SWIN_PRESETS,
    PEWalk,
    resolve_pe_knobs,
)


@pytest.mark.parametrize(
    "pe,uses,add,last",
    [
        ("default", (False,) * 4, True, None),
        ("lape", (True,) * 4, False, None),
        ("pvg", (False, True, True, True), True, None),
        ("mpvg", (False, True, True, True), True, 0),
    ],
)
def test_presets(pe: str, uses: tuple, add: bool, last: int | None):
    k = resolve_pe_knobs(pe, 4)
    assert (k.block_uses_pos, k.add_pos_to_input, k.last_pos) == (uses, add, last)
    assert k.uses_pos and k.walk().uses_pos == uses


def test_knobs_override_and_swin_presets():
    k = resolve_pe_knobs("mpvg", 5, include_layer0=True, hierarchical=False, last_pos=-1, pe_layers=None)
    assert k.block_uses_pos == (True,) * 5 and not k.hierarchical and k.last_pos == 4
    assert resolve_pe_knobs("pvg", 3, presets=SWIN_PRESETS).block_uses_pos == (True,) * 3
    assert resolve_pe_knobs("default", 3, presets=SWIN_PRESETS).block_uses_pos == (False,) * 3
    assert resolve_pe_knobs("pvg", 3, presets=SWIN_PRESETS, include_layer0=False).block_uses_pos == (False, True, True)
    assert resolve_pe_knobs("lape", 4, pe_layers=2).block_uses_pos == (True, True, False, False)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(pe="default", include_layer0=True), ValueError, "applies to the layer-wise modes"),
        (dict(pe="default", pe_layers=2), ValueError, "applies to the layer-wise modes"),
        (dict(pe="lape", pe_layers=0), ValueError, "pe_layers must be an integer in"),
        (dict(pe="lape", pe_layers=5), ValueError, "pe_layers must be an integer in"),
        (dict(pe="mpvg", last_pos=4), ValueError, "last_pos must be in"),
        (dict(pe="mpvg", last_pos=1.0), TypeError, "last_pos must be an int"),
        (dict(pe="mpvg", last_pos=3, pe_layers=2), ValueError, "block 3 takes no PE"),
        (dict(pe="nope"), ValueError, "pe must be one of"),
        (dict(pe="pvg", presets=NO_ABSOLUTE_PE_PRESETS, model="pos_embed='rpe'"), ValueError,
         "pe='pvg' delivers an absolute position embedding .* but pos_embed='rpe' has none"),
        (dict(pe="lape", presets=NO_ABSOLUTE_PE_PRESETS, hierarchical=True), ValueError,
         "hierarchical needs an absolute position embedding; this model has none"),
        (dict(pe="default", presets=NO_ABSOLUTE_PE_PRESETS, last_pos=0), ValueError,
         "last_pos needs an absolute position embedding"),
    ],
)
def test_bad_knobs_are_named(kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        resolve_pe_knobs(depth=4, **kwargs)


@pytest.mark.parametrize("pe", ["default", "lape"])
def test_a_model_without_absolute_pe_delivers_none(pe: str):
    """Swin with its relative bias alone: no PE at the input, in a block or at the last norm."""
    k = resolve_pe_knobs(pe, 3, presets=NO_ABSOLUTE_PE_PRESETS, last_pos=None)
    assert (k.uses_pos, k.block_uses_pos, k.add_pos_to_input, k.last_pos) == (False, (False,) * 3, False, None)


def test_pruned_knobs():
    """timm's prune_intermediate_layers: fewer blocks, and the last PE goes with the last norm."""
    k = resolve_pe_knobs("mpvg", 4, last_pos=2)
    assert k.pruned(3).block_uses_pos == (False, True, True) and k.pruned(3).last_pos == 2
    assert k.pruned(2, last_norm=False).last_pos is None
    assert k.pruned(2, last_norm=False).walk().depth == 2
    with pytest.raises(ValueError, match="last_pos=2 takes LN'_last's input from block 2, which pruning to 2 blocks"):
        k.pruned(2)


@pytest.mark.parametrize("pe", PE_MODES)
def test_walk_terms_follow_the_chain(pe: str):
    knobs = resolve_pe_knobs(pe, 3, last_pos=2 if pe == "mpvg" else None)  # mpvg: the term of block 2
    walk = knobs.walk()
    pos = torch.randn(1, 4, 8, dtype=torch.float64)
    terms = walk.terms(pos, lambda i, p: p * (i + 2), last_term=lambda p: p + 1)
    expect, cur = [], pos
    for i, u in enumerate(knobs.block_uses_pos):
        if u:
            cur = cur * (i + 2)
        expect.append(cur if u else None)
    for t, e in zip(terms.terms, expect, strict=True):
        assert (t is None) == (e is None) and (t is None or torch.equal(t, e))
    if knobs.last_pos is not None:
        assert torch.equal(terms.last_term, expect[knobs.last_pos] + 1)


def test_walk_refuses_a_last_pos_without_a_term():
    with pytest.raises(ValueError, match="must be 0 or a block that takes a PE term"):
        PEWalk([False, True], hierarchical=True, last_pos=3)


@pytest.mark.parametrize("hierarchical", [True, False])
@pytest.mark.parametrize("uses", [(True, True, True, True), (False, True, False, True), (True, False, False, True)])
@pytest.mark.parametrize("last_pos", [None, 0, 3])
def test_source_block_names_what_the_step_hands_out(uses: tuple, hierarchical: bool, last_pos: int | None):
    """source_block / last_source_block say, without running the walk, which tensor a running walk hands out."""
    walk = PEWalk(uses, hierarchical=hierarchical, last_pos=last_pos)
    pos = torch.zeros(1)
    step = walk.start(pos)
    made = {}
    for i, u in enumerate(uses):
        src = step.source(i)
        if u:
            k = walk.source_block(i)
            assert src is (pos if k is None else made[k])
        made[i] = torch.zeros(1)
        step.record(i, made[i])
    if last_pos is not None:
        k = walk.last_source_block
        assert step.last_source is (pos if k is None else made[k])
