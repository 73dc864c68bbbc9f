"""Learning-rate schedule: linear warmup for a ratio of the total steps, then cosine decay (LLaVA's)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """LambdaLR: 0 -> 1 over `ceil(warmup_ratio * total_steps)` steps, then cosine down to `min_lr_ratio`."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
