"""Batching: right padding (or packing, `data/packing.py`), attention masks, stacked pixel values,
skip counts (a `batch.LlavaBatch`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from ..batch import IGNORE_INDEX, LlavaBatch
from .packing import pack_samples
from .sample import SKIP


class LlavaCollator:
    """Collates encoded samples; skip markers are dropped and counted in `batch["skipped"]`.

    With `pack_tokens` the kept samples are packed into rows of that many tokens instead of padded
    to the longest (`packing.pack_samples`; `pad_to_multiple_of` is then unused).
    """

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = None, pack_tokens: int | None = None
    ):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack_tokens = pack_tokens

    def __call__(self, samples: list[dict[str, Any]]) -> LlavaBatch:
        skipped = Counter(s[SKIP] for s in samples if SKIP in s)
        kept = [s for s in samples if SKIP not in s]
        if self.pack_tokens is not None:  # every key the padded path builds below, built for packed rows
            packed = pack_samples(kept, self.pack_tokens, self.pad_token_id)
            return LlavaBatch(**packed, skipped=dict(skipped))
        length = max((len(s["input_ids"]) for s in kept), default=0)
        if self.pad_to_multiple_of and length:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(kept), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(kept), length), dtype=torch.long)
        for i, s in enumerate(kept):
            n = len(s["input_ids"])
            ids[i, :n] = s["input_ids"]
            labels[i, :n] = s["labels"]
            mask[i, :n] = 1
        pixels = [s["pixel_values"] for s in kept if len(s["pixel_values"])]
        return LlavaBatch(
            input_ids=ids,
            labels=labels,
            attention_mask=mask,
            pixel_values=torch.cat(pixels) if pixels else None,
            skipped=dict(skipped),
        )
