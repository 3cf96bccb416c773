"""The fused ops (``layer_norm_add``, ``dual_layer_norm``, ``layer_norm_pool``), the ``mpvg::`` custom-op library
behind them, the float64-checked reference, input validation, backend selection and the Triton kernels.

Imports torch only (and triton, lazily, for the ``triton`` backend); nothing else in the package.
"""

from .backends import available_backends, get_backend, set_backend, use_backend
from .custom_ops import dual_layer_norm, layer_norm_add, layer_norm_pool

__all__ = [
    "available_backends",
    "dual_layer_norm",
    "get_backend",
    "layer_norm_add",
    "layer_norm_pool",
    "set_backend",
    "use_backend",
]
