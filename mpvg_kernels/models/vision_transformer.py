"""One Vision Transformer for the four position-embedding modes: ``default``, ``lape``, ``pvg``, ``mpvg``.

Blocks l = 0..L, residual stream x_l, learned position embedding ``pos`` (``pos_embed``, [1, T, D]; T = N, or
N + 1 with a class token). The modes are presets of the knobs ``add_pos_to_input``, ``include_layer0``,
``hierarchical`` and ``last_pos`` (table and rule in :mod:`mpvg_kernels.layers.pe_walk`, the method in
``docs/design.md#the-method``); the model holds its rule as ``self.pe_walk`` and every forward walks it.

- The PE enters only the attention input (q, k and v see it), never the residual stream or the MLP branch.
- ``last_pos``: the last step is LN(x_{L+1}) + LN'_last(p) with p = ``pos`` for ``last_pos=0`` (the paper's
  choice) or p = the PE term added at block k for ``last_pos=k >= 1`` (MPVG Table 5); ``None``: plain
  LN(x_{L+1}). Negative k counts from the last block.
- ``pool``: ``avg`` (GAP over the patch tokens; no class token unless ``class_token=True``), ``cls`` (a class
  token with its own PE row, as in DeiT and the LaPE code) or ``seq`` (Compact-Transformers' sequence pooling of
  CVT/CCT, no class token: pooled = sum_n w_n z_n with w = softmax_n(``attention_pool``(z_n)), z_n the last
  norm's output of token n, LN'_last(p)_n included for MPVG; no pooled-bias fold, which exists only for
  ``avg``). Default: ``cls`` for default/lape, ``avg`` for pvg/mpvg.
- ``fc_norm=True`` (``avg`` only) puts the last LayerNorm after pooling, as timm's GAP ViTs do (``norm`` is then
  an identity and the norm is ``fc_norm``); with a last PE the pooled output is
  fc_norm(mean_n x_n) + mean_n LN'_last(p)_n.
- Image-independent PE terms: :meth:`VisionTransformer.compute_pe_terms` (live), :meth:`~VisionTransformer.pe_terms`
  (the inference cache), and ``forward(x, pe_terms=...)`` to run with given (e.g. frozen) terms.

Parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.norm1``,
``blocks.i.attn.qkv``, ``blocks.i.attn.proj``, ``blocks.i.norm2``, ``blocks.i.mlp.fc1/fc2``, ``norm``, ``head``);
the PE LayerNorms are ``blocks.i.norm1.pos_weight/pos_bias`` and ``norm.pos_weight/pos_bias``.

``pos_embed``: ``learn`` (a learned parameter, the default), ``sincos1d`` (T2T-ViT's fixed 1-D sinusoid table over
all T positions, prefix rows included) or ``sincos2d`` (MAE/MoCo-v3's fixed 2-D sin-cos table of the token grid,
zero prefix rows). The fixed tables are buffers named ``pos_embed`` (not parameters: parameter counts match the
papers), recomputed, not interpolated, for another token grid; every mode treats them as it treats a learned PE
(LN'_l and LN'_last normalise them the same way).

``tokenizer``: the image-to-tokens module, a name in :data:`~mpvg_kernels.layers.tokenizers.TOKENIZERS`
(``patch``: the ViT patch embedding; ``conv``: the CCT conv tokenizer) built with ``tokenizer_args``; it is the
attribute ``patch_embed`` whatever its kind.

``distilled=True`` is DeiT's distilled model (timm's ``VisionTransformerDistilled``, names ``dist_token`` and
``head_dist``): a distillation token after the class token (two prefix tokens, two prefix PE rows) and
logits = (head(z_cls) + head_dist(z_dist)) / 2, z the last norm's output of each token (timm's output outside
distillation training). Without a teacher, training on these logits trains both heads on the labels. That needs
``pool="cls"``: with GAP (the pvg/mpvg default, as in the MPVG paper) neither token would reach the heads, so a
pooling left to the mode's default is a ValueError and the registered distilled models pass ``pool="cls"`` in every
mode. ``pool="avg"`` asked for explicitly (or ``reset_classifier(n, "avg")``, e.g. a new classifier on a pruned
feature extractor) is one head on the mean of the patch tokens, without ``head_dist``; both prefix tokens stay in
the sequence.

``block_style="cct"`` is the Compact-Transformers (ViT-Lite/CCT) block: x = x + MSA(LN1(x) [+ pos_l]);
x = LN2(x); x = x + MLP(x) (the second norm is applied to the residual stream itself).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from os import PathLike
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UnsupportedPoolError
from ..layers.blocks import Block, to_2tuple
from ..layers.norms import LastLayerNormPE
from ..layers.pe_cache import no_autocast
from ..layers.pe_walk import AUTO, PE_MODES, POOL_ALIASES, PETerms, check_pe_mode, default_pool, resolve_pe_knobs
from ..layers.pe_walk import POOLS as _WALK_POOLS
from ..layers.pos_embed import infer_grid_size, resample_abs_pos_embed
from ..layers.tokenizers import build_tokenizer
from .base import PEModel, check_pos_embed, check_sizes, count_parameters, format_intermediates
from .pretrained import load_pretrained
from .registry import cifar100_cfg, imagenet_cfg, register_models

__all__ = [
    "PE_MODES",
    "POOLS",
    "VisionTransformer",
    "count_parameters",
    "default_pool",
    "feature_take_indices",
]

_AUTO = AUTO

#: The poolings of :class:`VisionTransformer`: those of every family (``cls``, ``avg``) and ``seq`` (CVT/CCT).
POOLS: tuple[str, ...] = (*_WALK_POOLS, "seq")


# ----------------------------------------------------------------------------- the model


class VisionTransformer(PEModel):
    """ViT/DeiT with default, LaPE, PVG or MPVG position embeddings (see the module docstring for the modes).

    Args (beyond the usual ViT ones): ``pe`` (mode), ``pool`` (``cls``/``avg``/``seq``, None = mode default), the knobs
    ``include_layer0``, ``hierarchical``, ``add_pos_to_input`` (None = mode default), ``pe_layers`` (only the first
    k blocks take a PE term: LaPE for partial layers; None = all) and ``last_pos`` (``"auto"`` =
    mode default, None = no PE at the last LN, int k), ``block_style`` (``prenorm``/``cct``), ``norm_eps``,
    ``pos_init_std``, ``patch_init`` (``default``: PyTorch's conv init as in timm/DeiT; ``kaiming_normal``: CCT),
    ``dynamic_img_size`` (resample the PE at forward for other input sizes), ``pe_cache`` (inference PE cache),
    ``pos_embed`` (``learn``/``sincos1d``/``sincos2d``), ``tokenizer`` and ``tokenizer_args``, ``distilled`` (DeiT's
    distillation token and second head; see the module docstring),
    ``class_token`` (None: only for ``pool="cls"``; True with ``pool="avg"``: a class token that attention sees
    but the average leaves out, as timm's GAP models with a class token), ``fc_norm`` (last norm after pooling).

    timm's model contract is implemented: ``forward_intermediates``/``prune_intermediate_layers``/``feature_info``
    (``features_only``), ``group_matcher`` (layer decay), ``set_grad_checkpointing``, ``reset_classifier``,
    ``get_classifier``, ``no_weight_decay``. :meth:`forward_analysis` is the richer call of ``mpvg analyze``.
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
        pe_layers: int | None = None,
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
        class_token: bool | None = None,
        fc_norm: bool = False,
        pos_embed: str = "learn",
        tokenizer: str = "patch",
        tokenizer_args: dict[str, Any] | None = None,
        distilled: bool = False,
    ) -> None:
        super().__init__()
        check_pe_mode(pe)
        pool_given = pool is not None
        pool = default_pool(pe) if pool is None else pool
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        check_sizes(
            ("depth", depth, 1), ("num_classes", num_classes, 0), ("embed_dim", embed_dim, 1),
            ("num_heads", num_heads, 1), ("in_chans", in_chans, 1),
            *(("patch_size", p, 1) for p in to_2tuple(patch_size)), *(("img_size", v, 1) for v in to_2tuple(img_size)),
        )
        if class_token is not None and not class_token and pool == "cls":
            raise ValueError("pool='cls' needs the class token; class_token=False goes with pool='avg'")
        if class_token and pool == "seq":
            raise ValueError("pool='seq' (sequence pooling, CVT/CCT) pools every token and takes no class token")
        if distilled and pool != "cls" and not (pool_given and pool == "avg"):
            raise ValueError(
                f"distilled=True classifies from the class and distillation tokens (DeiT) and needs pool='cls', got "
                f"pool={pool!r} (pe={pe!r} defaults to GAP, where neither token reaches a head); pass pool='cls' "
                "(or pool='avg' explicitly for one head on the patch mean)"
            )
        if fc_norm and pool != "avg":
            raise ValueError(f"fc_norm=True (the last norm after pooling) needs pool='avg', got pool={pool!r}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        check_pos_embed(pos_embed, embed_dim)
        if patch_init not in ("default", "kaiming_normal"):
            raise ValueError(f"patch_init must be 'default' or 'kaiming_normal', got {patch_init!r}")
        self._set_pe_knobs(resolve_pe_knobs(
            pe, depth, include_layer0=include_layer0, hierarchical=hierarchical, add_pos_to_input=add_pos_to_input,
            last_pos=last_pos, pe_layers=pe_layers,
        ))
        self.pool = pool

        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.depth = depth
        self.norm_eps = norm_eps
        self.block_style = block_style
        self.dynamic_img_size = dynamic_img_size
        self.pe_cache_enabled = pe_cache
        self.grad_checkpointing = False
        self.has_class_token = pool == "cls" if class_token is None else bool(class_token)
        self.use_fc_norm = bool(fc_norm)
        self.distilled = bool(distilled)
        self.num_prefix_tokens = (1 if self.has_class_token else 0) + int(self.distilled)
        self.in_chans = in_chans
        self.pos_embed_type = pos_embed
        self.tokenizer = tokenizer

        self.patch_embed = build_tokenizer(tokenizer, img_size, patch_size, in_chans, embed_dim, tokenizer_args)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.has_class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.distilled else None
        self._init_pos_embed()
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
        last_norm = LastLayerNormPE(embed_dim, eps=norm_eps, use_pos=self.last_pos is not None)
        # timm's names: ``norm`` before pooling, or an identity ``norm`` and ``fc_norm`` after pooling.
        self.norm: nn.Module = nn.Identity() if fc_norm else last_norm
        self.fc_norm: nn.Module = last_norm if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        #: Sequence pooling's token scores (Compact-Transformers' ``classifier.attention_pool``).
        self.attention_pool = nn.Linear(embed_dim, 1) if pool == "seq" else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist: nn.Module | None = None
        if self._two_heads:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.pos_init_std = pos_init_std
        self.patch_init = patch_init
        self.init_weights()
        self.feature_info = self._make_feature_info()
        self.default_cfg: dict[str, Any] = self._make_default_cfg()
        self.pretrained_cfg = self.default_cfg

    # ------------------------------------------------------------------ configuration helpers

    def _make_default_cfg(self) -> dict[str, Any]:
        return self._data_cfg("vision_transformer", f"patch_embed.{self.patch_embed.first_conv}", self._classifier)

    def _make_feature_info(self) -> list[dict[str, Any]]:
        r = max(self.patch_embed.patch_size)
        return [dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=r) for i in range(len(self.blocks))]

    @property
    def _two_heads(self) -> bool:
        """DeiT's distilled classifier: class token -> ``head``, distillation token -> ``head_dist``."""
        return self.distilled and self.pool == "cls"

    @property
    def _classifier(self) -> str | tuple[str, str]:
        """The classifier's module name(s), as ``default_cfg["classifier"]`` gives them."""
        return ("head", "head_dist") if self._two_heads else "head"

    @property
    def global_pool(self) -> str:
        """timm's name for the pooling: ``token`` (class token), ``avg`` or ``seq`` (sequence pooling)."""
        return "token" if self.pool == "cls" else self.pool

    def init_weights(self) -> None:
        """DeiT/LaPE init (:meth:`PEModel.init_weights <mpvg_kernels.models.base.PEModel.init_weights>`); the
        tokenizer's convs take PyTorch's default or, with ``patch_init="kaiming_normal"``, CCT's."""
        super().init_weights()
        if self.patch_init == "kaiming_normal":
            for m in self.patch_embed.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise LR decay): stem (class token, PE, patch embedding), one group per
        block, the last norm after the blocks (the head and ``fc_norm`` fall in the last group)."""
        return dict(
            stem=r"^cls_token|dist_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay besides every 1-D parameter (see :func:`param_groups`); ``pos_embed``
        only where it is a parameter (a fixed sin-cos table is a buffer)."""
        names = {"cls_token", "dist_token"}
        return names | {"pos_embed"} if isinstance(self.pos_embed, nn.Parameter) else names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        """The classifier head; ``(head, head_dist)`` for a distilled model (as timm)."""
        if self._two_heads:
            return self.head, self.head_dist
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: identity, features out). ``global_pool``
        (timm's name): None keeps the pooling; ``token`` or ``avg`` switch it (``token`` needs the class token)."""
        check_sizes(("num_classes", num_classes, 0))
        if global_pool is not None:
            if global_pool not in POOL_ALIASES:
                raise UnsupportedPoolError(f"global_pool must be None, 'token' or 'avg', got {global_pool!r}")
            pool = POOL_ALIASES[global_pool]
            if pool == "cls" and not self.has_class_token:
                raise UnsupportedPoolError("global_pool='token' needs a class token; this model has none")
            if pool == "cls" and self.use_fc_norm:
                raise UnsupportedPoolError(
                    "global_pool='token' does not go with fc_norm (the norm after average pooling)"
                )
            if self.pool == "seq":  # the sequence pooling's weights go with it (timm drops an attention pool so)
                self.attention_pool = None
            self.pool = pool
            self.default_cfg["pool"] = pool
            self.default_cfg["classifier"] = self._classifier
            if not self._two_heads:
                self.head_dist = None
            self.clear_pe_cache()
        self.num_classes = num_classes
        ref = next(self.parameters())
        heads = self._classifier
        for name in heads if isinstance(heads, tuple) else (heads,):
            if num_classes > 0:
                head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
                nn.init.trunc_normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)
            else:
                head = nn.Identity()
            setattr(self, name, head.train(self.training))
        self.default_cfg["num_classes"] = num_classes

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Rebuild for another input resolution: a learned PE is resampled (bicubic) to the new token grid, a fixed
        sin-cos table recomputed for it."""
        img_size = to_2tuple(img_size)
        pe = self.patch_embed
        new_grid = tuple(pe.grid_for(*img_size))
        if new_grid[0] < 1 or new_grid[1] < 1:
            raise ValueError(f"img_size {img_size} leaves no tokens (grid {new_grid})")
        if self.pos_embed is not None and new_grid != pe.grid_size:
            if isinstance(self.pos_embed, nn.Parameter):
                with torch.no_grad():
                    new = resample_abs_pos_embed(self.pos_embed, new_grid, pe.grid_size, self.num_prefix_tokens)
                self.pos_embed = nn.Parameter(new.contiguous(), requires_grad=self.pos_embed.requires_grad)
            else:
                self.pos_embed = self._fixed_pos_embed(new_grid, like=self.pos_embed)
        pe.set_img_size(img_size)
        self.default_cfg["input_size"] = (self.default_cfg["input_size"][0], *img_size)
        self.clear_pe_cache()

    def load_pretrained(
        self, checkpoint: str | PathLike | Mapping[str, Any], strict: bool = True
    ) -> torch.nn.modules.module._IncompatibleKeys:
        """Load a timm/DeiT-format (or this package's) checkpoint; see :func:`load_pretrained`."""
        return load_pretrained(self, checkpoint, strict=strict)

    # ------------------------------------------------------------------ PE cache

    def _pe_tensors(self) -> list[torch.Tensor]:
        """The tensors the image-independent PE terms are computed from."""
        ts: list[torch.Tensor] = [] if self.pos_embed is None else [self.pos_embed]
        for blk in self.blocks:
            if blk.use_pos:
                ts += [blk.norm1.pos_weight, blk.norm1.pos_bias]
        last = self.last_norm
        if self.has_last_pos and last is not None:
            ts += [last.bias, last.pos_weight, last.pos_bias]
        return ts

    def _pe_modules(self) -> list[nn.Module]:
        """The PE path (the cache keys on all their attributes): the tokenizer (its grid), every block's norm1
        (LN'), the last norms."""
        return [self.patch_embed, *(blk.norm1 for blk in self.blocks), self.norm, self.fc_norm]

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
        last = self.last_norm
        with_last = self.has_last_pos and last is not None
        npt = self.num_prefix_tokens
        with no_autocast(pos.device.type):
            return self.pe_walk.terms(
                pos,
                lambda i, p: self.blocks[i].norm1.norm_pos(p),
                last_term=last.pos_term if with_last else None,
                # the pooled bias averages the patch rows (a class token is left out of the mean)
                pooled_bias=(lambda p: last.pooled_bias(p[:, npt:]))
                if with_last and self.pool == "avg" and not self.use_fc_norm
                else None,
            )

    def _default_grid(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    # ------------------------------------------------------------------ forward

    def _run_block(
        self, blk: Block, x: torch.Tensor, pos: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(blk, x, pos, use_reentrant=False)
        return blk(x, pos)

    def _embed(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """Images -> the tokens entering block 0 (patches, class token, the PE added where the mode does)."""
        x = self.patch_embed(x)
        prefix = [t for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat([t.expand(x.shape[0], -1, -1).to(x.dtype) for t in prefix] + [x], dim=1)
        if self.add_pos_to_input:
            x = x + pos
        return self.pos_drop(x)

    def _forward_body(
        self,
        x: torch.Tensor,
        pe_terms: PETerms | None = None,
        take: Collection[int] = (),
        stop_after: int | None = None,
    ) -> tuple[torch.Tensor, PETerms | None, torch.Tensor | None, list[torch.Tensor]]:
        """Images -> (x_{L+1} [B, T, D], the precomputed PE terms used or None, LN'_last source when not, the
        residual stream after each block in ``take``). ``stop_after``: run blocks 0..stop_after only.

        The PE terms come from ``pe_terms`` when given, else from the cache where it may be used; otherwise the
        fused per-block ops compute them along the walk (with gradients)."""
        grid = self._grid(x)
        pe_terms = self._given_terms(pe_terms)
        if pe_terms is None and self.pos_embed is not None:
            pe_terms = self.pe_terms(grid)
        pos = None
        if self.pos_embed is not None:
            pos = pe_terms.pos if pe_terms is not None else self._pos_for_grid(grid)
        x = self._embed(x, pos)
        kept: list[torch.Tensor] = []
        last = len(self.blocks) - 1 if stop_after is None else stop_after

        if pe_terms is not None:
            for i, (blk, term) in enumerate(zip(self.blocks, pe_terms.terms, strict=True)):
                if i > last:
                    break
                x, _ = blk(x, pos_term=term)
                if i in take:
                    kept.append(x)
            return x, pe_terms, None, kept

        step = self.pe_walk.start(pos)
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            x, term = self._run_block(blk, x, step.source(i))
            step.record(i, term)
            if i in take:
                kept.append(x)
        return x, None, step.last_source, kept

    def _pool_fc_norm(self, x: torch.Tensor, term: torch.Tensor | None) -> torch.Tensor:
        """``fc_norm`` models: fc_norm(mean of the patch tokens) (+ mean of LN'_last(p) over the patch rows)."""
        npt = self.num_prefix_tokens
        m = x[:, npt:].mean(dim=1, keepdim=True)
        c = None if term is None else term[:, npt:].mean(dim=1, keepdim=True)
        fc = self.fc_norm
        if not isinstance(fc, LastLayerNormPE):  # pruned: plain mean
            return m.squeeze(1)
        return fc(m, pos_term=c).squeeze(1)

    def forward_features(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Per-token features [B, T, D] after the last norm: LN(x_{L+1}) (+ LN'_last(pos_k) for MPVG), for dense
        heads. With a class token, token 0 is the class token. ``pe_terms``: precomputed terms to use
        (:meth:`compute_pe_terms`, e.g. frozen for export); default: the cache, or computed live. With
        ``fc_norm`` the tokens are not normalised (as in timm); the norm follows the pooling in forward_head."""
        x, terms, last_src, _ = self._forward_body(x, pe_terms)
        return self._norm_tokens(x, self._last_term(terms, last_src))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features [B, T, D] from :meth:`forward_features` -> pooled (class token, mean of the patch tokens, then
        ``fc_norm`` where the model has it, or sequence pooling) -> logits."""
        if self._two_heads:
            return self._distilled_head(x[:, :2], pre_logits)
        x = self.head_drop(self._pool_tokens(x))
        return x if pre_logits else self.head(x)

    def _pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token features [B, T, D] -> pooled [B, D]: the class token, sequence pooling, ``fc_norm`` of the
        patch mean, or the patch mean."""
        if self.pool == "cls":
            return x[:, 0]
        if self.pool == "seq":
            return self._seq_pool(x)
        if self.use_fc_norm:
            grid = self._feature_grid(x.shape[1])
            return self._pool_fc_norm(x, self._last_term(self.pe_terms(grid), None, grid))
        return x[:, self.num_prefix_tokens :].mean(dim=1)

    def _feature_grid(self, num_tokens: int) -> tuple[int, int]:
        grid = self.patch_embed.grid_size
        if num_tokens - self.num_prefix_tokens == grid[0] * grid[1]:
            return grid
        return infer_grid_size(num_tokens - self.num_prefix_tokens)

    def _seq_pool(self, z: torch.Tensor) -> torch.Tensor:
        """Sequence pooling of per-token features [B, T, D]: sum_n softmax_n(attention_pool(z)_n) z_n -> [B, D]."""
        assert self.attention_pool is not None
        w = torch.softmax(self.attention_pool(z), dim=1)  # [B, T, 1]
        return (w.transpose(1, 2) @ z).squeeze(1)

    def _distilled_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normalised [class, distillation] tokens [B, 2, D] -> (head(z_cls) + head_dist(z_dist)) / 2, or with
        ``pre_logits`` their mean (timm's pre-logits of a distilled DeiT)."""
        if pre_logits:
            return tokens.mean(dim=1)
        z = self.head_drop(tokens)
        return (self.head(z[:, 0]) + self.head_dist(z[:, 1])) / 2

    def forward_pooled(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Images -> pooled features [B, D] (the head's input), with the fused last step: LN + GAP (+ the cached
        PE bias, or LN'_last(pos_k) per token when gradients are needed) in one pass for ``avg`` pooling. A
        distilled model: the mean of its two normalised prefix tokens (timm's pre-logits)."""
        if self._two_heads:
            return self._prefix_features(x, pe_terms).mean(dim=1)
        return self._pooled(x, pe_terms)

    def _prefix_features(self, x: torch.Tensor, pe_terms: PETerms | None) -> torch.Tensor:
        """Images -> the normalised prefix tokens [B, P, D] (class, then distillation token)."""
        x, terms, last_src, _ = self._forward_body(x, pe_terms)
        term = self._last_term(terms, last_src)
        npt = self.num_prefix_tokens
        return self._norm_tokens(x[:, :npt], None if term is None else term[:, :npt])

    def _pooled(self, x: torch.Tensor, pe_terms: PETerms | None) -> torch.Tensor:
        x, terms, last_src, _ = self._forward_body(x, pe_terms)
        if self.last_norm is None:  # pruned (prune_intermediate_layers): the tokens are pooled as they are
            return self._pool_tokens(x)
        term = self._last_term(terms, last_src)
        if self.pool == "avg" and self.use_fc_norm:
            return self._pool_fc_norm(x, term)
        norm = self._last_norm()
        if self.pool == "seq":
            return self._seq_pool(norm(x, pos_term=term))
        npt = self.num_prefix_tokens
        if self.pool == "avg":
            if terms is not None and terms.pooled_bias is not None:
                return norm(x[:, npt:], pool=True, pooled_bias=terms.pooled_bias)
            return norm(x[:, npt:], pool=True, pos_term=None if term is None else term[:, npt:])
        return norm(x[:, :1], pos_term=None if term is None else term[:, :1]).squeeze(1)

    def forward(self, x: torch.Tensor, pe_terms: PETerms | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> logits [B, num_classes] (``pe_terms``: see :meth:`forward_features`)."""
        if self._two_heads:
            return self._distilled_head(self._prefix_features(x, pe_terms))
        return self.head(self.head_drop(self._pooled(x, pe_terms)))

    # ------------------------------------------------------------------ timm's feature contract

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates``: the residual stream after the blocks named by ``indices`` (None: all;
        int n: the last n; a sequence: those, negative from the end).

        ``norm=True`` normalises each with the last norm *including* MPVG's LN'_last(p): LN(x_l) + LN'_last(p), the
        per-token features dense heads receive. ``output_fmt``: ``NCHW`` ([B, D, h, w], prefix tokens split off)
        or ``NLC`` ([B, h*w, D]). Returns the list (``intermediates_only``), ``(final features, list)``, or with
        ``output_dict`` ``{"image_intermediates", "image_intermediates_prefix"?, "image_features"?}``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        grid = self._grid(x)
        feats, terms, last_src, kept = self._forward_body(
            x, take=set(take), stop_after=max_index if stop_early else None
        )
        term = None
        if norm or not intermediates_only:
            term = self._last_term(terms, last_src, grid)
        if norm:
            kept = [self._norm_tokens(y, term) for y in kept]
        final = None if intermediates_only else self._norm_tokens(feats, term)
        return format_intermediates(
            kept, final, grid, self.num_prefix_tokens, output_fmt, return_prefix_tokens, output_dict
        )

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's pruning for feature extraction: keep blocks up to the last index taken, optionally drop the last
        norm (``prune_norm``) and the head and ``fc_norm`` (``prune_head``; with sequence pooling also its
        ``attention_pool``, the pooled features being then the token mean). Returns the absolute indices kept."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        knobs = self.pe_knobs.pruned(max_index + 1, last_norm=not prune_norm)
        self.blocks = self.blocks[: max_index + 1]
        self.depth = len(self.blocks)
        self._set_pe_knobs(knobs)
        if prune_norm:
            self.norm = nn.Identity()
            if self.use_fc_norm:
                self.fc_norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            # the sequence-pooling weights belong to the head: the token mean remains
            self.reset_classifier(0, "avg" if self.pool == "seq" else None)
        self.feature_info = self._make_feature_info()
        self.clear_pe_cache()
        return take

    # ------------------------------------------------------------------ analysis

    def forward_analysis(self, x: torch.Tensor) -> dict[str, Any]:
        """Every intermediate the analysis needs (``mpvg analyze``), computed with unfused plain-PyTorch steps (no
        cache). Keys:

        - ``block_inputs``: x_l entering block l, [B, T, D] each (L+1 entries);
        - ``token_terms``: LN1_l(x_l), the normalised token term of block l's attention input;
        - ``pos_terms``: the PE term added at block l ([1, T, D]) or None;
        - ``attn_inputs``: token_term + pos_term (what attention sees);
        - ``last_norm_input``: x_{L+1}; ``last_norm_output``: LN(x_{L+1}) without PE;
        - ``last_pos_term``: LN'_last(pos_k) ([1, T, D]) or None;
        - ``features``: forward_features' output; ``pooled``: [B, D]; ``logits``: [B, num_classes];
        - ``grid``: the token grid (h, w); ``num_prefix_tokens``: 1 with a class token (2 with a distillation
          token), else 0.
        """
        if self.use_fc_norm:
            raise ValueError("forward_analysis needs the last norm before pooling; this model has fc_norm=True")
        out, x, step = self._analysis_begin(x)
        for i, blk in enumerate(self.blocks):
            x = blk.forward_rest(x, self._analyse_block(out, step, i, blk, x))
        feats = self._analyse_last_norm(out, x, self._last_norm(), self._last_term(None, step.last_source))
        if self._two_heads:
            out["pooled"] = self._distilled_head(feats[:, :2], pre_logits=True)
            out["logits"] = self._distilled_head(feats[:, :2])
            return out
        if self.pool == "seq":
            w = torch.softmax(self.attention_pool(feats), dim=1)  # type: ignore[misc]
            pooled = (w * feats).sum(dim=1)
        elif self.pool == "cls":
            pooled = feats[:, 0]
        else:
            pooled = feats[:, self.num_prefix_tokens :].mean(dim=1)
        out["pooled"] = pooled
        out["logits"] = self.head(self.head_drop(pooled))
        return out

    def extra_repr(self) -> str:
        return (
            f"pe={self.pe!r}, pool={self.pool!r}, add_pos_to_input={self.add_pos_to_input}, "
            f"include_layer0={self.include_layer0}, hierarchical={self.hierarchical}, last_pos={self.last_pos}, "
            f"block_style={self.block_style!r}, distilled={self.distilled}, pos_embed={self.pos_embed_type!r}, "
            f"tokenizer={self.tokenizer!r}"
        )


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's rule for ``indices``: None = all, int n = the last n, a sequence = those (negative from the end).
    Returns (absolute indices, their maximum)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n indices={indices} is out of range (1 to {num_features})")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            j = num_features + i if i < 0 else i
            if not 0 <= j < num_features:
                raise ValueError(f"feature index {i} is out of range (0 to {num_features - 1})")
            take.append(j)
    return take, max(take)


# ----------------------------------------------------------------------------- registered configurations
# sklearn's load_digits() pixels / 16 (0..16 -> 0..1): mean and std over all 1,797 8x8 images.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)

register_models(VisionTransformer, {
    "deit_tiny_patch16_224": {
        "model": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000),
        "cfg": imagenet_cfg(),
        "source": "DeiT-Ti (Touvron et al. 2021); MPVG Table 1",
        "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    },
    "deit_small_patch16_224": {
        "model": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=1000),
        "cfg": imagenet_cfg(),
        "source": "DeiT-S (Touvron et al. 2021); MPVG Table 1",
        "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    },
    "deit_base_patch16_224": {
        "model": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000),
        "cfg": imagenet_cfg(),
        "source": "DeiT-B (Touvron et al. 2021); MPVG Table 1",
        "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    },
    "vit_lite_7_4_32": {
        # Compact-Transformers vit_7_4_32: conv tokenizer 4x4/stride 4 with bias (kaiming_normal init), class
        # token (seq_pool=False), learnable PE (trunc_normal std 0.2), 7 blocks, dim 256, 4 heads, MLP ratio 2,
        # qkv without bias, LN2 applied to the residual stream, LayerNorm eps 1e-5, attention dropout 0.1,
        # stochastic depth 0.1, dropout 0 (as cvt_7_4_32 and cct_7_3x1_32, the official values).
        "model": dict(
            img_size=32,
            patch_size=4,
            embed_dim=256,
            depth=7,
            num_heads=4,
            mlp_ratio=2.0,
            qkv_bias=False,
            block_style="cct",
            attn_drop_rate=0.1,
            drop_path_rate=0.1,
            patch_init="kaiming_normal",
            pos_init_std=0.2,
            norm_eps=1e-5,
            num_classes=100,
        ),
        "cfg": cifar100_cfg(),
        "source": "ViT-Lite-7/4 (Hassani et al. 2022) on CIFAR-100; MPVG Table 2",
        "tiny": dict(img_size=16, embed_dim=32, depth=2, num_heads=2),
    },
    "vit_digits": {
        # Sized for sklearn's 8x8 digits upsampled to 16x16: 16 tokens of 4x4 pixels, dim 64, 4 blocks.
        "model": dict(
            img_size=16, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10
        ),
        "cfg": dict(mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=1.0),
        "source": "this project: the bundled digits data (8x8, 10 classes, 1,797 images)",
        "tiny": dict(embed_dim=32, depth=2, num_heads=2),
    },
    "t2t_vit_7": {
        # Official T2T-ViT (yitu-opensource/T2T-ViT, models/t2t_vit.py: t2t_vit_7): T2T module with Performer token
        # layers (token_dim 64, random features m = 32, dropout 0.1), fixed 1-D sinusoid PE (a buffer), class
        # token, 7 blocks of dim 256, 4 heads, MLP ratio 2, qkv without bias, attention scale head_dim^-0.5,
        # LayerNorm eps 1e-5, stochastic depth 0.1 (the default of the official train script), crop_pct 0.9.
        "model": dict(
            img_size=224,
            patch_size=16,
            tokenizer="t2t",
            tokenizer_args=dict(token_type="performer", token_dim=64),
            pos_embed="sincos1d",
            embed_dim=256,
            depth=7,
            num_heads=4,
            mlp_ratio=2.0,
            qkv_bias=False,
            norm_eps=1e-5,
            drop_path_rate=0.1,
            num_classes=1000,
        ),
        "cfg": imagenet_cfg(crop_pct=0.9),
        "source": "T2T-ViT-7 (Yuan et al. 2021); MPVG Tables 1-2, LaPE Table 1",
        # The official code holds the sinusoid table and the Performer random features as frozen nn.Parameters, and
        # the papers' #Params count them (4,310,222 = 4,255,694 trainable + 50,432 + 2 x 2,048); here they are
        # buffers, added back only where the parameter table compares with the papers.
        "paper_counts_buffers": ("pos_embed", "patch_embed.attention1.w", "patch_embed.attention2.w"),
        # 64 x 64 pixels -> 16 x 16, 8 x 8, then 4 x 4 tokens
        "tiny": dict(
            img_size=64, tokenizer_args=dict(token_type="performer", token_dim=16), embed_dim=32, depth=2, num_heads=2
        ),
    },
    "deit_tiny_distilled_patch16_224": {
        # DeiT's distillation token and second head; pool="cls" in every mode (the heads read the two tokens).
        "model": dict(
            img_size=224,
            patch_size=16,
            embed_dim=192,
            depth=12,
            num_heads=3,
            num_classes=1000,
            distilled=True,
            pool="cls",
        ),
        "cfg": imagenet_cfg(),
        "source": "DeiT-Ti distilled (Touvron et al. 2021, 5.91 M params); LaPE Table 1",
        "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    },
    "deit_small_distilled_patch16_224": {
        "model": dict(
            img_size=224,
            patch_size=16,
            embed_dim=384,
            depth=12,
            num_heads=6,
            num_classes=1000,
            distilled=True,
            pool="cls",
        ),
        "cfg": imagenet_cfg(),
        "source": "DeiT-S distilled (Touvron et al. 2021, 22.4 M params); LaPE Table 1",
        "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    },
    "cvt_7_4_32": {
        # Compact-Transformers cvt_7_4_32: ViT-Lite's tokenizer (conv 4x4 / stride 4 with bias, kaiming_normal
        # init), sequence pooling (no class token) in every mode, learnable PE (trunc_normal std 0.2), 7 blocks,
        # dim 256, 4 heads, MLP ratio 2, qkv without bias, LN2 on the residual stream, LayerNorm eps 1e-5,
        # attention dropout 0.1, stochastic depth 0.1, dropout 0.
        "model": dict(
            img_size=32,
            patch_size=4,
            embed_dim=256,
            depth=7,
            num_heads=4,
            mlp_ratio=2.0,
            qkv_bias=False,
            block_style="cct",
            attn_drop_rate=0.1,
            drop_path_rate=0.1,
            patch_init="kaiming_normal",
            pos_init_std=0.2,
            norm_eps=1e-5,
            pool="seq",
            num_classes=100,
        ),
        "cfg": cifar100_cfg(),
        "source": "CVT-7/4 (Hassani et al. 2021, Compact-Transformers) on CIFAR-100; LaPE Table 2",
        "tiny": dict(img_size=16, embed_dim=32, depth=2, num_heads=2),
    },
    "cct_7_3x1_32": {
        # Compact-Transformers cct_7_3x1_32: conv tokenizer of one layer (conv 3x3 / stride 1 / padding 1 without
        # bias, ReLU, max-pool 3 / 2 / 1: 32x32 -> 16x16 = 256 tokens), otherwise as cvt_7_4_32.
        "model": dict(
            img_size=32,
            patch_size=3,
            tokenizer="conv",
            tokenizer_args=dict(n_conv_layers=1),
            embed_dim=256,
            depth=7,
            num_heads=4,
            mlp_ratio=2.0,
            qkv_bias=False,
            block_style="cct",
            attn_drop_rate=0.1,
            drop_path_rate=0.1,
            patch_init="kaiming_normal",
            pos_init_std=0.2,
            norm_eps=1e-5,
            pool="seq",
            num_classes=100,
        ),
        "cfg": cifar100_cfg(),
        "source": "CCT-7/3x1 (Hassani et al. 2021, Compact-Transformers) on CIFAR-100; LaPE Table 2",
        "tiny": dict(img_size=16, embed_dim=32, depth=2, num_heads=2),
    },
})
