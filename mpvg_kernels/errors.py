"""The error type for mistakes in the user's input; every layer of the package may raise it."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error caused by the user's input (missing data, bad option, corrupt checkpoint).

    The ``mpvg`` command prints its message without a traceback and exits with status 2.
    """
