"""A weighted mixture of sources, streamed: each sample comes from a source drawn by weight.

Map-style sources are read in a random order per pass (split over ranks and workers), iterable
sources as they stream; every source restarts when it runs out, and the mixture's epoch has a
fixed number of samples per rank (`epoch_length`), so ranks stay in step.
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
                    yield source[i]
            if not produced:
                raise RuntimeError(
                    f"mixture source {k} gives rank {rank} worker {worker} no samples (fewer shards or "
                    "records than ranks x workers): use resampled shards or fewer workers"
                )

    def __iter__(self) -> Iterator[Any]:
        rank, world = rank_and_world()
        worker, workers = worker_and_count()
        rng = random.Random(((self.seed * 1_000_003 + self.epoch) * 1009 + rank) * 1009 + worker)
        streams = [self._cycle(k, rank, world, worker, workers) for k in range(len(self.sources))]
        for _ in range(quota(self.epoch_length, worker, workers)):
            (stream,) = rng.choices(streams, weights=self.weights)
            yield next(stream)
