"""``mpvg export``: an inference graph with the PE terms frozen, as ONNX (standard operators) or torch.export.

With --checkpoint, every parameter and buffer of the exported model comes from the checkpoint, or the command
fails naming what is missing, unused or of another shape (it never exports a partly random model).

The file carries deployment metadata (ONNX metadata_props; mpvg_metadata.json in a .pt2 archive): input size,
mean/std, resize policy, interpolation and antialiasing, crop_pct, class names, model name, PE mode and backend;
see docs/deploy.md. It is written atomically: a failed export (full disk, unwritable folder, interrupt) leaves a
previous --out as it was and no partial file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mpvg_kernels_launcher import COMMANDS

from ..export import DEFAULT_OPSET, FORMATS, MAX_OPSET, MIN_OPSET
from ..models.vision_transformer import PE_MODES
from ..ops.backends import KNOWN_BACKENDS
from .options import add_model_arg, add_weights_arg, parse_model_args, require_extra


def _run(args: argparse.Namespace) -> int:
    if args.format == "onnx":  # before any work: which extra to install
        require_extra("onnx", *(("onnxruntime",) if args.verify else ()))
    if args.format == "safetensors":
        require_extra("safetensors")
    model_kwargs = parse_model_args(args.model_arg)
    from ..export import check_export_options, export_model, load_model

    check_export_options(args.out, args.format, opset=args.opset, backend=args.backend)
    model = load_model(args.model, args.pe, args.checkpoint, num_classes=args.num_classes, weights=args.weights,
                       model_kwargs=model_kwargs)
    result = export_model(model, args.out, args.format, opset=args.opset, backend=args.backend, verify=args.verify)
    print(result.message, file=sys.stderr)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "export",
        help=COMMANDS["export"],
        description=__doc__,
    )
    p.add_argument("--model", default=None, help="registered model name (taken from --checkpoint when omitted)")
    p.add_argument("--pe", default=None, choices=PE_MODES, help="PE mode")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="an `mpvg train` checkpoint or its run folder (model, PE mode and options come from it; --model/--pe/"
        "--num-classes/--model-arg that disagree are errors) or timm/DeiT-format weights / a plain state dict "
        "(needs --model); .pt/.pth, or .safetensors (read without pickle). Every parameter and buffer of the "
        "exported model must come from the checkpoint: a tensor that is missing, unused or of another shape is an "
        "error naming it (default: none, random init)",
    )
    add_weights_arg(p, "which weights of an `mpvg train` checkpoint")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the registered one)")
    add_model_arg(p)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx, pt2 (torch.export) or safetensors (the weights and their metadata, for sharing)")
    p.add_argument("--out", required=True,
                   help="output file, written atomically: a temporary file beside it, checked, then renamed over "
                   "it (a failed export leaves a previous file as it was); a symlink is written through")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (--format onnx only; default: {DEFAULT_OPSET})")
    p.add_argument(
        "--backend",
        default=None,
        choices=KNOWN_BACKENDS,
        help="op backend while tracing (default: the configured one, i.e. the fused kernels)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="run the exported graph once and print the max abs diff (ONNX: needs onnxruntime)",
    )
    p.set_defaults(func=_run)
    return p
