"""Faults in distributed training: one rank of a 2-process `torchrun` job is killed mid-epoch. The job must end
within a bounded time with a one-line message naming the intact checkpoint, the checkpoint must load, and
`--resume` must end with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mpvg_kernels.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ARGS = ["--batch-size", "32", "--epochs", "3", "--warmup-epochs", "1", "--no-augment", "--no-progress",
        "--threads", "1", "--set", "model_kwargs.depth=2"]
BOUND_S = 60  # the job must be gone this long after the kill


def _torchrun() -> str:
    return shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


def _launch(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [_torchrun(), "--standalone", "--nproc_per_node=2", "-m", "mpvg_kernels", "train", "--out", str(out),
           *ARGS, *extra]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in env:
            return int(d)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc (Linux)")
def test_killed_rank_stops_the_job_and_resume_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    job = _launch(out)
    deadline = time.time() + 600
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # epoch 1 is logged and checkpointed
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.2)
    time.sleep(1.0)  # into epoch 2
    pid = _rank_pid(job.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    stdout, stderr = job.communicate(timeout=BOUND_S)
    assert time.time() - killed < BOUND_S
    assert job.returncode != 0
    lines = [ln for ln in (stdout + stderr).splitlines() if ln.startswith("mpvg train: error:")]
    assert lines and "stopped" in lines[0] and "checkpoint of epoch" in lines[0] and "--resume" in lines[0], (
        stdout, stderr)

    ck = load_checkpoint(out / "checkpoint.pt")
    assert 1 <= ck["epoch"] < 3

    resumed = _launch(out, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    full = _launch(tmp_path / "full")
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err
    a = load_checkpoint(out / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
