"""Who reads what: rank / worker identity, shard assignment and per-worker sample quotas."""

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
