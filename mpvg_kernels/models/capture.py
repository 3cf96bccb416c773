"""Captured inference (CUDA graphs) and the PE cache: the rule that keeps a replay from using stale PE terms.

A CUDA graph records the addresses it reads, so a graph captured from a model's cached inference path bakes in
the PE terms of capture time (the chain LN'_l(pos), the last PE term, the pooled bias). Replaying it after the PE
parameters changed (an optimizer step, ``load_state_dict``, an in-place edit) would silently use the old terms.

The rule (:class:`CapturedInference`): the capture records the signature of every tensor the PE terms are computed
from (address, autograd version, dtype, device, shape; plus the optimizer-step counter, as the PE cache keys on);
every call compares it with the current one first. If it changed, the graph is captured again from the current
parameters (``on_change="recapture"``, the default) or the call raises (``on_change="raise"``), never a stale
replay. Writes that bypass autograd's version counter (``p.data.add_()``) are invisible to it, as to the PE cache:
call :meth:`CapturedInference.invalidate` after those.

On CUDA the call replays a ``torch.cuda.CUDAGraph`` for one static input shape; elsewhere (CPU) it runs the same
frozen-terms forward eagerly, so the rule is the same and testable without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..layers.pe_cache import PECache, watch_optimizer_steps

__all__ = ["CapturedInference"]


class CapturedInference:
    """``model(x)`` for inference at one input shape, with the PE terms frozen at capture (see the module doc).

    ``model`` must have ``compute_pe_terms`` and ``forward(x, pe_terms=...)`` and is put in eval mode.
    ``example``: an input of the shape every call will have. ``warmup``: eager calls before a CUDA capture.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, on_change: str = "recapture", warmup: int = 2) -> None:
        if on_change not in ("recapture", "raise"):
            raise ValueError(f"on_change must be 'recapture' or 'raise', got {on_change!r}")
        self.model = model.eval()
        self.on_change = on_change
        self.warmup = int(warmup)
        self.shape = tuple(example.shape)
        self.captures = 0
        self._static_x = example.detach().clone()
        self._signature: Any = None
        self._run: Callable[[], torch.Tensor] | None = None
        self._capture()

    def _pe_signature(self) -> Any:
        watch_optimizer_steps()  # fused optimizers do not bump versions: count their steps from now on
        return PECache._signature(tuple(self.model._pe_tensors()), None)

    def _capture(self) -> None:
        model, x = self.model, self._static_x
        with torch.no_grad():
            terms = model.compute_pe_terms()
            if x.is_cuda:
                stream = torch.cuda.Stream(device=x.device)
                stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(stream):
                    for _ in range(self.warmup):
                        model(x, pe_terms=terms)
                torch.cuda.current_stream(x.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = model(x, pe_terms=terms)

                def run() -> torch.Tensor:
                    graph.replay()
                    return out.clone()
            else:

                def run() -> torch.Tensor:
                    return model(x, pe_terms=terms)

        self._terms, self._run = terms, run
        self._signature = self._pe_signature()
        self.captures += 1

    def invalidate(self) -> None:
        """Force a new capture at the next call (after writes the version counters cannot see)."""
        self._signature = None

    @property
    def stale(self) -> bool:
        """Whether the PE parameters changed since the capture."""
        sig = self._pe_signature()
        return sig is None or sig != self._signature

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` (same shape, dtype and device as the example)."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"this capture serves inputs of shape {self.shape}, got {tuple(x.shape)}")
        if self.stale:
            if self.on_change == "raise":
                raise RuntimeError("the model's PE parameters changed since the capture; replaying would use stale "
                                   "PE terms: capture again (or use on_change='recapture')")
            self._capture()
        assert self._run is not None
        with torch.no_grad():
            self._static_x.copy_(x)
            return self._run()
