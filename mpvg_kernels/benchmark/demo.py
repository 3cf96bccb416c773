"""A correctness-and-timing table of every backend available for the device's tensors."""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tb

from .. import ops
from ..ops import backends
from ..ops import layer_norm as LN


def run_demo(args: argparse.Namespace) -> int:
    """Max error vs the float64 reference and median time of both ops under every usable backend on
    ``args.device`` (``auto``: CUDA when available; absent CUDA is a :class:`UserError`)."""
    from ..device import resolve_device

    device = resolve_device(getattr(args, "device", "cpu"))
    torch.manual_seed(0)
    B, N, D = args.batch, args.tokens, args.dim
    x = torch.randn(B, N, D).to(device)
    pe, w, b = (t.to(device) for t in (torch.randn(N, D), torch.randn(D), torch.randn(D)))
    ref = LN.reference_layer_norm_add(x.double(), pe.double(), w.double(), b.double())
    ref_pool = LN.reference_layer_norm_pool(x.double(), w.double(), b.double(), pe.double())
    usable = backends.available_backends(x.device)
    where = "CPU" if device.type == "cpu" else str(device)
    print(f"mpvg demo: x [{B}, {N}, {D}] float32 on {where}, threads={torch.get_num_threads()}")
    print(f"{'backend':8s} {'op':16s} {'max err vs fp64':>16s} {'median ms':>10s}")
    for name in usable:
        with backends.use_backend(name):
            for label, fn, r in (
                ("layer_norm_add", lambda: ops.layer_norm_add(x, pe, w, b), ref),
                ("layer_norm_pool", lambda: ops.layer_norm_pool(x, w, b, pe), ref_pool),
            ):
                err = (fn().double() - r).abs().max().item()
                t = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median
                print(f"{name:8s} {label:16s} {err:16.3e} {t * 1e3:10.3f}")
    return 0
