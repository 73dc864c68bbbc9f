"""The optimizer and learning-rate schedule of a run: AdamW over per-component parameter groups
(projector, vision tower, LLM, each with its rate; no decay on biases and norms), warmup + cosine
over the run's optimizer steps. AdamW runs fused (one kernel for all parameters) on CUDA, as
`foreach` (batched over tensors) elsewhere; a strategy's own optimizer (DeepSpeed's CPU Adam) is
left as it is."""

from __future__ import annotations

from typing import Any

import torch

from ..model import LlavaModel
from .params import param_groups
from .schedule import warmup_cosine
from .settings import OptimConfig


def configure_optimizers(model: LlavaModel, optim: OptimConfig, trainer: Any, stage: str) -> dict[str, Any]:
    """`LightningModule.configure_optimizers` for `model` under `trainer`."""
    o = optim
    components = {
        "multi_modal_projector": (model.multi_modal_projector, o.projector_lr or o.lr),
        "vision_tower": (model.vision_tower, o.vision_lr or o.lr),
        "language_model": (model.language_model, o.lr),
    }
    if getattr(model, "image_newline", None) is not None:  # anyres: a root parameter, at the LLM's rate
        components["image_newline"] = (model.image_newline, o.lr)
    groups = param_groups(components, o.weight_decay)
    if not groups:
        raise ValueError(f"stage {stage!r} leaves nothing to train")
    # A strategy may need its own optimizer class (DeepSpeed's CPU AdamW when it offloads the optimizer).
    make = getattr(trainer.strategy, "make_optimizer", None)
    if make is None:
        optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **adamw_kernel(groups)
        )
    else:
        optimizer = make(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    fit_loop = trainer.fit_loop
    built_before = fit_loop._combined_loader is not None
    total = trainer.estimated_stepping_batches
    if total == float("inf"):
        raise ValueError(
            "the schedule needs the number of optimizer steps, but the training data has no length "
            "(streamed caption shards without epoch_length): set trainer.max_steps, or the source's "
            "resampled: true with epoch_length"
        )
    if not built_before:
        # With max_epochs set, `estimated_stepping_batches` builds the train loader before Lightning
        # restores a checkpoint's loop state, and never builds it again, so a resumed run would restart
        # the epoch's data from its first batch: drop the early loader so Lightning builds it after.
        fit_loop._combined_loader = None
    scheduler = warmup_cosine(optimizer, max(1, int(total)), o.warmup_ratio, o.min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def adamw_kernel(groups: list[dict[str, Any]]) -> dict[str, bool]:
    """`{"fused": True}` when every parameter is on CUDA, else `{"foreach": True}` (torch's fused
    kernels need all of a step's tensors on one device kind that has them)."""
    devices = {p.device.type for group in groups for p in group["params"]}
    return {"fused": True} if devices == {"cuda"} else {"foreach": True}
