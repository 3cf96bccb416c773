"""``mpvg eval``: top-1/top-5 accuracy of a checkpoint on a data set's held-out split.

The model runs in eval mode under ``torch.inference_mode()``, i.e. with its inference PE cache. By default the
data set is the one the checkpoint was trained on; ``--data`` evaluates on another one with the same classes (the
same class names in the same order as the checkpoint's, else an error listing the first differences).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mpvg_kernels_launcher import COMMANDS

from .options import add_device_arg, add_weights_arg, check_at_least


def _run(args: argparse.Namespace) -> int:
    check_at_least("--batch-size", args.batch_size, 1)
    check_at_least("--num-workers", args.num_workers, 0)
    from ..errors import UserError
    from ..train.evaluate import evaluate_checkpoint, max_workers

    if args.num_workers is not None and args.num_workers > max_workers():
        raise UserError(f"--num-workers {args.num_workers}: must be at most {max_workers()} (4 per usable CPU)")

    r = evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, num_workers=args.num_workers,
                            device=args.device, weights=args.weights, amp=args.amp)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  on {r['images']} "
              f"{r['split']} images of {r['data']} ({r['model']}, pe={r['pe']}, epoch {r['epoch']}, "
              f"{r['weights']} weights)")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mpvg eval``."""
    p = subparsers.add_parser("eval", help=COMMANDS["eval"],
                              description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt written by `mpvg train`, its run folder, or the .safetensors "
                   "`mpvg export --format safetensors` writes from one (required)")
    p.add_argument("--data", default=None,
                   help="digits | cifar10:PATH | cifar100:PATH | folder:PATH with the checkpoint's class names, in its "
                   "order (default: the checkpoint's data set)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size, >= 1 (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers, at most 4 per usable CPU (default: 0 for in-memory data, else "
                   "min(4, usable CPUs - 1))")
    add_device_arg(p)
    add_weights_arg(p, "which weights: auto = EMA when the run kept one, else the model")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast dtype (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: off)")
    p.set_defaults(func=_run)
    return p
