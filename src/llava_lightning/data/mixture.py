"""A weighted mixture of sources, streamed: each sample comes from a source drawn by weight.

Map-style sources are read in a random order per pass (split over ranks and workers), iterable
sources as they stream; every source restarts when it runs out, and the mixture's epoch has a
fixed number of samples per rank (`epoch_length`), so ranks stay in step.

A mixture of map-style sources is resumable mid-epoch: the draws depend only on (seed, epoch, rank,
worker), so `resume(batches, batch_size)` fast-forwards each worker past the samples of the batches
already consumed, drawing indices without reading the records.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from torch.utils.data import Dataset, IterableDataset

from .splitting import quota, rank_and_world, worker_and_count


class WeightedMixture(IterableDataset):
    """Draws from `sources` with probabilities proportional to `weights`."""

    def __init__(
        self, sources: list[Dataset | IterableDataset], weights: list[float], epoch_length: int, seed: int = 0
    ):
        if len(sources) != len(weights) or not sources:
            raise ValueError("a mixture needs one weight per source and at least one source")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        self.sources, self.weights = sources, [float(w) for w in weights]
        self.epoch_length, self.seed, self.epoch = epoch_length, seed, 0
        self._resume: tuple[int, int] | None = None

    @property
    def resumable(self) -> bool:
        """Only map-style sources can be fast-forwarded without reading them."""
        return not any(isinstance(source, IterableDataset) for source in self.sources)

    def resume(self, batches: int, batch_size: int) -> None:
        """Make the next pass start after `batches` batches of `batch_size` (one pass only; 0: from
        the start of the epoch, which drops a position set before)."""
        if not self.resumable:
            raise ValueError("a mixture with streamed (iterable) sources cannot resume mid-epoch")
        self._resume = (batches, batch_size) if batches > 0 else None

    def _skip(self, worker: int, workers: int) -> int:
        """Samples this worker already delivered: DataLoader takes batches from workers in turn."""
        if self._resume is None:
            return 0
        batches, batch_size = self._resume
        mine = max(0, -(-(batches - worker) // workers))  # batches b < `batches` with b % workers == worker
        return mine * batch_size

    def __len__(self) -> int:
        return self.epoch_length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for source in self.sources:
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)

    def _cycle(self, k: int, rank: int, world: int, worker: int, workers: int) -> Iterator[Any]:
        source = self.sources[k]
        for n_pass in range(1 << 62):
            produced = 0
            if isinstance(source, IterableDataset):
                for produced, item in enumerate(source, 1):  # noqa: B007
                    yield item
            else:
                # One permutation shared by all ranks and workers (seeded without them), then split.
                order = list(range(len(source)))
                random.Random(((self.seed * 1_000_003 + self.epoch) * 1009 + k) * 1009 + n_pass).shuffle(
                    order
                )
                for produced, i in enumerate(order[rank::world][worker::workers], 1):  # noqa: B007
                    yield i  # an index: __iter__ reads it unless fast-forwarding
            if not produced:
                raise RuntimeError(
                    f"mixture source {k} gives rank {rank} worker {worker} no samples (fewer shards or "
                    "records than ranks x workers): use resampled shards or fewer workers"
                )

    def __iter__(self) -> Iterator[Any]:
        rank, world = rank_and_world()
        worker, workers = worker_and_count()
        if self._resume is not None:
            # DataLoader takes the first batch of a pass from worker 0, but the next batch due belongs
            # to worker `batches % workers`: each worker plays the part of that one, shifted.
            worker = (worker + self._resume[0]) % workers
        rng = random.Random(((self.seed * 1_000_003 + self.epoch) * 1009 + rank) * 1009 + worker)
        streams = [self._cycle(k, rank, world, worker, workers) for k in range(len(self.sources))]
        skip, self._resume = self._skip(worker, workers), None  # an offset applies to one pass only
        for n in range(quota(self.epoch_length, worker, workers)):
            (k,) = rng.choices(range(len(streams)), weights=self.weights)
            value = next(streams[k])
            if n < skip:
                continue
            source = self.sources[k]
            yield value if isinstance(source, IterableDataset) else source[value]
