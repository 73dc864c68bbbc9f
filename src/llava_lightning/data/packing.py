"""Sequence packing: one batch's samples laid into as few rows of at most `capacity` tokens as
first-fit decreasing finds, each sample kept apart from the others in its row.

Packing happens at collate time, on the samples the sampler or stream already gave this rank for
this step, so the number of steps, each sample once per epoch, resume and skip accounting are those
of the padded path. Per row: whole samples, left to right in sample order, then tail padding. Each
sample's `position_ids` restart at 0 (the tail padding is one more run from 0), which is what
transformers reads to keep packed samples apart (`attention_mask=None`); `cu_seqlens` gives the same
segments to varlen kernels. The label at every sample's first token is `IGNORE_INDEX`, so the
shifted loss never predicts one sample from the end of the previous one; the first token's label is
never scored on the padded path either, so the supervised count is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..batch import IGNORE_INDEX


class SampleTooLongError(ValueError):
    """A sample does not fit in one packed row."""


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices whose lengths sum to at most `capacity`: the longest sample first into
    the first row with room (ties by index). Indices ascend within a row; rows are ordered by their
    first index, so the layout follows sample order and is deterministic."""
    if capacity < 1:
        raise ValueError(f"packing capacity must be >= 1 token, got {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        if n > capacity:
            raise SampleTooLongError(
                f"a sample of {n} tokens does not fit in a packed row of {capacity} tokens; "
                "set data.pack_tokens >= data.max_length"
            )
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def row_width(
    lengths: Sequence[int], rows: list[list[int]], capacity: int, multiple_of: int | None = None
) -> int:
    """The width of packed `rows` of samples with `lengths`: the fullest row's tokens, rounded up to
    `multiple_of`, never past `capacity`."""
    width = max((sum(lengths[i] for i in row) for row in rows), default=0)
    if multiple_of and width:
        width = min(-(-width // multiple_of) * multiple_of, max(capacity, width))
    return width


def pack_samples(
    samples: list[dict[str, Any]], capacity: int, pad_token_id: int, multiple_of: int | None = None
) -> dict[str, Any]:
    """The packed batch keys of `batch.LlavaBatch` (all but `skipped`) for encoded samples
    (`input_ids`, `labels`, `pixel_values` each; anyres `image_sizes`, kept in the pixels' order):
    rows of at most `capacity` tokens.

    Every row is as wide as the fullest one (rounded up to `multiple_of`, never past `capacity`):
    a batch holding fewer tokens than `capacity` is not padded out to it (with rows of exactly
    `capacity`, 4 short samples in a 2048-token row ran 13x slower than padded, `bench.gpu_sweep`'s
    CPU smoke)."""
    lengths = [len(s["input_ids"]) for s in samples]
    rows = first_fit_decreasing(lengths, capacity)
    width = row_width(lengths, rows, capacity, multiple_of)
    shape = (len(rows), width)
    ids = torch.full(shape, int(pad_token_id), dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments: list[int] = []  # lengths of the samples and tail paddings, row after row
    pixels, sizes = [], []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            sample = samples[i]
            n = len(sample["input_ids"])
            end = start + n
            ids[r, start:end] = sample["input_ids"]
            labels[r, start:end] = sample["labels"]
            labels[r, start] = IGNORE_INDEX  # position start-1 (another sample) must not predict it
            mask[r, start:end] = 1
            positions[r, start:end] = torch.arange(n)
            segments.append(n)
            if len(sample["pixel_values"]):
                pixels.append(sample["pixel_values"])  # images in the order their tokens appear
            if "image_sizes" in sample:  # anyres: each image's size, in the same order
                sizes.append(sample["image_sizes"])
            start = end
        if start < width:
            positions[r, start:] = torch.arange(width - start)
            segments.append(width - start)
    cu_seqlens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    if segments:
        cu_seqlens[1:] = torch.tensor(segments).cumsum(0)
    extra = {"image_sizes": torch.cat(sizes)} if sizes else {}
    return {
        **extra,
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "position_ids": positions,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max(segments, default=0),
        "num_samples": len(samples),
        "pixel_values": torch.cat(pixels) if pixels else None,
    }
