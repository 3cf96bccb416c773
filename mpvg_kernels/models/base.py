"""What every model family shares: the inference PE cache plumbing and the contract the tools rely on.

A model family (ViT/DeiT, Swin, CeiT, T2T-ViT, CVT/CCT) subclasses :class:`PEModel` and provides

- ``compute_pe_terms(grid=None) -> PETerms | None``: every image-independent PE term, computed now from the
  parameters by walking its :class:`~mpvg_kernels.layers.PEWalk` (differentiable, no cache);
- ``_pe_tensors() -> list[Tensor]``: the tensors those terms are computed from (the cache is not used while
  any of them needs a gradient);
- ``_pe_modules() -> list[Module]`` (optional, default every submodule): the PE path, whose parameters, buffers
  and other attributes key the cache with the model's own (:meth:`PEModel._pe_key`);
- ``_default_grid() -> tuple[int, int]``: the token grid of the model's own input size;
- ``forward(x, pe_terms=None)``: logits, using given terms, else the cache where it may be used, else computing
  the terms along the walk with the fused ops;
- ``forward_analysis(x)`` (the intermediates of ``mpvg analyze``), ``default_cfg`` (``input_size``, ``mean``,
  ``std``, ``num_classes``, ``crop_pct``, ``interpolation``, ``pe``, ``pool``, ``architecture``), ``pe``,
  ``pool``, ``num_classes``, ``in_chans``, ``patch_embed`` (the tokenizer: ``img_size``, ``grid_size``),
  ``no_weight_decay()``, ``reset_classifier``, ``get_classifier``,
  ``set_grad_checkpointing``, ``group_matcher``.

The training, evaluation, prediction, export, analysis and benchmark tools use nothing else, so a family that
provides these runs through every ``mpvg`` command without a special case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from ..layers.norms import DualLayerNorm, LastLayerNormPE
from ..layers.pe_cache import PECache, cache_bypassed, module_state, no_autocast
from ..layers.pe_walk import PEKnobs, PETerms, PEWalk
from ..layers.pos_embed import POS_EMBED_TYPES, resample_abs_pos_embed, sincos_pos_embed

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PEModel",
    "check_pos_embed",
    "check_sizes",
    "count_parameters",
    "format_intermediates",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _clear_cache_hook(module: nn.Module, incompatible_keys: Any) -> None:
    module.clear_pe_cache()


class PEModel(nn.Module):
    """Base class of the model families: owns the inference PE cache (:attr:`pe_cache`) and serves
    :meth:`pe_terms` from it; subclasses implement :meth:`compute_pe_terms`, :meth:`_pe_tensors` and
    :meth:`_default_grid` (see the module docstring for the whole contract)."""

    #: Whether :meth:`pe_terms` may serve cached terms (the ``pe_cache`` constructor argument of the families).
    pe_cache_enabled: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._pe_cache = PECache()
        self.register_load_state_dict_post_hook(_clear_cache_hook)

    # ------------------------------------------------------------------ to implement

    def compute_pe_terms(self, grid: tuple[int, int] | None = None) -> PETerms | None:
        """The image-independent PE terms for ``grid`` (default: the model's grid), computed now (no cache)."""
        raise NotImplementedError

    def _pe_tensors(self) -> list[torch.Tensor]:
        """The tensors the image-independent PE terms are computed from."""
        raise NotImplementedError

    def _default_grid(self) -> tuple[int, int]:
        """The token grid of the model's own input size."""
        raise NotImplementedError

    def _pe_modules(self) -> list[nn.Module]:
        """The submodules the PE terms are computed from (the tokenizer for its grid, every LN', the last norm,
        whatever the PE passes through): the cache keys on all their attributes (:meth:`_pe_key`). This default,
        every submodule, is always right; a family lists its PE path to make the key cheaper."""
        return list(self.modules())[1:]

    # ------------------------------------------------------------------ shared

    def _set_pe_knobs(self, knobs: PEKnobs) -> None:
        """Adopt resolved PE knobs (:func:`~mpvg_kernels.layers.pe_walk.resolve_pe_knobs`): :attr:`pe_knobs`, read
        by the attributes ``pe``, ``layerwise``, ``include_layer0``, ``hierarchical``, ``add_pos_to_input``,
        ``pe_layers``, ``block_uses_pos``, ``last_pos``, and the model's walk ``pe_walk``."""
        #: The model's PE knobs, the one record of its PE rule.
        self.pe_knobs = knobs
        #: The PE rule of this model (which block gets which PE, the source of LN'_last): every forward walks it.
        self.pe_walk = knobs.walk()

    pe = property(lambda self: self.pe_knobs.pe, doc="The position-embedding mode.")
    layerwise = property(lambda self: self.pe_knobs.layerwise, doc="Whether blocks take PE terms (lape/pvg/mpvg).")
    include_layer0 = property(lambda self: self.pe_knobs.include_layer0, doc="Whether block 0 takes a PE term.")
    hierarchical = property(lambda self: self.pe_knobs.hierarchical, doc="Whether each PE term feeds the next.")
    add_pos_to_input = property(lambda self: self.pe_knobs.add_pos_to_input, doc="Whether x_0 = tokens + pos.")
    pe_layers = property(lambda self: self.pe_knobs.pe_layers, doc="Only blocks 0..k-1 take a PE term (None: all).")
    block_uses_pos = property(lambda self: self.pe_knobs.block_uses_pos, doc="Per block: takes a PE term.")
    last_pos = property(lambda self: self.pe_knobs.last_pos, doc="The source of LN'_last (None: no last PE).")

    @property
    def head_hidden_size(self) -> int:
        """timm's ``head_hidden_size``: the width of what the classifier receives (``forward_head(...,
        pre_logits=True)``), the model's ``num_features``."""
        return self.num_features

    @property
    def has_last_pos(self) -> bool:
        """Whether the last LN adds LN'_last(p) (MPVG)."""
        return self.pe_knobs.last_pos is not None

    # ------------------------------------------------------------------ the last norm (shared by the families)

    #: whether the last norm follows the pooling (``fc_norm``, timm's GAP ViTs) instead of preceding it (``norm``)
    use_fc_norm: bool = False

    @property
    def last_norm(self) -> LastLayerNormPE | None:
        """The last LayerNorm (with LN'_last for MPVG): ``norm``, or ``fc_norm`` when it follows the pooling;
        None once pruned away (``prune_intermediate_layers``)."""
        m = self.fc_norm if self.use_fc_norm else self.norm
        return m if isinstance(m, LastLayerNormPE) else None

    def _last_norm(self) -> LastLayerNormPE:
        m = self.last_norm
        if m is None:
            raise RuntimeError("the last norm of this model was pruned (prune_intermediate_layers)")
        return m

    def _last_term(
        self, terms: PETerms | None, last_src: torch.Tensor | None, grid: tuple[int, int] | None = None
    ) -> torch.Tensor | None:
        """LN'_last(p) [1, T, D] (None without a last PE). ``last_src`` None with no ``terms`` (a walk stopped
        before block ``last_pos``): the terms are computed from the parameters for ``grid``."""
        if not self.has_last_pos or self.last_norm is None:
            return None
        if terms is not None:
            return terms.last_term
        if last_src is None and self.last_pos == 0:  # LN'_last of pos itself: no block term is needed
            pos = self._pos_for_grid(self.patch_embed.grid_size if grid is None else tuple(grid))
            with no_autocast(pos.device.type):  # as compute_pe_terms computes it
                return self._last_norm().pos_term(self._last_pe(pos))
        if last_src is None:
            full = self.compute_pe_terms(grid)
            assert full is not None
            return full.last_term
        return self._last_norm().pos_term(self._last_pe(last_src))

    def _last_pe(self, p: torch.Tensor) -> torch.Tensor:
        """LN'_last's input made from the PE ``p`` the walk hands it: ``p`` itself; a family whose PE changes
        shape along the walk (Swin's stages) brings it to the last norm's."""
        return p

    def _norm_tokens(self, x: torch.Tensor, term: torch.Tensor | None) -> torch.Tensor:
        """The per-token last norm of forward_features: LN(x) (+ LN'_last(p)); identity with ``fc_norm`` (timm's
        GAP models normalise after pooling) or once the norm is pruned."""
        if self.use_fc_norm or self.last_norm is None:
            return x
        return self.last_norm(x, pos_term=term)

    def clear_pe_cache(self) -> None:
        """Drop the inference PE cache (needed only after writes that bypass autograd, e.g. ``p.data.add_()``)."""
        cache = self.__dict__.get("_pe_cache")
        if cache is not None:
            cache.clear()

    @property
    def pe_cache(self) -> PECache:
        """The inference PE cache (``hits``/``misses`` counters, ``clear()``)."""
        return self._pe_cache

    def _apply(self, fn: Any, recurse: bool = True) -> PEModel:
        # .to() / .half() / .cuda() / ...: the cache also keys on data_ptr, dtype and device; clearing here
        # releases the old tensors at once.
        self.clear_pe_cache()
        return super()._apply(fn, recurse)

    #: attributes left out of the PE key: the cache itself and metadata the PE path never reads
    _NOT_PE_STATE = frozenset({"_pe_cache", "default_cfg", "pretrained_cfg", "feature_info"})

    def _pe_key(self) -> tuple[list[torch.Tensor], tuple]:
        """What the PE terms are computed from, as a cache key (:func:`~mpvg_kernels.layers.pe_cache.module_state`
        of the model and :meth:`_pe_modules`): every parameter and buffer of those modules, and a snapshot of every
        other attribute they hold (``eps``, ``normalized_shape``, ``training``, the knobs, the walk, the grid,
        which submodule sits where, hooks)."""
        return module_state([self, *self._pe_modules()], skip=self._NOT_PE_STATE)

    def pe_terms(self, grid: tuple[int, int] | None = None) -> PETerms | None:
        """The cached image-independent PE terms for ``grid`` (default: the model's grid), or None where the cache
        may not be used (gradients needed, tracing/compiling, no PE, cache disabled). The cache keys on
        :meth:`_pe_key`: any change of what the terms are computed from recomputes them."""
        if not self.pe_cache_enabled or cache_bypassed():
            return None
        if torch.is_grad_enabled() and not PECache.usable(self._pe_tensors()):
            return None
        grid = self._default_grid() if grid is None else tuple(grid)
        key_tensors, state = self._pe_key()
        return self._pe_cache.get(key_tensors, lambda: self.compute_pe_terms(grid), extra=(grid, state))

    # ------------------------------------------------------------------ the absolute PE and the input grid
    #: ``learn`` (a parameter) or a fixed sin-cos table (``sincos1d``/``sincos2d``: a buffer); set by the family
    pos_embed_type: str = "learn"
    #: whether other input sizes are accepted (the PE is then resampled, or recomputed, for their grid)
    dynamic_img_size: bool = False

    def _init_pos_embed(self) -> None:
        """``pos_embed`` [1, P + h*w, D] for the tokenizer's grid where the knobs use a PE (:attr:`pe_knobs`), else
        None: zeros as a parameter for ``pos_embed_type="learn"`` (:meth:`init_weights` draws it), the fixed sin-cos
        table as a buffer otherwise. Needs ``patch_embed``, ``embed_dim`` and ``num_prefix_tokens``."""
        if not self.pe_knobs.uses_pos:
            self.pos_embed = None
        elif self.pos_embed_type == "learn":
            num_pos = self.patch_embed.num_patches + self.num_prefix_tokens
            self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, self.embed_dim))
        else:
            self.register_buffer("pos_embed", self._fixed_pos_embed(self.patch_embed.grid_size))

    def _fixed_pos_embed(self, grid: tuple[int, int], like: torch.Tensor | None = None) -> torch.Tensor:
        """The fixed sin-cos table [1, P + h*w, D] for ``grid`` (dtype/device of ``like``, else float32 CPU)."""
        return sincos_pos_embed(self.pos_embed_type, grid, self.embed_dim, self.num_prefix_tokens,
                                dtype=torch.float32 if like is None else like.dtype,
                                device=None if like is None else like.device)

    def _pos_for_grid(self, grid: tuple[int, int]) -> torch.Tensor:
        """The PE for the token grid ``grid``: the model's own, a fixed table recomputed, or a learned PE resampled
        (bicubic, as timm) from the model's grid."""
        assert self.pos_embed is not None
        own = tuple(self.patch_embed.grid_size)
        if tuple(grid) == own:
            return self.pos_embed
        if self.pos_embed_type != "learn":
            return self._fixed_pos_embed(tuple(grid), like=self.pos_embed)
        return resample_abs_pos_embed(self.pos_embed, grid, own, self.num_prefix_tokens)

    def _traced_grid(self) -> tuple[int, int] | None:
        """While torch.fx traces the model (its shapes are symbolic): the model's own token grid, the graph being
        traced for the model's ``img_size``; ValueError for a model built with ``dynamic_img_size``. None otherwise."""
        if not is_fx_symbolic_tracing():
            return None
        if self.dynamic_img_size:
            raise ValueError("torch.fx tracing needs the model's own input size: build it without dynamic_img_size")
        return tuple(self.patch_embed.grid_size)

    @staticmethod
    def _given_terms(pe_terms: PETerms | None) -> PETerms | None:
        """``pe_terms`` as the caller gave them; None for the placeholder torch.fx traces in place of the omitted
        argument (the traced graph then computes the terms from the parameters)."""
        return None if isinstance(pe_terms, torch.fx.Proxy) else pe_terms

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The token grid of images ``x`` [B, C, H, W]; ValueError for another layout, or another size without
        ``dynamic_img_size``, or a size that gives no token."""
        traced = self._traced_grid()
        if traced is not None:
            return traced
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        img = tuple(self.patch_embed.img_size)
        if not self.dynamic_img_size and (H, W) != img:
            raise ValueError(
                f"input size ({H}, {W}) does not match the model's img_size {img}; build the model with "
                "img_size=... or dynamic_img_size=True (the PE is then resampled at forward)"
            )
        grid = self.patch_embed.grid_for(H, W)
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(f"input size ({H}, {W}) is too small for the tokenizer (no token)")
        return grid

    # ------------------------------------------------------------------ init

    def init_weights(self) -> None:
        """DeiT/timm init: trunc_normal for a learned PE (std ``pos_init_std``), the class and distillation tokens
        and every Linear weight (std .02), zero Linear biases, LayerNorms 1/0, the PE LayerNorms (LN', LN'_last) by
        their ``reset_parameters`` (:meth:`_init_submodule`), convolutions and BatchNorms by PyTorch's init; the
        computed buffers (a fixed sin-cos PE, random features, attention masks and indices) computed again. Every
        tensor of the model gets its value, so a model built on the meta device and moved with ``to_empty`` is
        ready after this call."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=self.pos_init_std)
        elif self.pos_embed is not None:  # a fixed table
            with torch.no_grad():
                self.pos_embed.copy_(self._fixed_pos_embed(self.patch_embed.grid_size, like=self.pos_embed))
        for name in ("cls_token", "dist_token"):
            token = getattr(self, name, None)
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        for m in self.modules():
            self._init_submodule(m)
        self.clear_pe_cache()

    def _init_submodule(self, m: nn.Module) -> None:
        """The init of one submodule (its own parameters, not its children's); a family extends it."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (DualLayerNorm, LastLayerNormPE, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)):
            m.reset_parameters()
        for buffers in ("init_non_persistent_buffers", "reset_buffers"):  # computed buffers (see init_weights)
            if hasattr(m, buffers):
                getattr(m, buffers)()

    # ------------------------------------------------------------------ analysis

    def _analysis_begin(self, x: torch.Tensor, **extra: Any) -> tuple[dict[str, Any], torch.Tensor, PEWalk.Step]:
        """The start of ``forward_analysis``: the record (the per-block lists :meth:`_analyse_block` fills,
        ``grid``, ``num_prefix_tokens`` and ``extra``), the tokens entering block 0 and a fresh walk."""
        grid = self._grid(x)
        pos = None if self.pos_embed is None else self._pos_for_grid(grid)
        out: dict[str, Any] = {
            "block_inputs": [],
            "token_terms": [],
            "pos_terms": [],
            "attn_inputs": [],
            "grid": grid,
            "num_prefix_tokens": self.num_prefix_tokens,
            **extra,
        }
        return out, self._embed(x, pos), self.pe_walk.start(pos)

    @staticmethod
    def _analyse_last_norm(
        out: dict[str, Any], x: torch.Tensor, norm: LastLayerNormPE, last_term: torch.Tensor | None,
        added: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last norm of ``forward_analysis``: records its input x (``last_norm_input``), LN(x) without PE
        (``last_norm_output``), LN'_last(p) or None (``last_pos_term``) and the features LN(x) + ``added`` (default:
        the term itself) in ``out``; returns the features."""
        last_out = norm.norm_tokens(x)
        added = last_term if added is None else added
        feats = last_out if added is None else last_out + added
        out.update(last_norm_input=x, last_norm_output=last_out, last_pos_term=last_term, features=feats)
        return feats

    @staticmethod
    def _analyse_block(
        out: dict[str, Any], step: PEWalk.Step, i: int, blk: nn.Module, x: torch.Tensor,
        to_block: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One block of ``forward_analysis`` with unfused plain-PyTorch steps: records x_l (``block_inputs``),
        LN1_l(x_l) (``token_terms``), the PE term LN'_l(p_l) or None (``pos_terms``) and the attention input
        (``attn_inputs``) in ``out``, advances the walk ``step`` and returns the attention input. ``to_block``
        brings the walk's source to the block's token space first (Swin's later stages)."""
        out["block_inputs"].append(x)
        src = step.source(i)
        if src is None:
            tok, term = blk.norm1(x), None
            a = tok
        else:
            tok = blk.norm1.norm_tokens(x)
            term = blk.norm1.norm_pos(src if to_block is None else to_block(src))
            step.record(i, term)
            a = tok + term
        out["token_terms"].append(tok)
        out["pos_terms"].append(term)
        out["attn_inputs"].append(a)
        return a

    def _data_cfg(
        self, architecture: str, first_conv: str, classifier: str | tuple[str, ...], crop_pct: float = 0.875
    ) -> dict[str, Any]:
        """A ``default_cfg`` for this model: ``input_size`` from ``in_chans`` and ``patch_embed.img_size``,
        ImageNet mean/std for 3 channels (0.5 otherwise), bicubic, ``num_classes``, ``pe`` and ``pool``."""
        c = self.in_chans
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,) * c, (0.5,) * c)
        return {
            "architecture": architecture,
            "input_size": (c, *self.patch_embed.img_size),
            "mean": mean,
            "std": std,
            "num_classes": self.num_classes,
            "interpolation": "bicubic",
            "crop_pct": crop_pct,
            "first_conv": first_conv,
            "classifier": classifier,
            "pe": self.pe,
            "pool": self.pool,
        }

    def pe_norm_parameter_names(self) -> list[str]:
        """State-dict keys of the PE LayerNorms (LN'_l and LN'_last): the keys a checkpoint of the original
        architecture lacks."""
        return [n for n, _ in self.named_parameters() if n.endswith((".pos_weight", ".pos_bias"))]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (fixed sinusoidal tables and other buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def check_pos_embed(pos_embed: str, embed_dim: int) -> None:
    """The absolute PE of a global-attention model: one of ``POS_EMBED_TYPES`` (``sincos2d`` needs an
    ``embed_dim`` divisible by 4); else a ValueError naming it."""
    if pos_embed == "rpe":
        raise ValueError(
            "pos_embed='rpe' is Swin's relative position bias inside window attention; this model attends "
            f"globally and has no relative bias table: choose one of {POS_EMBED_TYPES}"
        )
    if pos_embed not in POS_EMBED_TYPES:
        raise ValueError(f"pos_embed must be one of {POS_EMBED_TYPES}, got {pos_embed!r}")
    if pos_embed == "sincos2d" and embed_dim % 4:
        raise ValueError(f"pos_embed='sincos2d' needs an embed_dim divisible by 4, got {embed_dim}")


def check_sizes(*checks: tuple[str, Any, int]) -> None:
    """Raise a ValueError naming the first (name, value, minimum) whose value is not an int >= minimum."""
    for name, value, minimum in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def format_intermediates(
    kept: list[torch.Tensor],
    final: torch.Tensor | None,
    grid: tuple[int, int],
    num_prefix_tokens: int,
    output_fmt: str,
    return_prefix_tokens: bool = False,
    output_dict: bool = False,
) -> Any:
    """The return value of timm's ``forward_intermediates`` from the token streams ``kept`` ([B, P + h*w, D] each)
    and the final features ``final`` (None: ``intermediates_only``): the P prefix tokens split off, the patch tokens
    as ``NCHW`` [B, D, h, w] or ``NLC`` [B, h*w, D]; the list (``(patches, prefix)`` pairs with
    ``return_prefix_tokens``), ``(final, list)``, or with ``output_dict`` ``{"image_intermediates",
    "image_intermediates_prefix"?, "image_features"?}``."""
    npt = num_prefix_tokens
    prefix = [y[:, :npt] for y in kept] if npt else None
    patches = [y[:, npt:] for y in kept]
    if output_fmt == "NCHW":
        patches = [y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in patches]
    if output_dict:
        out: dict[str, Any] = {"image_intermediates": patches}
        if prefix is not None and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefix
        if final is not None:
            out["image_features"] = final
        return out
    taps: list[Any] = patches
    if return_prefix_tokens and prefix is not None:
        taps = list(zip(patches, prefix, strict=True))
    return taps if final is None else (final, taps)
