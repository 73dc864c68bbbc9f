"""Batching: right padding (or packing, `data/packing.py`), attention masks, stacked pixel values,
skip counts (a `batch.LlavaBatch`; padded batches say so in `right_padded`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from ..anyres import AnyresGeometry
from ..batch import IGNORE_INDEX, LlavaBatch, flat_positions, supervised_positions
from .packing import pack_samples
from .sample import SKIP


class LlavaCollator:
    """Collates encoded samples; skip markers are dropped and counted in `batch["skipped"]`.

    With `pack_tokens` the kept samples are packed into rows of at most that many tokens instead of
    padded to the longest (`packing.pack_samples`; rows as wide as the fullest, rounded up to
    `pad_to_multiple_of`).
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        pack_tokens: int | None = None,
        image_token_id: int | None = None,
        anyres: AnyresGeometry | None = None,
    ):
        """
        Args:
            pad_token_id: Id right-padding fills `input_ids` with.
            pad_to_multiple_of: Round the padded length up to a multiple of this.
            pack_tokens: Pack the kept samples into rows of at most this many tokens (None: pad each batch).
            image_token_id: The image-token id; when set, batches also carry the step's positions
                (`add_step_positions`).
            anyres: LLaVA-NeXT's crop geometry: batches then carry `image_sizes` (each image's height and
                width, in the order of its crops in `pixel_values`) and, with `image_token_id`, the
                `image_feature_index` that lays the crops' features out (`anyres.feature_index`).
        """
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack_tokens = pack_tokens
        self.image_token_id = image_token_id
        self.anyres = anyres

    def __call__(self, samples: list[dict[str, Any]]) -> LlavaBatch:
        skipped = Counter(s[SKIP] for s in samples if SKIP in s)
        kept = [s for s in samples if SKIP not in s]
        if self.pack_tokens is not None:  # every key the padded path builds below, built for packed rows
            packed = pack_samples(kept, self.pack_tokens, self.pad_token_id, self.pad_to_multiple_of)
            if self.anyres is not None and "image_sizes" not in packed:
                packed["image_sizes"] = image_sizes_of([])
            return self.add_step_positions(LlavaBatch(**packed, skipped=dict(skipped)))
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
        batch = LlavaBatch(
            input_ids=ids,
            labels=labels,
            attention_mask=mask,
            pixel_values=torch.cat(pixels) if pixels else None,
            skipped=dict(skipped),
            right_padded=True,
        )
        if self.anyres is not None:
            batch["image_sizes"] = image_sizes_of(kept)
        return self.add_step_positions(batch)

    def add_step_positions(self, batch: LlavaBatch) -> LlavaBatch:
        """Add `image_positions` and `supervised_positions`, read from the batch's final `input_ids` and
        `labels` here on the CPU, so that the model's step needs no host-device sync to find them."""
        if self.image_token_id is not None:
            batch["image_positions"] = flat_positions(batch["input_ids"] == self.image_token_id)
            batch["supervised_positions"] = supervised_positions(batch["labels"])
            if self.anyres is not None:
                batch["image_feature_index"] = self.anyres.feature_index(batch["image_sizes"].tolist())
        return batch


def image_sizes_of(samples: list[dict[str, Any]]) -> torch.Tensor:
    """`[num_images, 2]` the samples' anyres `image_sizes`, in order (as their crops are concatenated)."""
    sizes = [s["image_sizes"] for s in samples if "image_sizes" in s]
    return torch.cat(sizes) if sizes else torch.empty(0, 2, dtype=torch.long)
