"""Held-out evaluation: the evaluation loop (used by the trainer after each epoch) and a checkpoint's accuracy on a
data set's held-out split (``mpvg eval``).

The model runs in eval mode under ``torch.inference_mode()``, i.e. with its inference PE cache.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as D

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, transform: nn.Module, device: torch.device,
             amp_dtype: torch.dtype | None, info: D.DistInfo | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy, summed exactly over ranks.

    Runs ``model.eval()`` under ``torch.inference_mode()``, so the model uses its inference PE cache.
    """
    was_training = model.training
    model.eval()
    c1 = c5 = loss_sum = n = 0.0
    for x, y in loader:
        x = transform(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        c1 += float((top[:, 0] == y).sum())
        c5 += float((top == y[:, None]).any(dim=1).sum())
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    if info is not None:
        c1, c5, loss_sum, n = D.all_reduce_sum([c1, c5, loss_sum, n], info)
    model.train(was_training)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "n": int(n)}


def class_mismatch(expected: list[str], got: list[str], limit: int = 3) -> str | None:
    """None when ``got`` equals ``expected`` (names and order); else what differs, the first ``limit`` indices."""
    if list(expected) == list(got):
        return None
    diffs = [(i, a, b) for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b]
    kind = "same names in another order" if sorted(expected) == sorted(got) else "other names"
    parts = [f"index {i}: checkpoint {a!r}, data {b!r}" for i, a, b in diffs[:limit]]
    if len(diffs) > limit:
        parts.append("...")
    if len(expected) != len(got):
        parts.append(f"checkpoint {len(expected)} classes, data {len(got)}")
    return f"{kind}, {len(diffs)} of {max(len(expected), len(got))} differ: {'; '.join(parts)}"


def default_workers(in_memory: bool) -> int:
    """DataLoader workers when none are asked for: 0 for in-memory data, else up to 4, leaving one usable CPU to
    the main process (so never more than the CPUs, which DataLoader warns about)."""
    return 0 if in_memory else max(0, min(4, D.usable_cpus() - 1))


def max_workers() -> int:
    """The most DataLoader workers eval accepts: 4 per usable CPU."""
    return 4 * D.usable_cpus()


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | None = None, batch_size: int = 256,
                        num_workers: int | None = None, device: str = "auto", weights: str = "auto",
                        amp: str = "none") -> dict[str, Any]:
    """Top-1/top-5 accuracy and mean loss of a checkpoint's model on a data set's held-out split.

    ``data``: a data spec (``digits``, ``cifar10:PATH``, ...) with the checkpoint's classes; None: the data set the
    checkpoint was trained on. Its class names must be the checkpoint's, in the same order (else an error listing
    the first differences); only CIFAR data without its meta file (names unknown) is compared by index, with a
    warning. ``batch_size`` >= 1, ``num_workers`` from 0 to :func:`max_workers`.
    ``num_workers``: DataLoader workers (None: :func:`default_workers`). ``weights``: ``auto``
    (EMA when the run kept one), ``ema`` or ``model``. ``amp``: ``none``, ``bf16`` or ``fp16`` autocast.

    ``checkpoint``: a file or an ``mpvg train`` run folder; its metadata is validated
    (:func:`~mpvg_kernels.train.checkpoint.validate_checkpoint`) before anything is built or loaded.

    Returns ``{top1, top5, loss, images, split, data, checkpoint, model, pe, epoch, weights}``; every failure the
    user can fix is a :class:`~mpvg_kernels.errors.UserError`.
    """
    from .. import data as data_mod
    from ..data import EvalTransform
    from ..errors import UserError
    from .checkpoint import load_checkpoint, model_from_checkpoint

    if amp not in AMP_DTYPES:
        raise UserError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    if int(batch_size) < 1:
        raise UserError(f"batch_size {batch_size}: must be at least 1")
    if num_workers is not None and not 0 <= int(num_workers) <= max_workers():
        raise UserError(f"num_workers {num_workers}: must be from 0 to {max_workers()} (4 per usable CPU)")
    dev = D.resolve_device(device)
    ckpt = load_checkpoint(checkpoint, require_data=True)
    model = model_from_checkpoint(ckpt, weights, f"checkpoint {checkpoint}")
    meta = ckpt["data"]
    spec = data_mod.parse_data_spec(data or meta["spec"])
    classes = data_mod.class_names(spec)
    n_classes = int(ckpt["model"]["num_classes"])
    if len(classes) != n_classes:
        raise UserError(f"{spec} has {len(classes)} classes but the checkpoint's model predicts {n_classes}")
    mismatch = class_mismatch(list(meta["classes"]), list(classes))
    if mismatch is not None:
        if spec.kind in ("cifar10", "cifar100") and list(classes) == [str(i) for i in range(len(classes))]:
            print(f"warning: {spec} has no meta file, its class names are unknown; comparing classes by index "
                  "with the checkpoint's", file=sys.stderr)
        else:
            raise UserError(f"the class names of {spec} differ from the checkpoint's ({mismatch}); the accuracy "
                            "would compare unrelated classes. Evaluate on data with the checkpoint's classes")
    splits = data_mod.load_data(spec, int(meta["in_chans"]), meta["input_size"], float(meta["crop_pct"]))
    loader = DataLoader(splits.test, batch_size=batch_size, num_workers=num_workers if num_workers
                        is not None else default_workers(splits.in_memory), pin_memory=dev.type == "cuda")
    tf = EvalTransform(meta["input_size"], int(meta["in_chans"]), meta["mean"], meta["std"]).to(dev)
    res = evaluate(model.to(dev), loader, tf, dev, AMP_DTYPES[amp])
    return {"top1": res["top1"], "top5": res["top5"], "loss": res["loss"], "images": res["n"],
            "split": splits.test_name, "data": str(spec), "checkpoint": str(checkpoint),
            "model": ckpt["model"]["name"], "pe": ckpt["model"]["pe"], "epoch": int(ckpt["epoch"]),
            "weights": "ema" if ckpt.get("ema") and weights != "model" else "model"}
