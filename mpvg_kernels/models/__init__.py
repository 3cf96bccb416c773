"""Vision Transformers with default, LaPE, PVG and MPVG position embeddings (timm-compatible names).

``create_model(name, pe=...)`` builds a registered model (``list_models()``); ``param_groups`` gives optimizer
groups with the DeiT/LaPE weight-decay exclusions; ``load_pretrained`` loads timm/DeiT-format weights;
``param_table`` counts parameters per model and mode (``mpvg params`` prints it).

``from_timm`` (timm ViT instance -> this package's model) and the timm registry live in
:mod:`mpvg_kernels.models.timm_bridge`, which needs timm and is imported only on first use of ``from_timm`` (or
explicitly, to register the models with timm).

Each family module (``vision_transformer``, ``swin``, ``ceit``) registers its own configurations with
:mod:`.registry`; :mod:`.factory` builds models and reads ``mpvg train`` checkpoints for the tools.

May import :mod:`mpvg_kernels.ops`, :mod:`mpvg_kernels.layers` and :mod:`mpvg_kernels.errors`; never training or
tools.
"""

from typing import Any

from . import ceit, swin  # noqa: F401 - their models register on import
from .param_table import PAPER_PARAMS_M, PAPER_ROWS, format_param_table, paper_table, param_table
from .pretrained import checkpoint_filter_fn, load_pretrained, unwrap_state_dict
from .registry import MODEL_CFGS, create_model, list_models, param_groups
from .vision_transformer import (
    PE_MODES,
    POOLS,
    VisionTransformer,
    count_parameters,
    default_pool,
    feature_take_indices,
)

__all__ = [
    "MODEL_CFGS",
    "PAPER_PARAMS_M",
    "PAPER_ROWS",
    "PE_MODES",
    "POOLS",
    "VisionTransformer",
    "checkpoint_filter_fn",
    "count_parameters",
    "create_model",
    "default_pool",
    "feature_take_indices",
    "format_param_table",
    "list_models",
    "load_pretrained",
    "param_groups",
    "paper_table",
    "param_table",
    "unwrap_state_dict",
]


def __getattr__(name: str) -> Any:
    # lazy, and left out of __all__: timm is imported only when the converter is used
    if name == "from_timm":
        from .timm_bridge import from_timm

        return from_timm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
