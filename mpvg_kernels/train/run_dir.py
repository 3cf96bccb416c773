"""The output folder of a training run: one run per folder, never a silent overwrite, no stale results.

- :func:`check_out_dir`: ``--out`` must be a folder (or not exist); a folder that already holds a run (finished or
  not) is refused unless ``overwrite`` (start again) or ``resume`` (continue) is asked for.
- :class:`RunLock`: an exclusive ``fcntl.flock`` on ``OUT/.mpvg-train.lock`` held for the whole run, so a second
  ``mpvg train`` on the same folder is refused with the first one's pid; the operating system releases it when the
  process ends, however it ends (a lock left by a killed run never blocks the next one).
- :func:`clear_run_files`: with ``overwrite``, the previous run's files are deleted before the new run writes
  anything, so an interrupted new run never shows the old run's results.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ..errors import UserError

#: Files a run writes into its folder (besides the lock).
RUN_FILES = ("checkpoint.pt", "checkpoint.pt.tmp", "metrics.jsonl", "summary.json", "curves.png", "config.yaml")
LOCK_NAME = ".mpvg-train.lock"


def existing_run_files(out: Path) -> list[str]:
    """The run files present in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_out_dir(out: Path) -> None:
    """``out`` must be a folder or not exist yet (a symbolic link to a missing folder is neither)."""
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out} is a dangling symbolic link (to {os.readlink(out)}): remove it or pass a folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pass a folder for the run's outputs")


def refuse_existing_run(out: Path, finished: bool | None) -> None:
    """Raise the error for a folder that already holds a run (``finished``: None when unknown)."""
    what = {True: "a finished", False: "an unfinished", None: "a"}[finished]
    files = ", ".join(existing_run_files(out))
    raise UserError(f"{out} already holds {what} run ({files}); pass --overwrite to replace it"
                    + ("" if finished else " or --resume to continue it") + ", or choose another --out")


def clear_run_files(out: Path) -> list[str]:
    """Delete the previous run's files from ``out``; returns their names."""
    removed = existing_run_files(out)
    for name in removed:
        (out / name).unlink()
    return removed


class RunLock:
    """Exclusive lock on a run folder for the life of this process (see the module docstring)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise a :class:`UserError` naming the process that holds it."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.out} is in use by another mpvg train ({holder}); one run per folder: wait for "
                            "it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Drop the lock (``remove``: also delete the lock file, e.g. before removing an empty folder)."""
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None
