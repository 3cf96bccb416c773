"""mpvg-kernels: fused LayerNorm + position-embedding ops for MPVG, PVG and LaPE vision transformers."""

from .backends import available_backends, get_backend, set_backend, use_backend
from .ops import dual_layer_norm, layer_norm_add, layer_norm_pool

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "dual_layer_norm",
    "get_backend",
    "layer_norm_add",
    "layer_norm_pool",
    "set_backend",
    "use_backend",
]
