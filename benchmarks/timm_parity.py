"""Parity of ``from_timm(model)`` (pe='default') with the timm model it came from: max |difference| of the logits,
of the input gradient and of every parameter gradient (fp32, CPU, train mode without dropout, random weights),
plus the inference path (eval, no_grad: PE cache and fused pooled last step). Where a difference exceeds 1e-5, the
tensor is also compared with timm's model run in float64, to show which fp32 result is closer to exact. Needs timm.

python benchmarks/timm_parity.py              # full-size DeiT-Ti / DeiT-S (cls, GAP + fc_norm, GAP + norm) and ViT-S
python benchmarks/timm_parity.py --quick      # 64x64 inputs (a few seconds)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, also when one is installed

import torch  # noqa: E402

CASES = [
    ("deit_tiny_patch16_224", {}, "cls token, norm"),
    ("deit_tiny_patch16_224", {"global_pool": "avg"}, "GAP, cls token kept, fc_norm after pooling"),
    ("deit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": False}, "GAP, norm before"),
    ("deit_small_patch16_224", {}, "cls token, norm"),
    ("deit_small_patch16_224", {"global_pool": "avg"}, "GAP, cls token kept, fc_norm after pooling"),
    ("deit_small_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": False}, "GAP, norm before"),
    ("vit_small_patch16_224", {}, "cls token, norm"),
]


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64x64 inputs instead of 224x224")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    import timm

    from mpvg_kernels.models import from_timm

    print(f"torch {torch.__version__}, timm {timm.__version__}, fp32 CPU, batch {args.batch}, threads "
          f"{torch.get_num_threads()}")
    print("| timm model | placement | img | logits | d input | d params (max) | worst param | eval logits | s |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    notes = []
    worst = 0.0
    for name, kw, what in CASES:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        kw = {**kw, "img_size": 64} if args.quick else kw
        src = timm.create_model(name, num_classes=1000, **kw)
        ours = from_timm(src)
        size = src.patch_embed.img_size[0]
        x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        src.train()
        ours.train()
        a, ga, pa = _run(src, x)
        b, gb, pb = _run(ours, x)
        d_out = (a - b).abs().max().item()
        d_in = (ga - gb).abs().max().item()
        d_par, k_par = max(((pa[k] - pb[k]).abs().max().item(), k) for k in pa)
        with torch.no_grad():
            d_eval = (src.eval()(x) - ours.eval()(x)).abs().max().item()
        worst = max(worst, d_out, d_in, d_par, d_eval)
        where = f"`{k_par}`" if d_par else "-"
        print(f"| {name} | {what} | {size} | {d_out:.2e} | {d_in:.2e} | {d_par:.2e} | {where} | {d_eval:.2e} | "
              f"{time.perf_counter() - t0:.1f} |")
        if d_par > 1e-5:
            src.train().double()
            _, _, p64 = _run(src, x.double())
            ref = p64[k_par]
            notes.append(
                f"{name} ({what}) `{k_par}`: max |grad| {ref.abs().max().item():.3g}; vs float64 timm: timm fp32 "
                f"{(pa[k_par].double() - ref).abs().max().item():.2e}, from_timm fp32 "
                f"{(pb[k_par].double() - ref).abs().max().item():.2e}"
            )
    print(f"\nworst max |difference|: {worst:.2e} ({'within' if worst <= 1e-5 else 'above'} 1e-5)")
    for n in notes:
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
