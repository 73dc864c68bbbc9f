"""The loss of an optimizer step as the mean over all its supervised tokens (every micro-batch of the
gradient-accumulation group, every rank), applied before backward.

Each micro-batch returns its summed token loss times `token_mean_scale(step_tokens, ...)`, so nothing
rescales gradients after backward: the same holds where gradients live in the strategy's own buffers
(DeepSpeed ZeRO). The step's token count comes from the training loader's look-ahead
(`data/step_tokens.py`), summed over ranks once per step by `StepTokenCount`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..batch import LlavaBatch, count_supervised

log = logging.getLogger(__name__)


def token_mean_scale(step_tokens: torch.Tensor, accumulate: int, world_size: int) -> torch.Tensor:
    """Factor for a micro-batch's summed token loss so that the gradient of the optimizer step is the
    mean over all `step_tokens` (its supervised tokens on every rank and micro-batch).

    Every strategy here divides each micro-batch loss by `accumulate` (Lightning's automatic
    optimization) and averages gradients over the `world_size` data-parallel ranks (DDP, FSDP,
    FSDP2; DeepSpeed ZeRO through `LlavaDeepSpeedStrategy`, which turns off DeepSpeed's own
    division by its accumulation steps); the factor undoes both.
    """
    return accumulate * world_size / step_tokens.clamp(min=1).to(torch.float32)


class StepTokenCount:
    """The current optimizer step's supervised tokens over all ranks, summed once per step.

    `sum_over_ranks(count)` is the strategy's all-reduce (a collective: every rank calls `of` at the
    same micro-batch). `logged` is what the step reports as `train/tokens`; `reset()` after each step.
    """

    def __init__(self) -> None:
        self.step: torch.Tensor | None = None
        self.logged: torch.Tensor | None = None
        self._warned = False

    def of(
        self, batch: LlavaBatch, accumulate: int, sum_over_ranks: Callable[[int], torch.Tensor]
    ) -> torch.Tensor:
        """Supervised tokens of this micro-batch's optimizer step over all ranks."""
        if "step_tokens" in batch:
            if batch.get("step_first") or self.step is None:
                self.step = self.logged = sum_over_ranks(int(batch["step_tokens"]))
            return self.step
        # A loader without the look-ahead (not LlavaDataModule's): each micro-batch is normalized by its
        # own token count, exact without accumulation, a mean of micro-batch means with it.
        if accumulate > 1 and not self._warned:
            log.warning(
                "training batches carry no 'step_tokens' (the loader is not wrapped in StepTokenLoader): "
                "with gradient accumulation the loss is a mean of micro-batch token means, not the step's"
            )
            self._warned = True
        tokens = sum_over_ranks(count_supervised(batch))
        self.logged = tokens if self.logged is None else self.logged + tokens
        return tokens * accumulate

    def reset(self) -> None:
        self.step = self.logged = None
