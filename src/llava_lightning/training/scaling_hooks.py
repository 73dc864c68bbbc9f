"""The one hook our strategy classes read from the LightningModule they train.

`LlavaFSDPStrategy` wraps and checkpoints the declared blocks and, under sharded init, lets rank 0's
weights fill the others' skeletons; `LlavaDeepSpeedStrategy` turns on block checkpointing before
DeepSpeed wraps the model. They learn all of that from `module.scaling_hooks()`, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ScalingHooks:
    """What a strategy may ask of the module it trains."""

    block_classes: dict[str, type[nn.Module]]
    """The transformer-block class of each component: the units to wrap, shard and checkpoint."""
    enable_block_checkpointing: Callable[[], None]
    """Turns on activation checkpointing of every trained block (before the strategy wraps the model)."""
    rank0_holds_weights: bool
    """Sharded init: when the strategy wraps the model only rank 0 holds weights; the others hold a
    meta-device skeleton to be filled from rank 0."""


def scaling_hooks(module: Any) -> ScalingHooks:
    """`module.scaling_hooks()`, or a TypeError saying what our strategies need."""
    get = getattr(module, "scaling_hooks", None)
    if get is None:
        raise TypeError(
            f"{type(module).__name__} has no scaling_hooks(): LlavaFSDPStrategy and LlavaDeepSpeedStrategy "
            "train modules that declare their blocks and checkpointing switch through it "
            "(llava_lightning.training.scaling_hooks.ScalingHooks)"
        )
    return get()
