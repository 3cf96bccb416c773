"""Exponential moving average of a model's weights (parameters and buffers), on ``torch.optim.swa_utils``."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class ModelEma:
    """Keeps ``self.module``, a copy of ``model`` whose float tensors track ``ema = d * ema + (1 - d) * w``.

    The averaging is torch's :class:`~torch.optim.swa_utils.AveragedModel` (``use_buffers=True``) with
    :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`; this class adds what those lack:

    - the decay warmup: with ``warmup=True`` the decay at update ``k`` is ``min(decay, (1 + k) / (10 + k))`` so
      that short runs are not dominated by the random initialisation (``get_ema_multi_avg_fn`` takes one fixed
      decay, so it is built per update);
    - the start: the average starts from ``model``'s weights at construction, and the first :meth:`update`
      already averages (AveragedModel would overwrite the copy with the weights of the first update), so the
      copy taken here is counted as the first averaged model (``n_averaged = 1``);
    - non-float buffers are copied from the model, not averaged (``get_ema_multi_avg_fn`` would compute
      ``e * d + w * (1 - d)`` on them);
    - a checkpoint entry ``{"updates", "state_dict"}`` whose ``state_dict`` is the plain model's (no ``module.``
      prefix), so ``model_from_checkpoint(..., weights="ema")`` loads it into a freshly built model.

    Updates are in-place on the copy's tensors, which bumps their version counters, so the model's inference PE
    cache never serves stale values.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.n_averaged.fill_(1)  # the copy of ``model`` is the first averaged model
        self.updates = 0
        self.module = self.averaged.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    def _average(self, ema: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        # One call per (device, dtype) group of AveragedModel.update_parameters; ``self.updates`` is advanced after
        # all groups, so every group of one update uses the same decay.
        if ema[0].is_floating_point() or ema[0].is_complex():
            get_ema_multi_avg_fn(self.current_decay())(ema, current, n_averaged)
        else:
            torch._foreach_copy_(ema, current)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self) -> dict[str, object]:
        sd = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        return {"updates": self.updates, "state_dict": sd}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.updates = int(state["updates"])  # type: ignore[arg-type]
        self.module.load_state_dict(state["state_dict"])  # type: ignore[arg-type]
        self.averaged.n_averaged.fill_(1 + self.updates)
