"""Vision Transformers with default, LaPE, PVG and MPVG position embeddings (timm-compatible names).

``create_model(name, pe=...)`` builds a registered model (``list_models()``); ``param_groups`` gives optimizer
groups with the DeiT/LaPE weight-decay exclusions; ``load_pretrained`` loads timm/DeiT-format weights;
``param_table`` counts parameters per model and mode (``mpvg params`` prints it).

May import :mod:`mpvg_kernels.ops` and :mod:`mpvg_kernels.layers`; never training or tools.
"""

from .param_table import PAPER_PARAMS_M, format_param_table, param_table
from .pretrained import checkpoint_filter_fn, load_pretrained, unwrap_state_dict
from .registry import MODEL_CFGS, create_model, list_models, param_groups
from .vision_transformer import (
    PE_MODES,
    POOLS,
    VisionTransformer,
    count_parameters,
    default_pool,
)

__all__ = [
    "MODEL_CFGS",
    "PAPER_PARAMS_M",
    "PE_MODES",
    "POOLS",
    "VisionTransformer",
    "checkpoint_filter_fn",
    "count_parameters",
    "create_model",
    "default_pool",
    "format_param_table",
    "list_models",
    "load_pretrained",
    "param_groups",
    "param_table",
    "unwrap_state_dict",
]
