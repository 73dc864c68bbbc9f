"""FSDP2 for `LlavaModel`: `fully_shard` on every declared block, then the root, from one strategy.

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` with every device in the data-parallel
dimension (no tensor parallelism) plus the sharding settings; `configure_model`
(training/strategies.py) calls `shard_fsdp2` with them. The units are the classes the components declare
(`LlavaModel.block_classes()`: the vision tower's block and the LLM's decoder layer), so no
model-specific wrap policy is written anywhere. A frozen vision tower is cast to
`frozen_vision_dtype` (bf16 by default) before sharding: it never gets gradients or optimizer state.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"] | None


def _dtype(name: DType) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def shard_fsdp2(
    model: torch.nn.Module,
    mesh,
    param_dtype: DType = "bfloat16",
    reduce_dtype: DType = "float32",
    frozen_vision_dtype: DType = "bfloat16",
    reshard_after_forward: bool = True,
) -> int:
    """Apply `fully_shard` to each vision block and LLM decoder layer, then to `model`; returns the unit count."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype))
    tower = model.vision_tower
    if frozen_vision_dtype is not None and not any(p.requires_grad for p in tower.parameters()):
        tower.to(_dtype(frozen_vision_dtype))
    classes = model.block_classes()
    units = 0
    for component, cls in classes.items():
        for module in getattr(model, component).modules():
            if isinstance(module, cls):
                fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
                units += 1
    # The tower is a unit of its own (patch embedding, norms), so it gathers its parameters for its
    # forward and frees them after: a frozen tower runs without a graph inside the root's forward
    # (`LlavaModel.get_image_features`) and is not needed again in backward.
    fully_shard(tower, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    units += 1
    # The root holds what is left: LLM embeddings, final norm, LM head, and the projector. It keeps
    # them gathered from forward to backward (torch's own default for a root): its outputs go straight
    # into backward, so a reshard would only be undone by an all-gather at once.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    log.info(
        "FSDP2: %d blocks (%s) + root sharded over %d ranks; params %s, reduce %s",
        units,
        ", ".join(c.__name__ for c in classes.values()),
        mesh.size(),
        param_dtype or "as stored",
        reduce_dtype or "as params",
    )
    return units + 1


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as pure FSDP2 (every rank in the data-parallel mesh) with LLaVA's settings."""

    def __init__(
        self,
        param_dtype: DType = "bfloat16",
        reduce_dtype: DType = "float32",
        frozen_vision_dtype: DType = "bfloat16",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ):
        """
        Args:
            param_dtype: Dtype parameters are gathered in for compute (None: as stored, i.e. fp32).
            reduce_dtype: Dtype of the gradient reduce-scatter (None: the parameter dtype).
            frozen_vision_dtype: Storage dtype of a frozen vision tower (None: leave it as loaded).
            reshard_after_forward: Free gathered parameters after each block's forward (ZeRO-3-like);
                False keeps them until backward (ZeRO-2-like, more memory, less communication).
            save_distributed_checkpoint: Each rank writes its shard (a checkpoint folder); False gathers
                a single file on rank 0.
            process_group_backend: `nccl` / `gloo` (default: by device).
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.frozen_vision_dtype, self.reshard_after_forward = frozen_vision_dtype, reshard_after_forward

    def setup_environment(self) -> None:
        # Every process of every node is one data-parallel replica ("auto" would mean one per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, model: torch.nn.Module) -> int:
        """Shard `model` over the data-parallel mesh with this strategy's settings."""
        return shard_fsdp2(
            model,
            self.device_mesh["data_parallel"],
            self.param_dtype,
            self.reduce_dtype,
            self.frozen_vision_dtype,
            self.reshard_after_forward,
        )
