"""Exponential moving average of a model's weights (parameters and floating-point buffers)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """Keeps ``self.module``, a copy of ``model`` whose float tensors track ``ema = d * ema + (1 - d) * w``.

    With ``warmup=True`` the decay at update ``k`` is ``min(decay, (1 + k) / (10 + k))`` so that short runs are
    not dominated by the random initialisation. Updates are in-place on the copy's tensors, which bumps their
    version counters, so the model's inference PE cache never serves stale values. Non-float buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        d = self.current_decay()
        self.updates += 1
        ema_float, model_float = [], []
        src = model.state_dict()
        for name, e in self.module.state_dict().items():
            w = src[name]
            if e.is_floating_point():
                ema_float.append(e)
                model_float.append(w.detach().to(e.dtype))
            else:
                e.copy_(w)
        if ema_float:
            torch._foreach_lerp_(ema_float, model_float, 1.0 - d)

    def state_dict(self) -> dict[str, object]:
        sd = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        return {"updates": self.updates, "state_dict": sd}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.updates = int(state["updates"])  # type: ignore[arg-type]
        self.module.load_state_dict(state["state_dict"])  # type: ignore[arg-type]
