"""Writing checkpoints that load with ``torch.load(weights_only=True)``, and RNG state capture.

The layout of a checkpoint, reading it back and rebuilding the model are :mod:`mpvg_kernels.models.factory` (its
names are re-exported here: ``build_model``, ``model_from_checkpoint``, ``load_checkpoint``, ...), so the tools that
only read checkpoints need not import training.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.factory import (  # noqa: F401 - re-exported: reading checkpoints and rebuilding models
    CHECKPOINT_NAME,
    DATA_KEYS,
    EVAL_RESIZES,
    FORMAT,
    MAX_INPUT_SIDE,
    MAX_MODULES,
    MAX_OPTION_INT,
    REQUIRED_KEYS,
    VERSION,
    available_memory,
    build_meta_model,
    build_model,
    check_model_fits,
    checkpoint_file,
    is_train_checkpoint,
    load_checkpoint,
    load_state_dict_checked,
    mismatch_parts,
    model_from_checkpoint,
    read_torch_file,
    state_dict_mismatch,
    tensor_bytes,
    validate_checkpoint,
)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape and bytes), for cross-rank equality checks."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def capture_rng() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and python RNG states as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": [int(v) for v in pystate], "gauss": gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# save / load


def to_cpu(obj: Any) -> Any:
    """Tensors moved to CPU inside nested dicts/lists/tuples (for a device-independent file)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temporary file + rename), so an interrupted save never leaves a truncated file."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(to_cpu(payload), tmp)
    os.replace(tmp, path)
