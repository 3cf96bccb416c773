"""The position-embedding walk: which PE each block receives and which one feeds the last LayerNorm.

The four modes are presets of the same knobs (``docs/design.md#the-method``):

| mode      | add_pos_to_input | PE term at block l          | include_layer0 | hierarchical | last_pos |
|-----------|------------------|-----------------------------|----------------|--------------|----------|
| default   | True             | none                        | -              | -            | None     |
| lape      | False            | LN'_l(p_l), every l         | True           | True         | None     |
| pvg       | True             | LN'_l(p_l), l >= 1          | False          | True         | None     |
| mpvg      | True             | as pvg                      | False          | True         | 0        |

Hierarchical: p_l = the term of the previous PE block (p = ``pos`` for the first); otherwise p_l = ``pos`` for
every block. ``last_pos = k`` feeds LN'_last with ``pos`` (k = 0) or with the term of block k.

A family whose rules differ has its own preset table: :data:`SWIN_PRESETS` (every layer-wise mode includes layer 0)
and :data:`NO_ABSOLUTE_PE_PRESETS` (a model without an absolute PE: Swin with its relative bias alone).
:func:`check_pe_mode` is the one check of the mode's name; :func:`resolve_pe_knobs` turns a mode, a preset table and
the knobs given into :class:`PEKnobs`.

:class:`PEWalk` is that rule, written once. Every consumer runs the same loop over the blocks: ask
:meth:`PEWalk.Step.source` for the PE a block normalises, hand the block's term back with
:meth:`PEWalk.Step.record`, and read :attr:`PEWalk.Step.last_source` at the end. The training forward (fused
``dual_layer_norm`` per block), the cached inference terms (:meth:`PEWalk.terms`), the unfused intermediates of
the analysis and the frozen terms of an export all go through it; a new model family reuses it as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch

__all__ = [
    "AUTO",
    "NO_ABSOLUTE_PE_PRESETS",
    "PE_MODES",
    "POOLS",
    "POOL_ALIASES",
    "PEKnobs",
    "PEPreset",
    "PETerms",
    "PEWalk",
    "PRESETS",
    "SWIN_PRESETS",
    "check_pe_mode",
    "default_pool",
    "resolve_pe_knobs",
]

#: The position-embedding modes, in the order the papers' tables list them.
PE_MODES: tuple[str, ...] = ("default", "lape", "pvg", "mpvg")
#: Pooling of the final features: ``cls`` (class token) or ``avg`` (global average pooling).
POOLS: tuple[str, ...] = ("cls", "avg")
#: timm's ``global_pool`` names (and ours) -> our pooling.
POOL_ALIASES: dict[str, str] = {"token": "cls", "cls": "cls", "avg": "avg"}


def check_pe_mode(pe: str) -> str:
    """``pe`` if it names a position-embedding mode (:data:`PE_MODES`); else the ValueError every entry point gives."""
    if pe not in PE_MODES:
        raise ValueError(f"pe must be one of {PE_MODES}, got {pe!r}")
    return pe


@dataclass(frozen=True)
class PEPreset:
    """The knob values a mode stands for. ``absolute=False``: the model has no absolute PE in this mode (nothing
    is added, normalised or pooled, and no knob applies)."""

    layerwise: bool
    add_pos_to_input: bool
    include_layer0: bool
    hierarchical: bool
    last_pos: int | None
    absolute: bool = True


PRESETS: dict[str, PEPreset] = {
    "default": PEPreset(layerwise=False, add_pos_to_input=True, include_layer0=False, hierarchical=False,
                        last_pos=None),
    "lape": PEPreset(layerwise=True, add_pos_to_input=False, include_layer0=True, hierarchical=True, last_pos=None),
    "pvg": PEPreset(layerwise=True, add_pos_to_input=True, include_layer0=False, hierarchical=True, last_pos=None),
    "mpvg": PEPreset(layerwise=True, add_pos_to_input=True, include_layer0=False, hierarchical=True, last_pos=0),
}

#: Swin with an absolute PE (MPVG's Swin): "for Swin, PVG and MPVG exceptionally include layer 0", so every
#: layer-wise mode includes it.
SWIN_PRESETS: dict[str, PEPreset] = {
    pe: replace(p, include_layer0=True) if p.layerwise else p for pe, p in PRESETS.items()
}

_NO_PE = PEPreset(layerwise=False, add_pos_to_input=False, include_layer0=False, hierarchical=False, last_pos=None,
                  absolute=False)
#: A model without an absolute PE (Swin with its relative position bias alone, LaPE's Swin): ``default`` and
#: ``lape`` (whose LayerNorm joins the relative bias instead) deliver nothing; ``pvg`` and ``mpvg`` exist to deliver
#: an absolute PE and are missing.
NO_ABSOLUTE_PE_PRESETS: dict[str, PEPreset] = {"default": _NO_PE, "lape": _NO_PE}


#: ``last_pos="auto"``: the mode's own value.
AUTO = "auto"


def default_pool(pe: str) -> str:
    """The pooling each mode uses in the papers: ``avg`` (GAP) for pvg/mpvg, ``cls`` for default/lape."""
    return "avg" if pe in ("pvg", "mpvg") else "cls"


@dataclass
class PETerms:
    """Everything the PE contributes that does not depend on the image, for one token grid.

    ``pos``: the PE [1, T, D] (resampled to the grid); ``terms[l]``: the term added at block l (None: none);
    ``last_term``: LN'_last(p) [1, T, D] or None; ``pooled_bias``: ``norm.bias + mean_n LN'_last(p)_n`` [D] when
    the model average-pools (the whole PE contribution after pooling), else None.
    """

    pos: torch.Tensor
    terms: list[torch.Tensor | None]
    last_term: torch.Tensor | None = None
    pooled_bias: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{name: tensor}`` of every tensor held (``terms.3`` for block 3), e.g. to register as buffers."""
        out: dict[str, torch.Tensor] = {"pos": self.pos}
        out.update({f"terms.{i}": t for i, t in enumerate(self.terms) if t is not None})
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in ("pos", "terms") and v is not None:
                out[f.name] = v
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], depth: int) -> PETerms:
        """The inverse of :meth:`tensors` for a model of ``depth`` blocks."""
        return cls(
            pos=tensors["pos"],
            terms=[tensors.get(f"terms.{i}") for i in range(depth)],
            last_term=tensors.get("last_term"),
            pooled_bias=tensors.get("pooled_bias"),
        )


class PEWalk:
    """The PE rule of one model: which blocks take a PE term, hierarchical or not, the source of LN'_last.

    ``uses_pos[l]``: block l adds a PE term to its attention input. ``last_pos``: None (no PE at the last norm),
    0 (``pos`` itself) or k >= 1 (the term of block k, which must take one).
    """

    def __init__(self, uses_pos: Sequence[bool], hierarchical: bool, last_pos: int | None) -> None:
        self.uses_pos = tuple(bool(u) for u in uses_pos)
        self.hierarchical = bool(hierarchical)
        if last_pos is not None and not (last_pos == 0 or (0 < last_pos < len(self.uses_pos)
                                                           and self.uses_pos[last_pos])):
            raise ValueError(f"last_pos={last_pos} must be 0 or a block that takes a PE term")
        self.last_pos = last_pos

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.uses_pos)

    def source_block(self, i: int) -> int | None:
        """Where block ``i``'s PE comes from, known without running the walk: the block whose term it normalises
        (the previous PE block, hierarchical), or None for ``pos`` itself. A family whose PE changes shape along the
        walk (Swin's stages) reads the source's shape from this instead of from the tensor (which fx leaves
        symbolic)."""
        if self.hierarchical:
            for k in range(i - 1, -1, -1):
                if self.uses_pos[k]:
                    return k
        return None

    @property
    def last_source_block(self) -> int | None:
        """Where LN'_last's input comes from: block ``last_pos``'s term, or None for ``pos`` (``last_pos`` 0 or
        no last PE)."""
        return self.last_pos or None

    class Step:
        """The walk's state while a forward runs over the blocks in order."""

        def __init__(self, walk: PEWalk, pos: torch.Tensor | None) -> None:
            self._walk = walk
            self._pos = pos
            self._cur = pos
            self.last_source: torch.Tensor | None = pos if walk.last_pos == 0 else None

        def source(self, i: int) -> torch.Tensor | None:
            """The PE block ``i`` normalises with its LN' (None: block i takes no PE term)."""
            if not self._walk.uses_pos[i]:
                return None
            if self._pos is None:
                raise ValueError(f"block {i} adds a position embedding to its attention input, but pos is None")
            return self._cur if self._walk.hierarchical else self._pos

        def record(self, i: int, term: torch.Tensor | None) -> None:
            """Hand back the term block ``i`` produced (LN'_i of its source)."""
            if not self._walk.uses_pos[i]:
                return
            if self._walk.hierarchical:
                self._cur = term
            if self._walk.last_pos and self._walk.last_pos == i:  # last_pos=0 means pos itself, not block 0
                self.last_source = term

    def start(self, pos: torch.Tensor | None) -> PEWalk.Step:
        """A fresh walk over the blocks from the PE ``pos`` ([1, T, D]; None for a model without PE)."""
        return PEWalk.Step(self, pos)

    def terms(
        self,
        pos: torch.Tensor,
        norm_pos: Callable[[int, torch.Tensor], torch.Tensor],
        last_term: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pooled_bias: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> PETerms:
        """Every image-independent PE term, from the parameters alone.

        ``norm_pos(l, p)`` is block l's LN'_l; ``last_term(p)`` is LN'_last and ``pooled_bias(p)`` the pooled
        bias (each used only when the walk has a last PE, ``pooled_bias`` only when given).
        """
        step = self.start(pos)
        terms: list[torch.Tensor | None] = []
        for i in range(self.depth):
            src = step.source(i)
            t = None if src is None else norm_pos(i, src)
            step.record(i, t)
            terms.append(t)
        out = PETerms(pos=pos, terms=terms)
        if self.last_pos is not None:
            src = step.last_source
            assert src is not None
            if last_term is not None:
                out.last_term = last_term(src)
            if pooled_bias is not None:
                out.pooled_bias = pooled_bias(src)
        return out


@dataclass(frozen=True)
class PEKnobs:
    """A mode's knobs resolved for a model of ``len(block_uses_pos)`` blocks (what :func:`resolve_pe_knobs`
    returns); :meth:`walk` is the model's :class:`PEWalk`."""

    pe: str
    layerwise: bool
    include_layer0: bool
    hierarchical: bool
    add_pos_to_input: bool
    last_pos: int | None
    pe_layers: int | None
    block_uses_pos: tuple[bool, ...]

    @property
    def uses_pos(self) -> bool:
        """Whether the model needs an absolute PE at all (at the input, in a block or at the last norm)."""
        return self.add_pos_to_input or any(self.block_uses_pos) or self.last_pos is not None

    def walk(self) -> PEWalk:
        """The PE walk of these knobs."""
        return PEWalk(self.block_uses_pos, self.hierarchical, self.last_pos)

    def pruned(self, depth: int, last_norm: bool = True) -> PEKnobs:
        """These knobs for the first ``depth`` blocks (timm's ``prune_intermediate_layers``); ``last_norm=False``:
        the last norm is gone, and with it the last PE. ValueError where the last PE's block is pruned away."""
        last = self.last_pos if last_norm else None
        if last is not None and last >= depth:
            raise ValueError(
                f"last_pos={last} takes LN'_last's input from block {last}, which pruning to {depth} blocks "
                "removes; pass prune_norm=True"
            )
        return replace(self, block_uses_pos=self.block_uses_pos[:depth], last_pos=last)


def resolve_pe_knobs(
    pe: str,
    depth: int,
    *,
    include_layer0: bool | None = None,
    hierarchical: bool | None = None,
    add_pos_to_input: bool | None = None,
    last_pos: int | str | None = AUTO,
    pe_layers: int | None = None,
    presets: Mapping[str, PEPreset] = PRESETS,
    model: str = "this model",
) -> PEKnobs:
    """The knobs of mode ``pe`` for ``depth`` blocks: every knob left at None (``last_pos="auto"``) takes the
    mode's preset in ``presets`` (:data:`PRESETS`, :data:`SWIN_PRESETS`, :data:`NO_ABSOLUTE_PE_PRESETS`). A mode
    missing from ``presets`` is one that delivers an absolute PE, which ``model`` (named in the error) lacks.
    ``pe_layers=k``: only blocks 0..k-1 take a PE term (LaPE for partial layers). ``last_pos``: None, 0 (``pos``) or
    block k >= 1 (negative counts from the end), which must take a PE term. Raises ValueError (TypeError for a
    ``last_pos`` of the wrong type) naming what is wrong."""
    check_pe_mode(pe)
    if pe not in presets:
        raise ValueError(
            f"pe={pe!r} delivers an absolute position embedding to the blocks (and the last norm), but {model} "
            "has none; use a model with one (pos_embed='learn')"
        )
    preset = presets[pe]
    if not preset.absolute:
        for name, value in (("include_layer0", include_layer0), ("hierarchical", hierarchical),
                            ("add_pos_to_input", add_pos_to_input), ("pe_layers", pe_layers),
                            ("last_pos", None if last_pos == AUTO else last_pos)):
            if value is not None:
                raise ValueError(f"{name} needs an absolute position embedding; {model} has none")
    elif not preset.layerwise:
        for name, value in (("include_layer0", include_layer0), ("hierarchical", hierarchical),
                            ("pe_layers", pe_layers)):
            if value is not None:
                raise ValueError(f"{name} applies to the layer-wise modes (lape, pvg, mpvg), not pe={pe!r}")
    if pe_layers is not None and (isinstance(pe_layers, bool) or not isinstance(pe_layers, int)
                                  or not 1 <= pe_layers <= depth):
        raise ValueError(f"pe_layers must be an integer in [1, {depth}] (the number of blocks), got {pe_layers!r}")
    layer0 = preset.include_layer0 if include_layer0 is None else bool(include_layer0)
    uses = tuple(preset.layerwise and (i > 0 or layer0) and (pe_layers is None or i < pe_layers)
                 for i in range(depth))
    last = preset.last_pos if last_pos == AUTO else last_pos
    if last is not None:
        if isinstance(last, bool) or not isinstance(last, int):
            raise TypeError(f"last_pos must be an int, None or 'auto', got {last_pos!r}")
        k = last + depth if last < 0 else last
        if not 0 <= k < depth:
            raise ValueError(f"last_pos must be in [-{depth}, {depth - 1}] for depth {depth}, got {last}")
        if k > 0 and not uses[k]:
            raise ValueError(
                f"last_pos={last} names the PE term of block {k}, but block {k} takes no PE in this "
                f"configuration (pe={pe!r}, include_layer0={layer0}, pe_layers={pe_layers})"
            )
        last = k
    return PEKnobs(
        pe=pe,
        layerwise=preset.layerwise,
        include_layer0=layer0,
        hierarchical=preset.hierarchical if hierarchical is None else bool(hierarchical),
        add_pos_to_input=preset.add_pos_to_input if add_pos_to_input is None else bool(add_pos_to_input),
        last_pos=last,
        pe_layers=pe_layers,
        block_uses_pos=uses,
    )
