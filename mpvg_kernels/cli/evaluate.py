"""``mpvg eval``: top-1/top-5 accuracy of a checkpoint on a data set's held-out split.

The model runs in eval mode under ``torch.inference_mode()``, i.e. with its inference PE cache. By default the
data set is the one the checkpoint was trained on; ``--data`` evaluates on another one with the same classes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .options import add_device_arg


def _run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ..errors import UserError
    from ..train import data as data_mod
    from ..train.augment import EvalTransform
    from ..train.checkpoint import load_checkpoint, model_from_checkpoint
    from ..train.distributed import resolve_device
    from ..train.trainer import AMP_DTYPES, evaluate

    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.weights, f"checkpoint {args.checkpoint}")
    meta = ckpt["data"]
    spec = data_mod.parse_data_spec(args.data or meta["spec"])
    classes = data_mod.class_names(spec)
    n_classes = int(ckpt["model"]["num_classes"])
    if len(classes) != n_classes:
        raise UserError(f"{spec} has {len(classes)} classes but the checkpoint's model predicts {n_classes}")
    if list(classes) != list(meta["classes"]):
        print(f"warning: the class names of {spec} differ from the checkpoint's; comparing by index",
              file=sys.stderr)
    splits = data_mod.load_data(spec, int(meta["in_chans"]), meta["input_size"], float(meta["crop_pct"]))
    device = resolve_device(args.device)
    loader = DataLoader(splits.test, batch_size=args.batch_size, num_workers=args.num_workers if args.num_workers
                        is not None else (0 if splits.in_memory else 4), pin_memory=device.type == "cuda")
    tf = EvalTransform(meta["input_size"], int(meta["in_chans"]), meta["mean"], meta["std"]).to(device)
    res = evaluate(model.to(device), loader, tf, device, AMP_DTYPES[args.amp])
    result = {"top1": res["top1"], "top5": res["top5"], "loss": res["loss"], "images": res["n"],
              "split": splits.test_name, "data": str(spec), "checkpoint": str(args.checkpoint),
              "model": ckpt["model"]["name"], "pe": ckpt["model"]["pe"], "epoch": int(ckpt["epoch"]),
              "weights": "ema" if ckpt.get("ema") and args.weights != "model" else "model"}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  on {res['n']} "
              f"{splits.test_name} images of {spec} ({result['model']}, pe={result['pe']}, epoch {result['epoch']}, "
              f"{result['weights']} weights)")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mpvg eval``."""
    p = subparsers.add_parser("eval", help="top-1/top-5 accuracy of a checkpoint on a held-out split",
                              description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `mpvg train` (required)")
    p.add_argument("--data", default=None,
                   help="digits | cifar10:PATH | cifar100:PATH | folder:PATH (default: the checkpoint's data set)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers (default: 0 for in-memory data, 4 for folder data)")
    add_device_arg(p)
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                   help="which weights: auto = EMA when the run kept one, else the model (default: %(default)s)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast dtype (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: off)")
    p.set_defaults(func=_run)
    return p
