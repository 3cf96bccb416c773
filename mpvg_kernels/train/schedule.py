"""Per-step learning-rate schedule: linear warmup, cosine decay, optional cooldown at the minimum."""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Sets the learning rate of every param group of ``optimizer`` before each step.

    Steps 0..W-1 ramp linearly from ``warmup_lr`` to ``peak_lr``; steps W..T-C-1 follow a half cosine from
    ``peak_lr`` to ``min_lr``; the last C steps (cooldown) stay at ``min_lr``. W, C and T are counted in optimizer
    steps (epochs x steps per epoch). The only state is the step counter, so :meth:`state_dict` is a plain dict.
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
        self.optimizer = optimizer
        self.peak_lr, self.warmup_lr, self.min_lr = peak_lr, warmup_lr, min_lr
        self.total_steps, self.warmup_steps, self.cooldown_steps = total_steps, warmup_steps, cooldown_steps
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate used by optimizer step number ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps - self.cooldown_steps)
        t = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        """Advance one optimizer step and set the next learning rate."""
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        return self.lr_at(self.step_count)

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
