"""Length / modality grouping: an epoch order whose batches hold samples of similar length.

LLaVA's `group_by_modality_length`, reworked so that right padding drops and every guarantee of
`EpochSampler` holds. Per epoch, from one seeded generator:

1. Samples are split by modality (text-only vs with images: an image sample carries hundreds of
   image tokens a text-only one lacks), and each modality is shuffled.
2. Each modality's shuffled list is cut into megabatches of `megabatch` steps (a step: `world`
   ranks x `batch_size` samples), and each megabatch is sorted by estimated length, longest first.
3. A sorted megabatch is cut into steps of `world * batch_size` consecutive samples; rank r takes
   the r-th `batch_size` of them, so every batch, and every rank of a step, holds similar lengths.
4. The steps of all modalities are shuffled together; the leftovers (fewer than one step per
   modality) fill the remaining steps, the epoch's last step taking the remainder and the `PAD`
   slots (fewer than `world`, the last ranks' last slot), exactly as the ungrouped order.

LLaVA deals a sorted megabatch of one step out to the ranks by balancing the sum of lengths, which
puts long and short samples into every batch; dealing consecutive runs of a larger sorted
megabatch is what removes the padding, and the ranks of a step still get near-equal lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

TEXT_ONLY, WITH_IMAGES = 0, 1
"""Modality keys: samples of different keys never share a step, except in the epoch's leftovers."""


def estimate_lengths(words: Sequence[int], num_images: Sequence[int], num_image_tokens: int) -> np.ndarray:
    """LLaVA's cheap length estimate: words of the conversation plus the image tokens it expands to."""
    return np.asarray(words, dtype=np.int64) + np.asarray(num_images, dtype=np.int64) * int(num_image_tokens)


def group_by_length(
    lengths: Sequence[int],
    modalities: Sequence[int],
    batch_size: int,
    world: int,
    generator: torch.Generator,
    megabatch: int = 50,
) -> list[list[int | None]]:
    """Every rank's positions for one epoch (`None`: a padding slot), `ceil(N / world)` each.

    Each index appears once over all ranks; rank r's batch k is `order[r][k * batch_size : (k + 1) *
    batch_size]`. `megabatch` is in steps and capped at a quarter of the epoch, so batches vary
    between epochs even for small data sets.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    modalities = np.asarray(modalities)
    n = len(lengths)
    if modalities.shape != lengths.shape:
        raise ValueError(f"one modality per sample: {len(modalities)} modalities for {n} lengths")
    if batch_size < 1 or world < 1 or megabatch < 1:
        raise ValueError(
            f"batch_size, world and megabatch must be >= 1, got {batch_size}, {world}, {megabatch}"
        )
    if n == 0:
        return [[] for _ in range(world)]
    step = world * batch_size
    mega = step * max(1, min(megabatch, n // (4 * step)))
    groups: list[np.ndarray] = []  # full single-modality steps, each sorted longest first
    tail: list[np.ndarray] = []  # per modality, the sorted remainder of its last megabatch
    for key in np.unique(modalities):
        members = np.flatnonzero(modalities == key)
        members = members[torch.randperm(len(members), generator=generator).numpy()]
        for start in range(0, len(members), mega):
            chunk = members[start : start + mega]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]  # ties keep the shuffled order
            full = len(chunk) - len(chunk) % step
            groups.extend(chunk[:full].reshape(-1, step))
            tail.append(chunk[full:])
    rest = np.concatenate(tail)
    per_rank = -(-n // world)
    steps = -(-per_rank // batch_size)
    last_size = per_rank - (steps - 1) * batch_size  # per rank, 1..batch_size
    pads = world * per_rank - n
    cut = len(rest) - (world * last_size - pads)  # leftovers that fill whole steps
    if cut >= 0:
        groups.extend(rest[:cut].reshape(-1, step))
    groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    # The last step takes the leftovers' remainder; with none (N a multiple of a step), a full step.
    last = rest[cut:] if cut >= 0 else groups.pop()
    orders: list[list[int | None]] = [[] for _ in range(world)]
    if groups:
        full_steps = np.stack(groups).reshape(len(groups), world, batch_size)
        orders = [full_steps[:, r, :].reshape(-1).tolist() for r in range(world)]
    position = 0
    for r in range(world):
        take = last_size - (1 if r >= world - pads else 0)  # the last `pads` ranks end on a PAD slot
        orders[r] += last[position : position + take].tolist() + [None] * (last_size - take)
        position += take
    return orders


@dataclass(frozen=True)
class LengthGrouping:
    """What `EpochSampler` needs to group an epoch by length: per-sample lengths and modalities, the
    per-rank batch size and the megabatch (in steps)."""

    lengths: np.ndarray
    modalities: np.ndarray
    batch_size: int
    megabatch: int = 50

    @classmethod
    def from_counts(
        cls,
        words: Sequence[int],
        num_images: Sequence[int],
        num_image_tokens: int,
        batch_size: int,
        megabatch: int = 50,
    ) -> LengthGrouping:
        """From per-record word and image counts (`InstructionIndex.word_counts()`, `.num_images`)."""
        images = np.asarray(num_images, dtype=np.int64)
        modalities = np.where(images > 0, WITH_IMAGES, TEXT_ONLY)
        return cls(estimate_lengths(words, images, num_image_tokens), modalities, batch_size, megabatch)

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self, rank: int, world: int, generator: torch.Generator) -> list[int | None]:
        """Rank `rank`'s positions of the epoch the generator is seeded for."""
        orders = group_by_length(
            self.lengths, self.modalities, self.batch_size, world, generator, self.megabatch
        )
        return orders[rank]
