"""mpvg_kernels.layers.pe_cache: the global optimizer step hook is registered only once a PE cache stores a value;
module_state (the cache key) sees every kind of change a forward could see."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from torch import nn

from mpvg_kernels.layers.pe_cache import PECache, module_state

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


def test_module_state_sees_every_kind_of_change() -> None:
    """module_state (the PE cache key): equal while nothing changed; different after any change a forward could see."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.table = torch.zeros(2)  # a tensor held as a plain attribute
            self.sizes = [1, 2]
            self.walk = type("Walk", (), {})()
            self.walk.hierarchical = True

    m = Holder()

    def key() -> tuple:
        tensors, state = module_state([m, m.norm])
        return PECache._signature(tuple(tensors), state)

    changes = {
        "eps": lambda: setattr(m.norm, "eps", 0.1),
        "elementwise_affine": lambda: setattr(m.norm, "elementwise_affine", False),
        "training": lambda: m.eval(),
        "weight edited": lambda: m.norm.weight.detach().add_(1),  # detach shares the version counter
        "weight replaced": lambda: setattr(m.norm, "weight", nn.Parameter(torch.ones(4))),
        "child swapped": lambda: setattr(m, "norm", nn.LayerNorm(4)),
        "forward hook": lambda: m.norm.register_forward_hook(lambda mod, args, out: out),
        "tensor attribute edited": lambda: m.table.add_(1),
        "list edited in place": lambda: m.sizes.append(3),
        "walk edited in place": lambda: setattr(m.walk, "hierarchical", False),
        "new attribute": lambda: setattr(m.norm, "extra", 1),
    }
    for what, change in changes.items():
        before = key()
        assert key() == before, "the key changed although nothing did"
        change()
        assert key() != before, f"the key missed: {what}"
