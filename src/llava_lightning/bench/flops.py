"""The GPU sweep's FLOP model: `llava_lightning.training.flops` (the training callback's too), named here."""

from ..training.flops import LlavaFlops, batch_stats, sample_lengths

__all__ = ["LlavaFlops", "batch_stats", "sample_lengths"]
