"""The fused ops (``layer_norm_add``, ``dual_layer_norm``, ``layer_norm_pool``), the ``mpvg::`` custom-op library
behind them, the float64-checked reference, input validation, backend selection and the Triton kernels.

Imports torch only (and triton, lazily, for the ``triton`` backend); nothing else in the package.
"""

from .backends import (
    available_backends,
    get_backend,
    get_op_design,
    set_backend,
    set_op_design,
    use_backend,
    use_op_design,
)
from .custom_ops import dual_layer_norm, layer_norm_add, layer_norm_pool
from .eager import eager_fast_path_enabled, set_eager_fast_path, use_eager_fast_path

__all__ = [
    "available_backends",
    "dual_layer_norm",
    "eager_fast_path_enabled",
    "get_backend",
    "get_op_design",
    "layer_norm_add",
    "layer_norm_pool",
    "set_backend",
    "set_eager_fast_path",
    "set_op_design",
    "use_backend",
    "use_eager_fast_path",
    "use_op_design",
]
