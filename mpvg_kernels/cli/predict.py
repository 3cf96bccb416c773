"""``mpvg predict``: the top-k classes of each image file under a checkpoint's model.

Images are decoded with PIL, converted to the model's channels (RGB or grayscale) and preprocessed exactly like
the held-out split of the training data: whole-image resize for digits/CIFAR checkpoints, resize + center crop
(crop_pct) for folder checkpoints. Digits checkpoints expect white strokes on black, like the training data.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mpvg_kernels_launcher import COMMANDS

from .options import add_device_arg, add_weights_arg, check_at_least


def _run(args: argparse.Namespace) -> int:
    check_at_least("--topk", args.topk, 1)
    from ..train.predict import predict_images

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
    p = subparsers.add_parser("predict", help=COMMANDS["predict"], description=__doc__)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ... anything PIL reads)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt written by `mpvg train`, its run folder, or the .safetensors "
                   "`mpvg export --format safetensors` writes from one (required)")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image, >= 1 (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text (default: off)")
    add_weights_arg(p, "which weights: auto = EMA when the run kept one, else the model")
    add_device_arg(p)
    p.set_defaults(func=_run)
    return p
