"""Helpers for tests that feed the ``mpvg`` CLI untrusted input: an address-space cap (a huge allocation fails at
once instead of swapping, and shows as an error other than the expected one-line refusal), a snapshot of a folder
(to check that a refused command changed nothing on disk), the one-line-error check."""

from __future__ import annotations

import contextlib
import hashlib
import resource
from collections.abc import Iterator
from pathlib import Path

from mpvg_kernels import cli

#: Address space a command may add to the test process's (far below what any bad size in the tests would take).
EXTRA_ADDRESS_SPACE = 3 << 30


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def address_space_cap(extra: int = EXTRA_ADDRESS_SPACE) -> Iterator[None]:
    """Cap this process's address space at its current size + ``extra`` (soft limit; restored on exit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``mpvg ARGV`` in-process under :func:`address_space_cap`: (exit status, stdout, stderr)."""
    capsys.readouterr()
    with address_space_cap():
        rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line_error(err: str, cmd: str) -> str:
    """The single ``mpvg CMD: error: ...`` line of ``err`` (asserts there is exactly one line and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mpvg {cmd}: error: ") and "Traceback" not in err, err
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root`` (hidden ones included): relative path -> (kind, size, SHA-256 of a file)."""
    out: dict[str, tuple[str, int, str]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", 0, str(p.readlink()))
        elif p.is_dir():
            out[rel] = ("dir", 0, "")
        else:
            out[rel] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out
