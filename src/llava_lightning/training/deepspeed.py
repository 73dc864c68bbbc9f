"""DeepSpeed ZeRO for `LlavaModel`: Lightning's `DeepSpeedStrategy`, accumulating like every other strategy.

`LlavaDeepSpeedStrategy` is `DeepSpeedStrategy` (ZeRO stage 2 / 3, CPU offload of optimizer state
and parameters, bf16 from `trainer.precision`; CUDA only) with three changes that make the loss of
an optimizer step the exact mean over its supervised tokens (training/token_mean.py):

- Lightning, not DeepSpeed's micro-step counter, decides where an accumulation group ends
  (`handles_gradient_accumulation` is False, and every micro-batch tells the engine whether it closes
  the group): DeepSpeed steps exactly where DDP / FSDP would, including the shorter last group of
  an epoch, and the group the data look-ahead counted tokens for is the group DeepSpeed reduces.
  Inside a group Lightning does not enter the engine's `no_sync()` (ZeRO 2/3 refuse it).
- `engine.backward` does not divide the loss by the accumulation steps (Lightning already divides by
  `accumulate_grad_batches`); ZeRO averages gradients over ranks like DDP. So the module's loss
  factor (`token_mean_scale`) is the same under every strategy.
- With the optimizer offloaded to CPU, `LlavaLitModule.configure_optimizers` gets DeepSpeed's
  `DeepSpeedCPUAdam` (AdamW mode, same parameter groups) from `make_optimizer`.

Activation checkpointing: `checkpoint_blocks` turns on the model's own checkpointing of each declared
block (through the module's `scaling_hooks()`: HF / timm non-reentrant checkpointing of every vision
block and LLM decoder layer, which ZeRO-3 supports), the same switch as `--model.gradient_checkpointing true`.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from .scaling_hooks import scaling_hooks

log = logging.getLogger(__name__)


class LlavaDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` whose gradient accumulation follows Lightning's boundaries (exact token-mean loss)."""

    def __init__(self, checkpoint_blocks: bool = False, **kwargs: Any):
        """
        Args:
            checkpoint_blocks: Activation checkpointing of every declared block (the module's
                `gradient_checkpointing` switch), turned on before DeepSpeed wraps the model.
            kwargs: `DeepSpeedStrategy` arguments (stage, offload_optimizer, offload_parameters,
                pin_memory, allgather_bucket_size, reduce_bucket_size, config, ...).
        """
        super().__init__(**kwargs)
        self.checkpoint_blocks = checkpoint_blocks

    @property
    def handles_gradient_accumulation(self) -> bool:
        # Lightning runs the accumulation: closure only inside a group, the optimizer step (engine.step)
        # at its end, as for DDP / FSDP; the engine is told the boundary in `training_step`.
        return False

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        # Lightning would enter the engine's `no_sync()` inside a group (it looks like DDP), which ZeRO 2
        # and 3 refuse; the engine itself reduces at the boundary it was told.
        yield None

    @property
    def offloads_optimizer(self) -> bool:
        """Optimizer state (and the update) on CPU or NVMe: ZeRO-Offload."""
        zero = (self.config or {}).get("zero_optimization") or {}
        device = (zero.get("offload_optimizer") or {}).get("device", "none")
        return device not in (None, "none")

    def make_optimizer(self, groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
        """AdamW over `groups`; DeepSpeed's CPU AdamW when the optimizer is offloaded (DeepSpeed
        refuses a torch optimizer there)."""
        if self.offloads_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    def setup(self, trainer: Any) -> None:
        if self.checkpoint_blocks:
            scaling_hooks(self.lightning_module).enable_block_checkpointing()
        super().setup(trainer)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        trainer = self.lightning_module.trainer
        if trainer is not None and trainer.training:
            # Before forward / backward: ZeRO reads the boundary in its backward hooks.
            self.deepspeed_engine.set_gradient_accumulation_boundary(
                not trainer.fit_loop._should_accumulate()
            )
        return super().training_step(*args, **kwargs)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Lightning divided the loss by accumulate_grad_batches; DeepSpeed must not divide it again.
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)
