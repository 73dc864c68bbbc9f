"""Parameter sizes that survive DeepSpeed ZeRO-3 partitioning (the local tensor is then empty and the
full size lives in `ds_shape` / `ds_numel`)."""

from __future__ import annotations

import torch


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's whole shape, partitioned or not."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param: torch.Tensor) -> int:
    """The parameter's whole element count, partitioned or not."""
    return getattr(param, "ds_numel", param.numel())
