"""JSONL metrics and the training-curve PNG."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError


class JsonlLog:
    """Appends one JSON object per line to ``path``.

    On resume after epoch ``k``, :meth:`truncate_after` drops records of later epochs (written by a run that went
    on past its last checkpoint), so the file always matches the checkpoint it continues from.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line and flush it to disk."""
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All records (an empty list when the file does not exist).

        A partial last line (a write cut short by a kill) is dropped with a warning; an unreadable line anywhere
        else is a :class:`UserError` naming the file and line."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.splitlines()
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1 and not text.endswith("\n"):
                    print(f"warning: {self.path}: dropped a partial last line (a write was cut short)",
                          file=sys.stderr)
                    break
                raise UserError(f"{self.path} line {i + 1} is not JSON: {line[:80]!r}") from None
        return records

    def truncate_after(self, epoch: int) -> None:
        """Keep only records with ``record["epoch"] <= epoch``."""
        kept = [r for r in self.read() if r.get("epoch", 0) <= epoch]
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Draw loss, accuracy and learning rate per epoch from the JSONL ``records`` into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None and not _nan(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    # With EMA on, the trainer logs the EMA weights' results as eval_loss/top1/top5 and the trained weights' as
    # eval_loss_raw/top1_raw/top5_raw.
    ema = any(r.get("eval_loss_raw") is not None for r in records)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    for key, label in (("train_loss", "train"), ("eval_loss", "held-out (EMA)" if ema else "held-out"),
                       ("eval_loss_raw", "held-out (raw weights)")):
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax = axes[1]
    suffix = " (EMA)" if ema else ""
    for key, label in (("top1", "top-1" + suffix), ("top5", "top-5" + suffix), ("top1_raw", "top-1 (raw weights)")):
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend()
    ax = axes[2]
    xs, ys = series("lr")
    ax.plot(xs, ys, marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate (end of epoch)")
    if title:
        fig.suptitle(title)
    if epochs:
        for a in axes:
            a.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)
