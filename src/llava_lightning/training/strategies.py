"""Everything `LlavaLitModule` does differently depending on the strategy that runs it.

- `configure_model`: FSDP2 shards the declared blocks then the root (and, under sharded init, loads
  the weights after sharding); DeepSpeed ZeRO-3 builds the model under `deepspeed.zero.Init`; with
  `compile`, the blocks are compiled before any of it wraps them (`compile.py`).
- `setup_model`: sharded init under FSDP1 (rank 0 builds, the others keep the skeleton) and under
  strategies that cannot init sharded (every rank builds, with a warning); the vision tower's text-only
  run under module-by-module sharding; the refusal of strategies that accumulate gradients themselves;
  stage qlora's checks (bitsandbytes kernels on the training device, no sharding strategy).
- `metrics_to_device`, `clip_gradients`, `gather_projector_state`: ZeRO-3 places no metrics, FSDP1
  clips through its root, each sharded strategy gathers the projector its own way.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torchmetrics import Metric

from .compile import compile_blocks
from .fsdp1 import LlavaFSDPStrategy
from .fsdp2 import FSDP2Strategy, shard_fsdp2
from .model_build import is_skeleton

log = logging.getLogger(__name__)


def shards_modules(strategy: Any) -> bool:
    """Strategies that gather parameters module by module on all ranks together (FSDP2, FSDP, DeepSpeed)."""
    return isinstance(strategy, (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy))


def is_zero3(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


def inits_sharded(strategy: Any) -> bool:
    """Strategies that load weights after sharding: FSDP2, FSDP1 (ours), ZeRO-3."""
    return isinstance(strategy, (ModelParallelStrategy, LlavaFSDPStrategy)) or is_zero3(strategy)


def configure_model(module: Any) -> None:
    """`LlavaLitModule.configure_model`: what the strategy needs done before it wraps the model; with
    `compile`, the declared blocks are compiled first (after activation checkpointing, before sharding)."""
    strategy = module._trainer.strategy if module._trainer is not None else None
    if is_zero3(strategy) and module.sharded_init and is_skeleton(module.model):
        # Each module's parameters are partitioned as soon as it is built (rank 0's values broadcast);
        # transformers' from_pretrained loads hub weights into the partitions, seeing ZeRO-3 through
        # HfDeepSpeedConfig, which must stay alive (transformers holds only a weak reference).
        from transformers.integrations import HfDeepSpeedConfig

        module._hf_deepspeed_config = HfDeepSpeedConfig(strategy.config)
        module.model = module.builder.build_from_construction_rng(zero3=True)
    if module.compile_blocks:
        compile_blocks(module.model)
    if not isinstance(strategy, ModelParallelStrategy) or getattr(module, "_sharded", False):
        return
    if isinstance(strategy, FSDP2Strategy):
        strategy.shard(module.model)
    else:  # Lightning's own strategy: FSDP2 over its data-parallel dimension with the defaults
        shard_fsdp2(module.model, module.device_mesh["data_parallel"])
    if module.sharded_init:
        from .sharded_init import materialize_sharded

        build = module.builder.build_from_construction_rng if module.global_rank == 0 else None
        materialize_sharded(module.model, build, strategy.root_device)
    module._sharded = True


def setup_model(module: Any, stage: str) -> None:
    """`LlavaLitModule.setup`: sharded init where `configure_model` does not do it, and strategy checks."""
    trainer = module._trainer
    strategy = trainer.strategy
    if module.sharded_init and is_skeleton(module.model):
        if isinstance(strategy, LlavaFSDPStrategy):
            # Rank 0 holds the real weights, the others keep the skeleton; the wrapper allocates their
            # shards and copies rank 0's (sync_module_states, LlavaFSDPStrategy).
            if trainer.global_rank == 0:
                module.model = module.builder.build_from_construction_rng()
        elif not inits_sharded(strategy):
            # Here, not in configure_model: DeepSpeed runs that hook under zero.Init.
            log.warning(
                "model.sharded_init applies to FSDP2, FSDP (LlavaFSDPStrategy) and DeepSpeed ZeRO-3; "
                "under %s every rank builds the full model",
                type(strategy).__name__,
            )
            module.model = module.builder.build_from_construction_rng()
    if module.stage == "qlora":
        check_qlora(module, strategy)
    # Module-by-module sharding gathers each unit on all ranks together, so a batch without images
    # still runs the vision tower (on a blank image) wherever another rank's batch has some.
    module.model.tower_on_text_only = shards_modules(strategy)
    if stage == "fit" and trainer.accumulate_grad_batches > 1 and strategy.handles_gradient_accumulation:
        raise ValueError(
            f"{type(strategy).__name__} runs gradient accumulation itself, so the loss of an optimizer step "
            "cannot be the exact mean over its tokens (the step boundaries and the loss division are the "
            "strategy's). For DeepSpeed use llava_lightning.training.deepspeed.LlavaDeepSpeedStrategy "
            "(conf/strategy/deepspeed_*.yaml), or set trainer.accumulate_grad_batches to 1"
        )


def check_qlora(module: Any, strategy: Any) -> None:
    """Stage qlora: bitsandbytes' 4-bit (and, with `vision_8bit`, 8-bit) kernels must run on the device
    the model trains on, and the strategy must keep whole modules per rank (the packed 4-bit weights and
    their quantization state are not sharded)."""
    from .quantization import require_kernels

    if shards_modules(strategy):
        raise ValueError(
            f"stage 'qlora' runs under one device or DDP; {type(strategy).__name__} shards parameters, "
            "which the packed 4-bit weights do not support here: use conf/strategy/ddp.yaml or a single device"
        )
    require_kernels("4bit", strategy.root_device)
    if module.qlora_config.vision_8bit:
        require_kernels("8bit", strategy.root_device, what=" (model.qlora.vision_8bit)")


def metrics_to_device(module: Any) -> None:
    """Move the module's metrics to the strategy's device (ZeRO-3 never moves the module itself: its
    engine places the partitioned parameters, so the metrics' states would stay on the CPU)."""
    device = module.trainer.strategy.root_device
    for child in module.children():
        if isinstance(child, Metric):
            child.to(device)


def clip_gradients(strategy: Any, gradient_clip_val: float | None, algorithm: str | None) -> bool:
    """Clip where Lightning's clipping cannot: FSDP1's precision plugin refuses norm clipping, so its
    root module clips (it knows the sharded total norm). True when done here."""
    if gradient_clip_val and isinstance(strategy, FSDPStrategy) and algorithm in (None, "norm"):
        strategy.model.clip_grad_norm_(gradient_clip_val)
        return True
    return False


def gather_projector_state(strategy: Any, projector: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projector's full weights on CPU, gathered from shards where a strategy split them (FSDP2
    DTensors, FSDP1 flat parameters, ZeRO-3 partitions). Under a sharded strategy every rank must call it."""
    from torch.distributed.tensor import DTensor

    gather = contextlib.nullcontext()
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        gather = FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False)
    elif is_zero3(strategy):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(projector.parameters()))
    with gather:
        return {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone().contiguous()
            for k, v in projector.state_dict().items()
        }
