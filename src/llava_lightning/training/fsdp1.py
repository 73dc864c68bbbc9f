"""FSDP (the FSDP1 wrapper) for `LlavaModel`: Lightning's `FSDPStrategy` with policies from declared blocks.

`LlavaFSDPStrategy` fills in what a user of `FSDPStrategy` would otherwise write by hand for each
model family: the auto-wrap policy (one FSDP unit per vision block and per LLM decoder layer, the
classes the module declares in `scaling_hooks()`) and, when asked, activation checkpointing of the same
blocks. Everything else is `FSDPStrategy` (sharding strategy FULL_SHARD / SHARD_GRAD_OP /
HYBRID_SHARD, CPU offload, full or sharded checkpoints, mixed precision from `trainer.precision`).
Lightning's FSDPStrategy runs on CUDA only; on CPU use `FSDP2Strategy` (conf/strategy/fsdp2.yaml).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from .scaling_hooks import scaling_hooks


class DeclaredBlocksPolicy(ModuleWrapPolicy):
    """A `ModuleWrapPolicy` whose classes are filled in at setup, from the model's declared blocks
    (so it exists at construction, where Lightning checks that hybrid sharding has a policy)."""

    def __init__(self) -> None:
        super().__init__(set())

    def fill(self, block_classes: dict[str, type[torch.nn.Module]]) -> None:
        classes = set(block_classes.values())
        self._module_classes = classes
        self._module_classes_str = str(classes)


class LlavaFSDPStrategy(FSDPStrategy):
    """`FSDPStrategy` whose wrap / checkpointing policies come from the model's declared blocks."""

    def __init__(self, checkpoint_blocks: bool = False, **kwargs: Any):
        """
        Args:
            checkpoint_blocks: Activation checkpointing on every declared block (FSDP's checkpoint wrapper).
            kwargs: `FSDPStrategy` arguments (sharding_strategy, cpu_offload, state_dict_type, ...); an
                explicit auto_wrap_policy / activation_checkpointing_policy wins over the declared blocks.
        """
        self._declared: list[DeclaredBlocksPolicy] = []
        if kwargs.get("auto_wrap_policy") is None:
            kwargs["auto_wrap_policy"] = self._declare()
        if checkpoint_blocks and kwargs.get("activation_checkpointing_policy") is None:
            kwargs["activation_checkpointing_policy"] = self._declare()
        super().__init__(**kwargs)
        self.checkpoint_blocks = checkpoint_blocks

    def _declare(self) -> DeclaredBlocksPolicy:
        policy = DeclaredBlocksPolicy()
        self._declared.append(policy)
        return policy

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        hooks = scaling_hooks(self.lightning_module)
        for policy in self._declared:
            policy.fill(hooks.block_classes)
        if hooks.rank0_holds_weights:
            # Only rank 0 holds weights; elsewhere the model is a meta skeleton whose units get storage
            # for their shard only as FSDP wraps them, then rank 0's parameters and buffers are copied
            # in (the same on every rank, as FSDP requires).
            device = self.root_device
            self.kwargs["sync_module_states"] = True
            self.kwargs["param_init_fn"] = lambda module: module.to_empty(device=device, recurse=False)
        return super()._setup_model(model)
