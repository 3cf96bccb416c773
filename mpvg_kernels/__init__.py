"""mpvg-kernels: fused LayerNorm + position-embedding ops, layers and models for MPVG, PVG and LaPE vision
transformers.

``import mpvg_kernels`` loads the ops, the layers and the models (torch and numpy only). Training, analysis,
export and benchmarks live in subpackages that import their own dependencies (extras ``[train]``, ``[export]``).
"""

from .layers import DualLayerNorm, LastLayerNormPE
from .models import create_model, list_models
from .ops import (
    available_backends,
    dual_layer_norm,
    get_backend,
    layer_norm_add,
    layer_norm_pool,
    set_backend,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "DualLayerNorm",
    "LastLayerNormPE",
    "available_backends",
    "create_model",
    "dual_layer_norm",
    "get_backend",
    "layer_norm_add",
    "layer_norm_pool",
    "list_models",
    "set_backend",
    "use_backend",
]
