"""One Vision Transformer for the four position-embedding modes: ``default``, ``lape``, ``pvg``, ``mpvg``.

Blocks l = 0..L, residual stream x_l, learned position embedding ``pos`` (``pos_embed``, [1, T, D]; T = N, or
N + 1 with a class token). The modes are presets of the knobs ``add_pos_to_input``, ``include_layer0``,
``hierarchical`` and ``last_pos`` (table and rule in :mod:`mpvg_kernels.layers.pe_walk`, the method in
``docs/design.md#the-method``); the model holds its rule as ``self.pe_walk`` and every forward walks it.

- The PE enters only the attention input (q, k and v see it), never the residual stream or the MLP branch.
- ``last_pos``: the last step is LN(x_{L+1}) + LN'_last(p) with p = ``pos`` for ``last_pos=0`` (the paper's
  choice) or p = the PE term added at block k for ``last_pos=k >= 1`` (MPVG Table 5); ``None``: plain
  LN(x_{L+1}). Negative k counts from the last block.
- ``pool``: ``avg`` (GAP over all tokens, no class token) or ``cls`` (a class token with its own PE row, as in
  DeiT and the LaPE code). Default: ``cls`` for default/lape, ``avg`` for pvg/mpvg.
- Image-independent PE terms: :meth:`VisionTransformer.compute_pe_terms` (live), :meth:`~VisionTransformer.pe_terms`
  (the inference cache), and ``forward(x, pe_terms=...)`` to run with given (e.g. frozen) terms.

Parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.norm1``,
``blocks.i.attn.qkv``, ``blocks.i.attn.proj``, ``blocks.i.norm2``, ``blocks.i.mlp.fc1/fc2``, ``norm``, ``head``);
the PE LayerNorms are ``blocks.i.norm1.pos_weight/pos_bias`` and ``norm.pos_weight/pos_bias``.

``block_style="cct"`` is the Compact-Transformers (ViT-Lite/CCT) block: x = x + MSA(LN1(x) [+ pos_l]);
x = LN2(x); x = x + MLP(x) (the second norm is applied to the residual stream itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.blocks import Block, PatchEmbed, to_2tuple
from ..layers.norms import DualLayerNorm, LastLayerNormPE
from ..layers.pe_cache import PECache, no_autocast
from ..layers.pe_walk import PE_MODES, POOLS, PRESETS, PETerms, PEWalk, default_pool
from ..layers.pos_embed import resample_abs_pos_embed

__all__ = [
    "PE_MODES",
    "POOLS",
    "VisionTransformer",
    "count_parameters",
    "default_pool",
]

_AUTO = "auto"


# ----------------------------------------------------------------------------- the model


class VisionTransformer(nn.Module):
    """ViT/DeiT with default, LaPE, PVG or MPVG position embeddings (see the module docstring for the modes).

    Args (beyond the usual ViT ones): ``pe`` (mode), ``pool`` (``cls``/``avg``, None = mode default), the knobs
    ``include_layer0``, ``hierarchical``, ``add_pos_to_input`` (None = mode default) and ``last_pos`` (``"auto"`` =
    mode default, None = no PE at the last LN, int k), ``block_style`` (``prenorm``/``cct``), ``norm_eps``,
    ``pos_init_std``, ``patch_init`` (``default``: PyTorch's conv init as in timm/DeiT; ``kaiming_normal``: CCT),
    ``dynamic_img_size`` (resample the PE at forward for other input sizes), ``pe_cache`` (inference PE cache).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pe: str = "default",
        pool: str | None = None,
        include_layer0: bool | None = None,
        hierarchical: bool | None = None,
        add_pos_to_input: bool | None = None,
        last_pos: int | str | None = _AUTO,
        block_style: str = "prenorm",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        pos_init_std: float = 0.02,
        patch_init: str = "default",
        dynamic_img_size: bool = False,
        pe_cache: bool = True,
    ) -> None:
        super().__init__()
        if pe not in PE_MODES:
            raise ValueError(f"pe must be one of {PE_MODES}, got {pe!r}")
        pool = default_pool(pe) if pool is None else pool
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        _check_sizes(
            ("depth", depth, 1), ("num_classes", num_classes, 0), ("embed_dim", embed_dim, 1),
            ("num_heads", num_heads, 1), ("in_chans", in_chans, 1),
            *(("patch_size", p, 1) for p in to_2tuple(patch_size)), *(("img_size", v, 1) for v in to_2tuple(img_size)),
        )
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        if patch_init not in ("default", "kaiming_normal"):
            raise ValueError(f"patch_init must be 'default' or 'kaiming_normal', got {patch_init!r}")
        preset = PRESETS[pe]
        if not preset.layerwise:
            for name, value in (("include_layer0", include_layer0), ("hierarchical", hierarchical)):
                if value is not None:
                    raise ValueError(f"{name} applies to the layer-wise modes (lape, pvg, mpvg), not pe={pe!r}")
        self.pe = pe
        self.pool = pool
        self.layerwise = preset.layerwise
        self.include_layer0 = preset.include_layer0 if include_layer0 is None else bool(include_layer0)
        self.hierarchical = preset.hierarchical if hierarchical is None else bool(hierarchical)
        self.add_pos_to_input = preset.add_pos_to_input if add_pos_to_input is None else bool(add_pos_to_input)
        self.block_uses_pos = tuple(self.layerwise and (i > 0 or self.include_layer0) for i in range(depth))
        self.last_pos = self._resolve_last_pos(preset.last_pos if last_pos == _AUTO else last_pos, depth)
        #: The PE rule of this model (which block gets which PE, the source of LN'_last): every forward walks it.
        self.pe_walk = PEWalk(self.block_uses_pos, self.hierarchical, self.last_pos)

        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.depth = depth
        self.norm_eps = norm_eps
        self.block_style = block_style
        self.dynamic_img_size = dynamic_img_size
        self.pe_cache_enabled = pe_cache
        self.grad_checkpointing = False
        self.has_class_token = pool == "cls"
        self.num_prefix_tokens = 1 if self.has_class_token else 0

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_pos = self.patch_embed.num_patches + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.has_class_token else None
        uses_pos = self.add_pos_to_input or any(self.block_uses_pos) or self.last_pos is not None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim)) if uses_pos else None
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [float(v) for v in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                eps=norm_eps,
                use_pos=self.block_uses_pos[i],
                block_style=block_style,
            )
            for i in range(depth)
        )
        self.norm = LastLayerNormPE(embed_dim, eps=norm_eps, use_pos=self.last_pos is not None)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.pos_init_std = pos_init_std
        self.patch_init = patch_init
        self._pe_cache = PECache()
        self.register_load_state_dict_post_hook(_clear_cache_hook)
        self.init_weights()
        self.default_cfg: dict[str, Any] = self._make_default_cfg()
        self.pretrained_cfg = self.default_cfg

    # ------------------------------------------------------------------ configuration helpers

    def _resolve_last_pos(self, last_pos: int | None, depth: int) -> int | None:
        if last_pos is None:
            return None
        if isinstance(last_pos, bool) or not isinstance(last_pos, int):
            raise TypeError(f"last_pos must be an int, None or 'auto', got {last_pos!r}")
        k = last_pos + depth if last_pos < 0 else last_pos
        if not 0 <= k < depth:
            raise ValueError(f"last_pos must be in [-{depth}, {depth - 1}] for depth {depth}, got {last_pos}")
        if k > 0 and not self.block_uses_pos[k]:
            raise ValueError(
                f"last_pos={last_pos} names the PE term of block {k}, but block {k} takes no PE in this "
                f"configuration (pe={self.pe!r}, include_layer0={self.include_layer0})"
            )
        return k

    def _make_default_cfg(self) -> dict[str, Any]:
        c = self.patch_embed.proj.in_channels
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if c == 3 else ((0.5,) * c, (0.5,) * c)
        return {
            "architecture": "vision_transformer",
            "input_size": (c, *self.patch_embed.img_size),
            "mean": mean,
            "std": std,
            "num_classes": self.num_classes,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "pe": self.pe,
            "pool": self.pool,
        }

    @property
    def global_pool(self) -> str:
        """timm's name for the pooling: ``token`` (class token) or ``avg``."""
        return "token" if self.pool == "cls" else "avg"

    @property
    def has_last_pos(self) -> bool:
        """Whether the last LN adds LN'_last(pos_k) (MPVG)."""
        return self.last_pos is not None

    def init_weights(self) -> None:
        """DeiT/LaPE init: trunc_normal(.02) for Linear weights, PE (``pos_init_std``) and class token; zero biases;
        LayerNorms 1/0; patch conv PyTorch default or kaiming_normal (CCT)."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=self.pos_init_std)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (DualLayerNorm, LastLayerNormPE)):
                m.reset_parameters()
        if self.patch_init == "kaiming_normal":
            nn.init.kaiming_normal_(self.patch_embed.proj.weight)
        self.clear_pe_cache()

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay besides every 1-D parameter (see :func:`param_groups`)."""
        return {"pos_embed", "cls_token"}

    def pe_norm_parameter_names(self) -> list[str]:
        """State-dict keys of the PE LayerNorms (LN'_l and LN'_last): the keys a timm checkpoint lacks."""
        return [n for n, _ in self.named_parameters() if n.endswith(".pos_weight") or n.endswith(".pos_bias")]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def get_classifier(self) -> nn.Module:
        """The classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: identity, features out)."""
        _check_sizes(("num_classes", num_classes, 0))
        self.num_classes = num_classes
        ref = self.norm.weight
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        self.default_cfg["num_classes"] = num_classes

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Rebuild for another input resolution: the PE is resampled (bicubic) to the new token grid."""
        img_size = to_2tuple(img_size)
        pe = self.patch_embed
        new_grid = (img_size[0] // pe.patch_size[0], img_size[1] // pe.patch_size[1])
        if self.pos_embed is not None and new_grid != pe.grid_size:
            with torch.no_grad():
                new = resample_abs_pos_embed(self.pos_embed, new_grid, pe.grid_size, self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(new.contiguous(), requires_grad=self.pos_embed.requires_grad)
        pe.img_size, pe.grid_size, pe.num_patches = img_size, new_grid, new_grid[0] * new_grid[1]
        self.default_cfg["input_size"] = (self.default_cfg["input_size"][0], *img_size)
        self.clear_pe_cache()

    def load_pretrained(
        self, checkpoint: str | PathLike | Mapping[str, Any], strict: bool = False
    ) -> torch.nn.modules.module._IncompatibleKeys:
        """Load a timm/DeiT-format (or this package's) checkpoint; see :func:`load_pretrained`."""
        from .pretrained import load_pretrained

        return load_pretrained(self, checkpoint, strict=strict)

    # ------------------------------------------------------------------ PE cache

    def clear_pe_cache(self) -> None:
        """Drop the inference PE cache (needed only after writes that bypass autograd, e.g. ``p.data.add_()``)."""
        cache = self.__dict__.get("_pe_cache")
        if cache is not None:
            cache.clear()

    @property
    def pe_cache(self) -> PECache:
        """The inference PE cache (``hits``/``misses`` counters, ``clear()``)."""
        return self._pe_cache

    def _apply(self, fn: Any, recurse: bool = True) -> VisionTransformer:
        # .to() / .half() / .cuda() / ...: the cache also keys on data_ptr, dtype and device; clearing here
        # releases the old tensors at once.
        self.clear_pe_cache()
        return super()._apply(fn, recurse)

    def _pe_tensors(self) -> list[torch.Tensor]:
        """The tensors the image-independent PE terms are computed from."""
        ts: list[torch.Tensor] = [] if self.pos_embed is None else [self.pos_embed]
        for blk in self.blocks:
            if blk.use_pos:
                ts += [blk.norm1.pos_weight, blk.norm1.pos_bias]
        if self.has_last_pos:
            ts += [self.norm.bias, self.norm.pos_weight, self.norm.pos_bias]
        return ts

    def _pos_for_grid(self, grid: tuple[int, int]) -> torch.Tensor:
        assert self.pos_embed is not None
        if grid == self.patch_embed.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, self.num_prefix_tokens)

    def compute_pe_terms(self, grid: tuple[int, int] | None = None) -> PETerms | None:
        """The PE, every block's PE term, the last PE term and the pooled bias for ``grid`` (default: the model's
        grid), computed now from the parameters along :attr:`pe_walk` (differentiable; no cache). None for a model
        without PE.

        To freeze them for deployment, compute them once under ``no_grad`` and pass them to
        ``model(x, pe_terms=...)``, or register :meth:`PETerms.tensors` as buffers (what
        :class:`mpvg_kernels.export.FrozenPEModel` does)."""
        if self.pos_embed is None:
            return None
        pos = self._pos_for_grid(self.patch_embed.grid_size if grid is None else tuple(grid))
        with no_autocast(pos.device.type):
            return self.pe_walk.terms(
                pos,
                lambda i, p: self.blocks[i].norm1.norm_pos(p),
                last_term=self.norm.pos_term if self.has_last_pos else None,
                pooled_bias=self.norm.pooled_bias if self.has_last_pos and self.pool == "avg" else None,
            )

    def pe_terms(self, grid: tuple[int, int] | None = None) -> PETerms | None:
        """The cached image-independent PE terms for ``grid`` (default: the model's grid), or None where the cache
        may not be used (gradients needed, tracing/compiling, no PE, cache disabled)."""
        if not self.pe_cache_enabled or self.pos_embed is None:
            return None
        tensors = self._pe_tensors()
        if not PECache.usable(tensors):
            return None
        grid = self.patch_embed.grid_size if grid is None else tuple(grid)
        return self._pe_cache.get(tensors, lambda: self.compute_pe_terms(grid), extra=grid)

    # ------------------------------------------------------------------ forward

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if not self.dynamic_img_size and (H, W) != self.patch_embed.img_size:
            raise ValueError(
                f"input size ({H}, {W}) does not match the model's img_size {self.patch_embed.img_size}; build the "
                "model with img_size=... or dynamic_img_size=True (the PE is then resampled at forward)"
            )
        return self.patch_embed.grid_for(H, W)

    def _run_block(
        self, blk: Block, x: torch.Tensor, pos: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(blk, x, pos, use_reentrant=False)
        return blk(x, pos)

    def _embed(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """Images -> the tokens entering block 0 (patches, class token, the PE added where the mode does)."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.add_pos_to_input:
            x = x + pos
        return self.pos_drop(x)

    def _forward_body(
        self, x: torch.Tensor, pe_terms: PETerms | None = None
    ) -> tuple[torch.Tensor, PETerms | None, torch.Tensor | None]:
        """Images -> (x_{L+1} [B, T, D], the precomputed PE terms used or None, LN'_last source when not).

        The PE terms come from ``pe_terms`` when given, else from the cache where it may be used; otherwise the
        fused per-block ops compute them along the walk (with gradients)."""
        grid = self._grid(x)
        if pe_terms is None and self.pos_embed is not None:
            pe_terms = self.pe_terms(grid)
        pos = None
        if self.pos_embed is not None:
            pos = pe_terms.pos if pe_terms is not None else self._pos_for_grid(grid)
        x = self._embed(x, pos)

        if pe_terms is not None:
            for blk, term in zip(self.blocks, pe_terms.terms, strict=True):
                x, _ = blk(x, pos_term=term)
            return x, pe_terms, None

        step = self.pe_walk.start(pos)
        for i, blk in enumerate(self.blocks):
            x, term = self._run_block(blk, x, step.source(i))
            step.record(i, term)
        return x, None, step.last_source

    def _last_term(self, terms: PETerms | None, last_src: torch.Tensor | None) -> torch.Tensor | None:
        if not self.has_last_pos:
            return None
        if terms is not None:
            return terms.last_term
        assert last_src is not None
        return self.norm.pos_term(last_src)

    def forward_features(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Per-token features [B, T, D] after the last norm: LN(x_{L+1}) (+ LN'_last(pos_k) for MPVG), for dense
        heads. With a class token, token 0 is the class token. ``pe_terms``: precomputed terms to use
        (:meth:`compute_pe_terms`, e.g. frozen for export); default: the cache, or computed live."""
        x, terms, last_src = self._forward_body(x, pe_terms)
        return self.norm(x, pos_term=self._last_term(terms, last_src))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features [B, T, D] from :meth:`forward_features` -> pooled (class token or mean) -> logits."""
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_pooled(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Images -> pooled features [B, D] (the head's input), with the fused last step: LN + GAP (+ the cached
        PE bias, or LN'_last(pos_k) per token when gradients are needed) in one pass for ``avg`` pooling."""
        x, terms, last_src = self._forward_body(x, pe_terms)
        if self.pool == "avg":
            if terms is not None and terms.pooled_bias is not None:
                return self.norm(x, pool=True, pooled_bias=terms.pooled_bias)
            return self.norm(x, pool=True, pos_term=self._last_term(terms, last_src))
        term = self._last_term(terms, last_src)
        return self.norm(x[:, :1], pos_term=None if term is None else term[:, :1]).squeeze(1)

    def forward(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> logits [B, num_classes] (``pe_terms``: see :meth:`forward_features`)."""
        return self.head(self.head_drop(self.forward_pooled(x, pe_terms)))

    def forward_intermediates(self, x: torch.Tensor) -> dict[str, Any]:
        """Every intermediate the analysis needs, computed with unfused plain-PyTorch steps (no cache). Keys:

        - ``block_inputs``: x_l entering block l, [B, T, D] each (L+1 entries);
        - ``token_terms``: LN1_l(x_l), the normalised token term of block l's attention input;
        - ``pos_terms``: the PE term added at block l ([1, T, D]) or None;
        - ``attn_inputs``: token_term + pos_term (what attention sees);
        - ``last_norm_input``: x_{L+1}; ``last_norm_output``: LN(x_{L+1}) without PE;
        - ``last_pos_term``: LN'_last(pos_k) ([1, T, D]) or None;
        - ``features``: forward_features' output; ``pooled``: [B, D]; ``logits``: [B, num_classes];
        - ``grid``: the token grid (h, w); ``num_prefix_tokens``: 1 with a class token, else 0.
        """
        grid = self._grid(x)
        pos = self._pos_for_grid(grid) if self.pos_embed is not None else None
        x = self._embed(x, pos)
        out: dict[str, Any] = {
            "block_inputs": [],
            "token_terms": [],
            "pos_terms": [],
            "attn_inputs": [],
            "grid": grid,
            "num_prefix_tokens": self.num_prefix_tokens,
        }
        step = self.pe_walk.start(pos)
        for i, blk in enumerate(self.blocks):
            out["block_inputs"].append(x)
            src = step.source(i)
            if src is not None:
                tok = blk.norm1.norm_tokens(x)
                term = blk.norm1.norm_pos(src)
                step.record(i, term)
                a = tok + term
            else:
                tok, term = blk.norm1(x), None
                a = tok
            out["token_terms"].append(tok)
            out["pos_terms"].append(term)
            out["attn_inputs"].append(a)
            x = blk.forward_rest(x, a)
        last_out = self.norm.norm_tokens(x)
        last_term = self._last_term(None, step.last_source)
        feats = last_out if last_term is None else last_out + last_term
        out.update(last_norm_input=x, last_norm_output=last_out, last_pos_term=last_term, features=feats)
        pooled = feats[:, 0] if self.pool == "cls" else feats.mean(dim=1)
        out["pooled"] = pooled
        out["logits"] = self.head(self.head_drop(pooled))
        return out

    def extra_repr(self) -> str:
        return (
            f"pe={self.pe!r}, pool={self.pool!r}, add_pos_to_input={self.add_pos_to_input}, "
            f"include_layer0={self.include_layer0}, hierarchical={self.hierarchical}, last_pos={self.last_pos}, "
            f"block_style={self.block_style!r}"
        )


def _check_sizes(*checks: tuple[str, Any, int]) -> None:
    """Raise a ValueError naming the first (name, value, minimum) whose value is not an int >= minimum."""
    for name, value, minimum in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _clear_cache_hook(module: nn.Module, incompatible_keys: Any) -> None:
    module.clear_pe_cache()


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in model.parameters())
