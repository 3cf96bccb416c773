"""Reusable nn modules: the fused norms ``DualLayerNorm`` / ``LastLayerNormPE``, the one position-embedding walk,
the inference PE cache, transformer blocks (patch embed, attention, MLP),
tokenizers, PE resampling and the fixed sin-cos PE tables.

May import :mod:`mpvg_kernels.ops` and torch; never models, training or tools.
"""

from .blocks import BLOCK_STYLES, Attention, Block, DropPath, Mlp, PatchEmbed, to_2tuple
from .norms import DualLayerNorm, LastLayerNormPE
from .pe_cache import PECache, cache_bypassed, no_autocast, optimizer_step_count, watch_optimizer_steps
from .pe_walk import PE_MODES, POOLS, PRESETS, PEPreset, PETerms, PEWalk, default_pool
from .pos_embed import POS_EMBED_TYPES, infer_grid_size, resample_abs_pos_embed, sincos_pos_embed
from .tokenizers import TOKENIZERS, ConvTokenizer, build_tokenizer

__all__ = [
    "BLOCK_STYLES",
    "PE_MODES",
    "POS_EMBED_TYPES",
    "TOKENIZERS",
    "POOLS",
    "PRESETS",
    "PEPreset",
    "PETerms",
    "PEWalk",
    "default_pool",
    "watch_optimizer_steps",
    "Attention",
    "Block",
    "DropPath",
    "DualLayerNorm",
    "LastLayerNormPE",
    "Mlp",
    "PECache",
    "PatchEmbed",
    "ConvTokenizer",
    "build_tokenizer",
    "cache_bypassed",
    "infer_grid_size",
    "no_autocast",
    "optimizer_step_count",
    "resample_abs_pos_embed",
    "sincos_pos_embed",
    "to_2tuple",
]
