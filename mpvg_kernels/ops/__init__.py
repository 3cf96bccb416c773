"""The fused ops (``layer_norm_add``, ``dual_layer_norm``, ``layer_norm_pool``): the op family in ``layer_norm.py``
(contract, reference, registered ops, kernel route, autograd, public functions), its kernels per backend
(``triton_kernels.py``, the C++ extension ``_C`` from ``csrc/cpu``) and the policy in ``backends.py``.

Imports torch only (and triton, lazily, for the ``triton`` backend); nothing else in the package.
"""

from .backends import (
    available_backends,
    eager_fast_path_enabled,
    get_backend,
    get_op_design,
    set_backend,
    set_eager_fast_path,
    set_op_design,
    use_backend,
    use_eager_fast_path,
    use_op_design,
)
from .layer_norm import dual_layer_norm, layer_norm_add, layer_norm_pool

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
