"""Captured inference (CUDA graphs) and the PE cache: the rule that keeps a replay from using a stale model.

A CUDA graph records the addresses it reads and the scalars of the kernels it launches, so a graph captured from a
model's cached inference path bakes in the PE terms of capture time (the chain LN'_l(pos), the last PE term, the
pooled bias), every parameter's address and every attribute the forward read (``eps``, the knobs, which module
sits where). Replaying it after any of these changed would silently answer for the old model.

The rule (:class:`CapturedInference`):

- **Keyed on the whole model.** The capture records the model's state as the PE cache keys on it
  (:func:`~mpvg_kernels.layers.pe_cache.module_state`, here of every module, not only the PE path): every
  parameter and buffer (address, autograd version, dtype, device, shape), every other module attribute (floats
  such as ``eps``, bools, ints, tuples, the walk, which submodule sits where, forward hooks) and the
  optimizer-step counter. Every call compares it with the current state first. If it changed, the graph is
  captured again from the current model (``on_change="recapture"``, the default) or the call raises
  (``on_change="raise"``), never a stale replay. Writes that bypass autograd's version counter (``p.data.add_()``)
  are invisible to it, as to the PE cache: call :meth:`CapturedInference.invalidate` after those.
- **Always eval mode.** Every call (and the capture in the constructor) runs the model in eval mode, whatever mode
  the caller left it in, and gives each module its own mode back afterwards: a captured call is inference (no
  dropout, no stochastic depth, BatchNorm running statistics), also between the steps of a training loop that
  keeps the model in train mode.

On CUDA the call replays a ``torch.cuda.CUDAGraph`` for one static input shape; elsewhere (CPU) it runs the same
frozen-terms forward eagerly, so the rule is the same and testable without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..layers.pe_cache import PECache, module_state, watch_optimizer_steps

__all__ = ["CapturedInference"]


class CapturedInference:
    """``model.eval()(x)`` for inference at one input shape, dtype and device, replayed from a capture that is
    redone whenever anything in the model changed (see the module doc).

    ``model`` must have ``compute_pe_terms`` and ``forward(x, pe_terms=...)``; its train/eval modes are left as
    they are. ``example``: an input of the shape, dtype and device every call will have. ``warmup``: eager calls
    before a CUDA capture. ``on_change``: ``recapture`` or ``raise`` when the model changed since the capture.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, on_change: str = "recapture", warmup: int = 2) -> None:
        if on_change not in ("recapture", "raise"):
            raise ValueError(f"on_change must be 'recapture' or 'raise', got {on_change!r}")
        self.model = model
        self.on_change = on_change
        self.warmup = int(warmup)
        self.shape = tuple(example.shape)
        self._static_x = example.detach().clone()
        self._skip = getattr(model, "_NOT_PE_STATE", frozenset({"_pe_cache"}))
        self._captured = PECache()  # the capture's run function, keyed on the model's state
        with self._eval_mode():
            self._current_run()

    @property
    def captures(self) -> int:
        """How many times the model was captured."""
        return self._captured.misses

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Every module in eval mode inside; each module's own mode restored after."""
        modes = [(m, m.training) for m in self.model.modules()]
        if any(training for _, training in modes):
            self.model.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    def _state(self) -> tuple[list[torch.Tensor], Any]:
        watch_optimizer_steps()  # fused optimizers do not bump versions: count their steps from now on
        return module_state(self.model.modules(), skip=self._skip)

    def _capture(self) -> Callable[[], torch.Tensor]:
        model, x = self.model, self._static_x
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

            return run

        def run_eager() -> torch.Tensor:
            return model(x, pe_terms=terms)

        return run_eager

    def _current_run(self) -> Callable[[], torch.Tensor]:
        """The run function of a capture of the model as it is now (captured here if it changed)."""
        tensors, state = self._state()
        if self.on_change == "raise" and self._captured.filled and not self._captured.holds(tensors, state):
            raise RuntimeError(
                "the model changed since the capture (parameters or attributes); replaying would use "
                "stale PE terms and a stale graph: capture again (or use on_change='recapture')"
            )
        return self._captured.get(tensors, self._capture, extra=state)

    def invalidate(self) -> None:
        """Force a new capture at the next call (after writes the version counters cannot see)."""
        self._captured.clear()

    @property
    def stale(self) -> bool:
        """Whether the model changed since the capture (the next call captures again, or raises)."""
        with self._eval_mode():
            return not self._captured.holds(*self._state())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` (same shape, dtype and device as the example), computed in eval mode."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"this capture serves inputs of shape {self.shape}, got {tuple(x.shape)}")
        ref = self._static_x
        if x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(
                f"this capture serves inputs of dtype {ref.dtype} on device {ref.device}, got dtype "
                f"{x.dtype} on {x.device}"
            )
        with self._eval_mode():
            run = self._current_run()
            with torch.no_grad():
                self._static_x.copy_(x)
                return run()
