"""mpvg-kernels: fused LayerNorm + position-embedding ops, layers and models for MPVG, PVG and LaPE vision
transformers.

``import mpvg_kernels`` loads the ops, the layers and the models (torch and numpy only). Training, analysis,
export and benchmarks live in subpackages that import their own dependencies (extras ``[train]``, ``[export]``).
"""

from ._timm_hook import install as _install_timm_hook
from .layers import DualLayerNorm, LastLayerNormPE
from .models import create_model, list_models
from .ops import (
    available_backends,
    dual_layer_norm,
    get_backend,
    layer_norm_add,
    layer_norm_pool,
    set_backend,
    set_eager_fast_path,
    set_op_design,
    use_backend,
)

__version__ = "0.1.0"

_install_timm_hook()  # timm.create_model("mpvg_...") works whether timm is imported before or after this package


def __getattr__(name: str) -> object:
    """``mpvg_kernels.from_timm`` without importing timm at ``import mpvg_kernels``."""
    if name == "from_timm":
        from .models.timm_bridge import from_timm

        return from_timm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    "set_eager_fast_path",
    "set_op_design",
    "use_backend",
]
