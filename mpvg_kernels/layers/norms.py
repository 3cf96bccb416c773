"""Drop-in modules for layer-wise position embeddings (LaPE, PVG, MPVG) in any pre-norm ViT block.

- :class:`DualLayerNorm`: a block's LN1 plus its own LayerNorm LN' of the position embedding (PE).
  ``forward(x, pos) -> (LN1(x) + LN'(pos), LN'(pos))``; the second output is the PE of the next layer in the
  hierarchical chain. Runs the fused ``mpvg_kernels.dual_layer_norm`` op.
- :class:`LastLayerNormPE`: the last LayerNorm, optionally plus LN'_last(pos) (MPVG), returning per-token
  features ``LN(x) + LN'_last(pos)`` or the fused pooled ``[B, D]`` (``mpvg_kernels.layer_norm_pool``).

Parameter names: both norms keep a LayerNorm's ``weight``/``bias`` (so a timm checkpoint's
``blocks.i.norm1.weight`` or ``norm.weight`` maps 1:1) and add ``pos_weight``/``pos_bias`` for LN', the only
keys a timm/DeiT checkpoint does not have.

Example (any timm-style pre-norm block)::

    block.norm1 = DualLayerNorm.from_layer_norm(block.norm1)
    # in the model's forward:
    y, pos = block.norm1(x, pos)               # y = LN1(x) + LN'(pos); pos = LN'(pos) feeds the next block
    x = x + block.attn(y); x = x + block.mlp(block.norm2(x))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import dual_layer_norm, layer_norm_add, layer_norm_pool
from ..ops import layer_norm as _ops

__all__ = ["DualLayerNorm", "LastLayerNormPE"]


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The fused ops need stride 1 in the last dim; other layouts (e.g. a transposed conv output) are copied."""
    return x if x.dim() == 0 or x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


# ----------------------------------------------------------------------------- the two norms


def _from_layer_norm(cls: type, ln: nn.LayerNorm, **kw: Any) -> Any:
    """An instance of ``cls`` whose token LayerNorm (weight, bias, eps) copies ``ln``; its LN' starts as identity."""
    if len(ln.normalized_shape) != 1 or ln.weight is None or ln.bias is None:
        raise ValueError("from_layer_norm needs a LayerNorm over the last dim with weight and bias")
    w = ln.weight
    m = cls(ln.normalized_shape[0], eps=ln.eps, device=w.device, dtype=w.dtype, **kw)
    with torch.no_grad():
        m.weight.copy_(ln.weight)
        m.bias.copy_(ln.bias)
    return m


class DualLayerNorm(nn.Module):
    """LN1 of one block plus LN' of the position embedding: ``(LN1(x) + LN'(pos), LN'(pos))``.

    ``weight``/``bias`` are LN1's affine parameters (timm's ``blocks.i.norm1.*``); ``pos_weight``/``pos_bias``
    are LN''s. LN' sees only the PE, never the tokens. ``eps`` is shared by both (1e-6 as in DeiT/LaPE).
    """

    def __init__(self, dim: int, eps: float = 1e-6, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.normalized_shape = (dim,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **kw))
        self.bias = nn.Parameter(torch.zeros(dim, **kw))
        self.pos_weight = nn.Parameter(torch.ones(dim, **kw))
        self.pos_bias = nn.Parameter(torch.zeros(dim, **kw))

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm) -> DualLayerNorm:
        """A DualLayerNorm whose token half copies ``ln`` (weight, bias, eps); LN' starts as identity affine."""
        return _from_layer_norm(cls, ln)

    def reset_parameters(self) -> None:
        """weight, pos_weight = 1; bias, pos_bias = 0."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.pos_weight.fill_(1.0)
            self.pos_bias.zero_()

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., N, D]; pos: [N, D] or [1, N, D]. Returns (LN1(x) + LN'(pos), LN'(pos) with pos's shape)."""
        return dual_layer_norm(_unit_stride(x), pos, self.weight, self.bias, self.pos_weight, self.pos_bias, self.eps)

    def forward_with_term(self, x: torch.Tensor, pos_term: torch.Tensor) -> torch.Tensor:
        """``LN1(x) + pos_term`` for an already normalised PE term (e.g. from :meth:`norm_pos` or a cache)."""
        return layer_norm_add(_unit_stride(x), pos_term, self.weight, self.bias, self.eps)

    def _forward_cached_term(self, x: torch.Tensor, pos_term: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_with_term` without argument checks, for a term the model's PE cache built (its shape
        [N, D], device and dtype were fixed when the cache was filled): the per-block inference hot path."""
        term = pos_term.view(pos_term.shape[-2:]) if pos_term.dim() == 3 else pos_term
        return _ops._layer_norm_add(_unit_stride(x), term, self.weight, self.bias, self.eps)

    def norm_pos(self, pos: torch.Tensor) -> torch.Tensor:
        """``LN'(pos)`` alone."""
        return F.layer_norm(pos, self.normalized_shape, self.pos_weight, self.pos_bias, self.eps)

    def norm_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``LN1(x)`` alone (the normalised token term, for analysis)."""
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}"


class LastLayerNormPE(nn.Module):
    """The last LayerNorm, optionally plus LN'_last of a position embedding (MPVG).

    ``use_pos=False`` makes it a plain LayerNorm (with a fused LN + average-pool output).
    ``forward(x, pos)`` returns per-token ``LN(x) + LN'_last(pos)``; ``forward(x, pos, pool=True)`` returns
    ``mean_n(LN(x)_n + LN'_last(pos)_n)`` as ``[..., D]`` in one fused pass. With a precomputed
    ``pooled_bias = bias + mean_n LN'_last(pos)_n`` (:meth:`pooled_bias`) the pooled output is
    ``layer_norm_pool(x, weight, pooled_bias)``: the PE term collapses into a D-vector.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        use_pos: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.normalized_shape = (dim,)
        self.eps = eps
        self.use_pos = use_pos
        self.weight = nn.Parameter(torch.ones(dim, **kw))
        self.bias = nn.Parameter(torch.zeros(dim, **kw))
        if use_pos:
            self.pos_weight = nn.Parameter(torch.ones(dim, **kw))
            self.pos_bias = nn.Parameter(torch.zeros(dim, **kw))
        else:
            self.register_parameter("pos_weight", None)
            self.register_parameter("pos_bias", None)

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, use_pos: bool = True) -> LastLayerNormPE:
        """A LastLayerNormPE whose token half copies ``ln``; LN'_last (if any) starts as identity affine."""
        return _from_layer_norm(cls, ln, use_pos=use_pos)

    def reset_parameters(self) -> None:
        """weights = 1, biases = 0."""
        with torch.no_grad():
            for p in (self.weight, self.pos_weight):
                if p is not None:
                    p.fill_(1.0)
            for p in (self.bias, self.pos_bias):
                if p is not None:
                    p.zero_()

    def pos_term(self, pos: torch.Tensor) -> torch.Tensor:
        """``LN'_last(pos)``: the per-token PE term of the last norm ([N, D] or [1, N, D], pos's shape)."""
        if not self.use_pos:
            raise RuntimeError("this LastLayerNormPE was built with use_pos=False and has no LN'_last")
        return F.layer_norm(pos, self.normalized_shape, self.pos_weight, self.pos_bias, self.eps)

    def pooled_bias(self, pos: torch.Tensor) -> torch.Tensor:
        """``bias + mean_n LN'_last(pos)_n``: [D], the whole PE contribution after average pooling."""
        term = self.pos_term(pos)
        acc = torch.promote_types(self.bias.dtype, torch.float32)  # float32 (or float64) accumulation
        c = term.reshape(-1, term.shape[-1]).to(acc).mean(0)
        return (self.bias.to(acc) + c).to(self.bias.dtype)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None = None,
        pool: bool = False,
        *,
        pos_term: torch.Tensor | None = None,
        pooled_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [..., N, D] -> tokens [..., N, D] (``pool=False``) or pooled [..., D] (``pool=True``).

        PE sources, first given wins: ``pooled_bias`` (pooled only; a precomputed :meth:`pooled_bias`),
        ``pos_term`` (a precomputed LN'_last(pos)), ``pos`` (normalised here by LN'_last). With none of them, or
        ``use_pos=False``, it is the plain last LayerNorm.
        """
        if pool and pooled_bias is not None:
            if pooled_bias.shape != self.weight.shape or x.dim() < 2 or x.shape[-1] != self.weight.shape[0]:
                raise ValueError(
                    f"pooled_bias must have shape {tuple(self.weight.shape)} and x [..., N, "
                    f"{self.weight.shape[0]}], got {tuple(pooled_bias.shape)} and {tuple(x.shape)}"
                )
            return _ops._layer_norm_pool(_unit_stride(x), self.weight, pooled_bias, None, self.eps)
        term = pos_term
        if term is None and pos is not None and self.use_pos:
            term = self.pos_term(pos)
        if pool:
            return layer_norm_pool(_unit_stride(x), self.weight, self.bias, term, self.eps)
        if term is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm_add(_unit_stride(x), term, self.weight, self.bias, self.eps)

    def norm_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``LN(x)`` alone, without the PE term."""
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, use_pos={self.use_pos}"
