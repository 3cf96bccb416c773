"""``mpvg predict``: the top-k classes of each image file under a checkpoint's model.

Images are decoded with PIL, converted to the model's channels (RGB or grayscale) and preprocessed exactly like
the held-out split of the training data: whole-image resize for digits/CIFAR checkpoints, resize + center crop
(crop_pct) for folder checkpoints. Digits checkpoints expect white strokes on black, like the training data.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .options import add_device_arg


def predict_images(ckpt_path: str, images: list[str], topk: int = 5, weights: str = "auto",
                   device: str = "auto") -> list[dict[str, Any]]:
    """``[{"image": path, "top": [{"class", "index", "prob"}, ...]}, ...]`` for each image path."""
    import torch

    from ..train.augment import EvalTransform
    from ..train.checkpoint import load_checkpoint, model_from_checkpoint
    from ..train.data import read_image, resize_center_crop
    from ..train.distributed import resolve_device

    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, weights, f"checkpoint {ckpt_path}")
    meta = ckpt["data"]
    dev = resolve_device(device)
    model.to(dev).eval()
    in_chans, size = int(meta["in_chans"]), meta["input_size"]
    tf = EvalTransform(size, in_chans, meta["mean"], meta["std"]).to(dev)
    classes = list(meta["classes"])
    k = max(1, min(topk, len(classes)))
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


def _run(args: argparse.Namespace) -> int:
    results = predict_images(args.checkpoint, args.images, args.topk, args.weights, args.device)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            tops = ", ".join(f"{t['class']} ({100 * t['prob']:.1f}%)" for t in r["top"])
            print(f"{r['image']}: {tops}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mpvg predict``."""
    p = subparsers.add_parser("predict", help="top-k classes of image files under a checkpoint", description=__doc__)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ... anything PIL reads)")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `mpvg train` (required)")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text (default: off)")
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                   help="which weights: auto = EMA when the run kept one, else the model (default: %(default)s)")
    add_device_arg(p)
    p.set_defaults(func=_run)
    return p
