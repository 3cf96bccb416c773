"""``torchrun`` set-up (DistributedDataParallel; gloo on CPU, NCCL on GPU) and the samplers.

Under ``torchrun`` the environment carries RANK, WORLD_SIZE and LOCAL_RANK; without it the run is a single
process (world size 1) and nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..device import resolve_device  # noqa: F401 - re-exported (the device of every command)


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, local rank, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def setup(device_spec: str = "auto") -> DistInfo:
    """Initialise the process group when launched by ``torchrun`` (WORLD_SIZE > 1) and pick the device.

    On CPU each process gets ``max(1, usable CPUs // local_world_size)`` intra-op threads so that ranks on one
    machine do not oversubscribe its cores.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kw: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend=backend, **kw)
            info.initialized_here = True
        if device.type == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, usable_cpus() // local_world))
    return info


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over ranks (float64, on the training device)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class ShardedSampler(Sampler[int]):
    """Data order for training: one seeded permutation per epoch, split over ranks.

    The permutation depends only on ``(seed, epoch)``, so a resumed run sees the same order. Rank ``r`` takes
    positions ``r, r + W, r + 2W, ...`` of the (padded) permutation, exactly like ``DistributedSampler``. Hence with
    per-rank batch ``b`` and ``drop_last`` batching, global batch ``i`` of a W-process run holds the same images as
    batch ``i`` of a single-process run with batch ``W x b``.

    ``repeats > 1`` is DeiT's repeated augmentation: each index appears ``repeats`` times in a row before the
    split, and every rank keeps ``floor(n / W)`` indices, so an epoch keeps its length.
    """

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 repeats: int = 1) -> None:
        self.n, self.world, self.rank, self.seed = n, world_size, rank, seed
        self.shuffle, self.repeats = shuffle, repeats
        self.epoch = 0
        if repeats > 1:
            self.num_samples = n // world_size
        else:
            self.num_samples = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
        total = math.ceil(len(order) / self.world) * self.world
        if total > len(order):
            order = torch.cat([order, order[: total - len(order)]])
        mine = order[self.rank : total : self.world][: self.num_samples]
        return iter(mine.tolist())

    def __len__(self) -> int:
        return self.num_samples


class EvalShardSampler(Sampler[int]):
    """Held-out order: indices ``rank, rank + W, ...`` with no padding, so summed counts are exact."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
