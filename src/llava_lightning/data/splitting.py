"""Who reads what: rank / worker identity, per-worker sample quotas and batch-aligned worker ranges."""

from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_and_count() -> tuple[int, int]:
    """(worker id, number of workers) of this DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def quota(total: int, part: int, parts: int) -> int:
    """How many of `total` items part `part` of `parts` takes so that the parts add up exactly."""
    return total // parts + (1 if part < total % parts else 0)


def worker_range(total: int, worker: int, workers: int, batch_size: int = 1) -> tuple[int, int]:
    """Slots [start, stop) of `total` that worker `worker` of `workers` reads, in whole batches.

    The `ceil(total / batch_size)` batches are split into contiguous runs (`quota` batches each) and
    only the very last batch may be partial, so a DataLoader with that batch size yields exactly
    `ceil(total / batch_size)` batches for any number of workers: its length, as Lightning counts it.
    """
    batches = -(-total // batch_size)
    first = worker * (batches // workers) + min(worker, batches % workers)
    last = first + quota(batches, worker, workers)
    return min(first * batch_size, total), min(last * batch_size, total)
