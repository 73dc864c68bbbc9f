"""The batches that pass between data, module and model: their keys, the label of unsupervised
positions, and which positions the next-token loss scores.

The data side produces them (`data/collate.py`, `data/step_tokens.py`, `data/prompts.py`); the
LightningModule and the model read them. Both sides import this file and not each other.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch
from typing_extensions import NotRequired

IGNORE_INDEX = -100
"""Label of a position the loss does not score (prompt, image, padding), as in LLaVA and transformers."""


class LlavaBatch(TypedDict):
    """A training / validation batch: right-padded, or packed (several samples per row, tail-padded;
    then `position_ids` is present, see `data/packing.py`)."""

    input_ids: torch.Tensor
    """`[B, T]` token ids; each image is a run of image-token ids, one per image feature vector."""
    attention_mask: torch.Tensor
    """`[B, T]` 1 on tokens, 0 on padding."""
    labels: torch.Tensor
    """`[B, T]` the target ids where the loss scores, `IGNORE_INDEX` elsewhere (not yet shifted)."""
    pixel_values: torch.Tensor | None
    """`[N, 3, H, W]` the batch's images in sample order (uint8 or normalised floats), or None."""
    skipped: NotRequired[dict[str, int]]
    """Samples the collator dropped, per skip reason."""
    right_padded: NotRequired[bool]
    """True when every row of `attention_mask` is 1...1 0...0 (the collator's padded batches, marked on
    the CPU): under causal attention a real token then attends only to real tokens, and
    `LlavaLitModule.forward` passes no padding mask (the causal kernel, no `[B, 1, T, T]` mask)."""
    step_tokens: NotRequired[int]
    """Supervised positions of this rank's micro-batches in the batch's optimizer step (set by the
    training loader's look-ahead, `data/step_tokens.py`)."""
    step_first: NotRequired[bool]
    """True on the first micro-batch of an optimizer step."""
    position_ids: NotRequired[torch.Tensor]
    """Packed batches: `[B, T]` positions restarting at 0 at each sample and at the tail padding."""
    cu_seqlens: NotRequired[torch.Tensor]
    """Packed batches: int32 `[S + 1]` cumulative lengths of the segments (samples and tail paddings) of
    the rows laid end to end, for varlen attention kernels."""
    max_seqlen: NotRequired[int]
    """Packed batches: the longest segment of `cu_seqlens`."""
    num_samples: NotRequired[int]
    """Packed batches: samples in the batch (a row holds several)."""
    image_positions: NotRequired[torch.Tensor]
    """`[I]` flat positions (row-major in `[B, T]`) of the image-token ids, in order; I is the image-token count."""
    supervised_positions: NotRequired[torch.Tensor]
    """`[S]` flat positions `b * T + t` whose next token the loss scores (`labels[b, t + 1] != IGNORE_INDEX`)."""
    image_sizes: NotRequired[torch.Tensor]
    """Anyres (LLaVA-NeXT): `[num_images, 2]` each image's original (height, width), in the order of its
    crops in `pixel_values` (then `[num_crops, 3, S, S]`: per image its overview and crops)."""
    image_feature_index: NotRequired[torch.Tensor]
    """Anyres: `[I]` the row of the crops' features each image token takes (`anyres.AnyresGeometry.feature_index`,
    made on the CPU by the collator so that the model reads no `image_sizes` on the host)."""


class PromptBatch(TypedDict):
    """A `predict` batch: one entry per record."""

    id: list[Any]
    """The records' ids (or their index in the file)."""
    prompt: list[str]
    """The first human turn, without `<image>` lines."""
    images: list[Any]
    """None or a list of PIL images per record."""


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """`[B, T-1]` positions the shifted next-token loss scores: position t predicts `labels[:, t+1]`."""
    return labels[:, 1:] != IGNORE_INDEX


def flat_positions(mask: torch.Tensor) -> torch.Tensor:
    """`[K]` row-major flat positions of the True entries of `mask` (a host sync on an accelerator:
    the collator computes the batch's positions on the CPU; the model only when they are not given)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """`[S]` flat positions `b * T + t` of a `[B, T]` batch whose next token the loss scores."""
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = supervised_mask(labels)
    return flat_positions(scored)


def count_supervised(batch: Any) -> int:
    """Positions the loss scores in a batch (0 when it has no `[B, T]` labels)."""
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(labels, torch.Tensor) or labels.ndim != 2:
        return 0
    return int(supervised_mask(labels).sum())
