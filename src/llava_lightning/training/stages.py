"""LLaVA's training stages as plain functions on a `LlavaModel`: which parameters train.

`align` (stage 1: projector only), `finetune` (stage 2: projector + LLM), `full` (everything that
runs), `lora` (LoRA adapters on the LLM through peft, projector fully trained); any stage may also
train the last k vision blocks, and turn on activation checkpointing of the trained blocks.
Vision blocks past the deepest feature layer never run, so they stay frozen in every stage.
"""

from __future__ import annotations

import logging
from typing import Literal

from torch import nn

from ..model import LlavaModel
from .params import param_table
from .settings import LoraConfig

log = logging.getLogger(__name__)

Stage = Literal["align", "finetune", "full", "lora"]


def components(model: LlavaModel) -> dict[str, nn.Module]:
    """The three parts, by their transformers names."""
    return {
        "vision_tower": model.vision_tower,
        "multi_modal_projector": model.multi_modal_projector,
        "language_model": model.language_model,
    }


def apply_stage(
    model: LlavaModel,
    stage: Stage,
    unfreeze_vision_blocks: int = 0,
    lora: LoraConfig | None = None,
    gradient_checkpointing: bool = False,
) -> None:
    """Set `requires_grad` for `stage`, then log the table of trainable and frozen parameters."""
    if stage == "lora":
        freeze_for_lora(model, lora or LoraConfig())
    else:
        {"align": freeze_for_align, "finetune": freeze_for_finetune, "full": freeze_for_full}[stage](model)
    if unfreeze_vision_blocks:
        unfreeze_last_vision_blocks(model, unfreeze_vision_blocks)
    if gradient_checkpointing:
        enable_block_checkpointing(model)
    log.info("stage %r parameters:\n%s", stage, param_table(components(model)))


def freeze_for_align(model: LlavaModel) -> None:
    """Stage 1: only the projector trains; vision tower and LLM are frozen."""
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)


def freeze_for_finetune(model: LlavaModel) -> None:
    """Stage 2: projector and LLM train; the vision tower is frozen."""
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    model.language_model.requires_grad_(True)


def freeze_for_full(model: LlavaModel) -> None:
    """Everything trains (vision blocks past the deepest feature layer never run and stay frozen)."""
    model.requires_grad_(True)
    refreeze_unused_vision_blocks(model)


def freeze_for_lora(model: LlavaModel, lora: LoraConfig) -> None:
    """LoRA adapters on the LLM's linear layers (peft); projector fully trained; the rest frozen."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as err:
        raise ImportError("stage 'lora' needs peft: pip install 'llava-lightning[lora]'") from err
    model.requires_grad_(False)
    cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    if not hasattr(model.language_model, "peft_config"):
        model.language_model = get_peft_model(model.language_model, cfg)
    model.multi_modal_projector.requires_grad_(True)


def unfreeze_last_vision_blocks(model: LlavaModel, k: int) -> None:
    """Train the last k blocks that run (those up to the deepest feature layer)."""
    tower = model.vision_tower
    for block in tower.blocks()[: tower.blocks_run][-k:]:
        block.requires_grad_(True)


def refreeze_unused_vision_blocks(model: LlavaModel) -> None:
    """Freeze the vision blocks that never run and the parts only the pooled output uses."""
    tower = model.vision_tower
    for block in tower.blocks()[tower.blocks_run :]:
        block.requires_grad_(False)
    # Parts that only serve the pooled / classifier output, which LLaVA never reads: CLIP's and
    # SigLIP's post_layernorm and pooling head, timm's final norm, fc_norm, attention pool, head.
    root = getattr(tower, "timm_model", tower)
    for name in ("post_layernorm", "head", "norm", "fc_norm", "attn_pool"):
        module = getattr(root, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False)


def enable_block_checkpointing(model: LlavaModel) -> None:
    """Activation checkpointing (non-reentrant) of every declared block of the components that train."""
    lm = model.language_model
    if any(p.requires_grad for p in lm.parameters()):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tower = model.vision_tower
    if any(p.requires_grad for p in tower.parameters()):
        if hasattr(tower, "hf_model"):
            tower.hf_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        elif hasattr(tower, "timm_model"):
            tower.timm_model.set_grad_checkpointing(True)
