"""Prediction: the top-k classes of image files under a checkpoint's model (``mpvg predict``).

Images are decoded with PIL, converted to the model's channels (RGB or grayscale) and preprocessed exactly like
the held-out split of the training data: whole-image resize for digits/CIFAR checkpoints, resize + center crop
(crop_pct) for folder checkpoints. Digits checkpoints expect white strokes on black, like the training data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..data import EvalTransform, read_image, resize_center_crop
from .checkpoint import load_checkpoint, model_from_checkpoint
from .distributed import resolve_device


def predict_images(ckpt_path: str | os.PathLike, images: Sequence[str | os.PathLike], topk: int = 5,
                   weights: str = "auto", device: str = "auto") -> list[dict[str, Any]]:
    """``[{"image": path, "top": [{"class", "index", "prob"}, ...]}, ...]`` for each image path.

    ``topk`` >= 1 (a :class:`~mpvg_kernels.errors.UserError` otherwise); more than the number of classes shows
    them all. ``ckpt_path``: a file or an ``mpvg train`` run folder; its metadata is validated
    (:func:`~mpvg_kernels.train.checkpoint.validate_checkpoint`: e.g. one class name per output) before anything is
    built."""
    from ..errors import UserError

    if int(topk) < 1:
        raise UserError(f"topk {topk}: must be at least 1")
    dev = resolve_device(device)
    ckpt = load_checkpoint(ckpt_path, require_data=True)  # one class name per output, sizes in range, ...
    model = model_from_checkpoint(ckpt, weights, f"checkpoint {ckpt_path}")
    meta = ckpt["data"]
    model.to(dev).eval()
    in_chans, size = int(meta["in_chans"]), meta["input_size"]
    tf = EvalTransform(size, in_chans, meta["mean"], meta["std"]).to(dev)
    classes = list(meta["classes"])
    k = min(int(topk), len(classes))
    out = []
    with torch.inference_mode():
        for path in images:
            img = read_image(path, in_chans)
            if meta.get("eval_resize") == "center_crop":
                img = resize_center_crop(img, size, float(meta["crop_pct"]))
            logits = model(tf(img[None].to(dev))).float()
            probs = logits.softmax(dim=-1)[0]
            p, idx = probs.topk(k)
            out.append({"image": str(path), "top": [{"class": classes[int(i)], "index": int(i), "prob": float(q)}
                                                    for q, i in zip(p.tolist(), idx.tolist(), strict=True)]})
    return out
