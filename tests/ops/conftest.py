"""Shared helpers of the op tests."""

from __future__ import annotations

import pytest
from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """A dispatch mode that records the name of every op it sees (and, being a mode, sends the public ops down their
    registered route)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_log() -> type[OpLog]:
    """The :class:`OpLog` mode class: ``with op_log() as log: ...; log.ops``."""
    return OpLog
