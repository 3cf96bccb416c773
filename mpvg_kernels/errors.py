"""The error type for mistakes in the user's input; every layer of the package may raise it."""

from __future__ import annotations

__all__ = ["UnsupportedPoolError", "UserError"]


class UserError(Exception):
    """An error caused by the user's input (missing data, bad option, corrupt checkpoint).

    The ``mpvg`` command prints its message without a traceback and exits with status 2.
    """


class UnsupportedPoolError(ValueError, AssertionError):
    """A ``global_pool`` (timm's name of the pooling) the model cannot do, e.g. ``catavgmax``.

    A ValueError like every bad argument here, and an AssertionError as well: timm's models assert on an unsupported
    ``global_pool``, and timm's helpers and tests catch that to skip a pooling a model does not take.
    """
