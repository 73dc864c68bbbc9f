"""Resumable, rank-aware sampling for map-style data (instruction JSON).

`EpochSampler` draws one permutation per epoch from (seed, epoch), shared by all ranks, and deals it
out to the ranks in turn (rank r takes positions r, r + world, ...). Every rank gets
`ceil(N / world)` positions, so all ranks run the same number of steps; the
`world * ceil(N / world) - N` positions past the end are `PAD` (None), which the dataset turns into
a counted `padding` skip, so every sample is read exactly once per epoch (`DistributedSampler`
repeats samples instead). `ResumableDataLoader` counts the batches it has handed out; Lightning
stores that in checkpoints (the loader is "stateful") and, on resume, the sampler starts after the
samples already consumed, so a resumed run sees exactly the batches the uninterrupted run would.
With a `LengthGrouping`, the epoch's order groups samples of similar length and modality into each
rank's batches instead (`length_grouping.py`), with the same counts, padding slots and resume.

A saved position belongs to the epoch it was saved in. One saved on an epoch's last batch (a
`ModelCheckpoint(every_n_train_steps=...)` that divides the epoch, a requeue at the epoch's end,
the `last.ckpt` of a run that `max_steps` stopped there) is the start of the next epoch: Lightning
counts that epoch as done and goes on with the next one. And a position is only applied if the
loader's epoch, when it is next iterated, is still the saved one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .length_grouping import LengthGrouping
from .splitting import rank_and_world

PAD = None
"""The index of a padding position: `InstructionDataset[PAD]` is a `padding` skip marker."""


class EpochSampler(DistributedSampler):
    """Shuffled (or ordered) indices for this rank, for the current epoch, from an offset; `PAD`
    (None) marks the padding positions (only on the last ranks, only at the end of their share).

    Subclasses `DistributedSampler` only so that Lightning recognises it as rank-aware and does
    not wrap it again; it keeps its own state and does not call `DistributedSampler.__init__`
    (which needs an initialised process group at construction time).
    """

    def __init__(  # noqa: D107
        self, length: int, shuffle: bool = True, seed: int = 0, grouping: LengthGrouping | None = None
    ):
        if grouping is not None and len(grouping) != length:
            raise ValueError(f"length grouping covers {len(grouping)} samples, the sampler {length}")
        if grouping is not None and not shuffle:
            raise ValueError("length grouping is a shuffled order: use it with shuffle=True")
        self.length, self.shuffle, self.seed, self.grouping = length, shuffle, seed, grouping
        self.epoch, self.start = 0, 0
        self.rank, self.world = rank_and_world()

    def _refresh_rank(self) -> None:
        # The DataModule may build the sampler before the process group exists (Lightning sets it up
        # later), so rank and world size are read again each pass.
        self.rank, self.world = rank_and_world()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        # The full per-rank count even when resuming mid-epoch: Lightning keeps its own batch index.
        self._refresh_rank()
        return -(-self.length // self.world)

    def _order(self) -> list[int | None]:
        """This rank's positions of the current epoch, from the first."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.grouping is not None:
            return self.grouping.order(self.rank, self.world, g)
        if self.shuffle:
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        per_rank = -(-self.length // self.world)
        order += [PAD] * (per_rank * self.world - self.length)  # fewer than `world` padding positions
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int | None]:
        self._refresh_rank()
        mine = self._order()
        start, self.start = self.start, 0  # an offset applies to one pass only
        return iter(mine[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position survives a checkpoint: over an `EpochSampler`, or over an iterable
    dataset with `resume(batches, batch_size)` (a mixture of map-style sources)."""

    def __init__(self, dataset, sampler: EpochSampler | None = None, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch_sampler = sampler
        self._start = 0  # batches to skip on the next pass
        self._start_epoch: int | None = None  # the epoch `_start` belongs to
        self._consumed = 0

    @property
    def epoch(self) -> int:
        """The epoch the next pass reads (the sampler's, or the mixture's)."""
        return self._epoch_sampler.epoch if self._epoch_sampler is not None else self.dataset.epoch

    def _skip(self, batches: int) -> None:
        # Where the next pass starts: the sampler (or the mixture) skips the samples of `batches` batches.
        if self._epoch_sampler is not None:
            self._epoch_sampler.start = batches * (self.batch_size or 1)
        else:
            self.dataset.resume(batches, self.batch_size or 1)

    def __iter__(self):
        start, self._start = self._start, 0
        if start and self.epoch != self._start_epoch:
            # The epoch moved on since the position was loaded: the position is not this epoch's.
            start = 0
            self._skip(0)
        self._consumed = start
        batches = super().__iter__()
        if self._epoch_sampler is None and self.num_workers > 0:
            # Workers hold their own copies of the dataset now; the offset must not reach a later pass.
            self.dataset._resume = None
        for batch in batches:
            self._consumed += 1
            yield batch
        self._consumed = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches and batches >= len(self):
            # Saved on the epoch's last batch: Lightning counts the epoch as done and goes on with
            # the next one, which starts at its first batch.
            epoch, batches = epoch + 1, 0
        if self._epoch_sampler is not None:
            self._epoch_sampler.set_epoch(epoch)
        else:
            self.dataset.set_epoch(epoch)
        self._start, self._start_epoch = batches, epoch
        self._skip(batches)
