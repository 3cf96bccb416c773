"""mpvg_kernels.layers.pe_cache: the global optimizer step hook is registered only once a PE cache stores a value."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import copy

    import torch
    from torch.optim.optimizer import _global_optimizer_post_hooks as hooks

    import mpvg_kernels
    from mpvg_kernels import models
    from mpvg_kernels.layers import optimizer_step_count

    assert not hooks, f"import registered {len(hooks)} global optimizer hooks"
    torch.manual_seed(0)
    model = models.create_model("vit_digits", pe="mpvg", num_classes=10)
    x = torch.randn(2, *model.default_cfg["input_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(x).sum().backward()  # training forward: grad mode, no cache
    opt.step()
    assert not hooks, "building and training a model registered a global optimizer hook"
    assert optimizer_step_count() == 0

    model.eval()
    with torch.inference_mode():
        before = model(x)
        assert torch.equal(model(x), before)  # served from the cache
    assert len(hooks) == 1, f"{len(hooks)} hooks after a cached inference"
    steps = optimizer_step_count()
    model.train()
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()  # fused: no version bump on the parameters
    assert optimizer_step_count() == steps + 1
    model.eval()
    with torch.inference_mode():
        after = model(x)
        fresh = copy.deepcopy(model)(x)  # copies start with an empty cache
    assert not torch.equal(after, before), "the fused step did not change the output"
    assert torch.equal(after, fresh), "stale PE cache after a fused optimizer step"
    assert len(hooks) == 1
    print("ok")
""")


def test_import_registers_no_optimizer_hook_until_a_cache_fills() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout[-2000:] + proc.stderr[-3000:]
