"""Per-step learning-rate schedule: linear warmup, cosine decay, optional cooldown at the minimum."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """A ``torch.optim.lr_scheduler.LRScheduler`` stepped once per optimizer step.

    Steps 0..W-1 ramp linearly from ``warmup_lr`` to ``peak_lr``; steps W..T-C-1 follow a half cosine from
    ``peak_lr`` to ``min_lr``; the last C steps (cooldown) stay at ``min_lr``. W, C and T are counted in optimizer
    steps (epochs x steps per epoch). A param group's ``lr_scale`` (default 1) multiplies its learning rate.

    The learning rate is computed in closed form from the step counter (``last_epoch``), never as a product of
    per-step factors, so it is the same float at a step whether reached by stepping or by loading a state dict.
    (torch's chainable ``LinearLR`` + ``CosineAnnealingLR`` in a ``SequentialLR``, or a ``LambdaLR`` scaling the
    optimizer's initial lr, give the same schedule only up to float rounding.) :meth:`get_last_lr` returns one
    learning rate per param group, like every torch scheduler: the ones the next optimizer step will use.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        cooldown_steps: int = 0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
    ) -> None:
        self.peak_lr, self.warmup_lr, self.min_lr = peak_lr, warmup_lr, min_lr
        self.total_steps, self.warmup_steps, self.cooldown_steps = total_steps, warmup_steps, cooldown_steps
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        """The learning rate used by optimizer step number ``step`` (0-based), before ``lr_scale``."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps - self.cooldown_steps)
        t = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        lr = self.lr_at(self.last_epoch)
        return [lr * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]

    _get_closed_form_lr = get_lr

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far (the index of the next step)."""
        return self.last_epoch

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counter and set the optimizer's learning rates to that step's.

        Also reads the ``{"step_count": n}`` state written before this class was a torch scheduler.
        """
        state = dict(state_dict)
        if "last_epoch" not in state and "step_count" in state:
            state = {"last_epoch": int(state.pop("step_count"))}
        super().load_state_dict(state)
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]
