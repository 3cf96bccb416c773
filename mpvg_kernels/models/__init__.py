"""Vision Transformers with default, LaPE, PVG and MPVG position embeddings (timm-compatible names).

``create_model(name, pe=...)`` builds a registered model (``list_models()``); ``param_groups`` gives optimizer
groups with the DeiT/LaPE weight-decay exclusions; ``load_checkpoint`` loads timm/DeiT-format weights;
``param_table`` counts parameters per model and mode (``python -m mpvg_kernels.models`` prints it).
"""

from .checkpoint import checkpoint_filter_fn, load_checkpoint, unwrap_state_dict
from .param_table import PAPER_PARAMS_M, format_param_table, param_table
from .pos_embed import resample_abs_pos_embed
from .registry import MODEL_CFGS, create_model, list_models, param_groups
from .vision_transformer import (
    PE_MODES,
    POOLS,
    Attention,
    Block,
    Mlp,
    PatchEmbed,
    VisionTransformer,
    count_parameters,
    default_pool,
)

__all__ = [
    "MODEL_CFGS",
    "PAPER_PARAMS_M",
    "PE_MODES",
    "POOLS",
    "Attention",
    "Block",
    "Mlp",
    "PatchEmbed",
    "VisionTransformer",
    "checkpoint_filter_fn",
    "count_parameters",
    "create_model",
    "default_pool",
    "format_param_table",
    "list_models",
    "load_checkpoint",
    "param_groups",
    "param_table",
    "resample_abs_pos_embed",
    "unwrap_state_dict",
]
