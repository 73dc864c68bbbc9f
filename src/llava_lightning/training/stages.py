"""LLaVA's training stages as plain functions on a `LlavaModel`: which parameters train.

`align` (stage 1: projector only), `finetune` (stage 2: projector + LLM), `full` (everything that
runs), `lora` (LoRA adapters on the LLM through peft, projector fully trained), `qlora` (`lora` over
an LLM whose linear layers are stored in 4 bit: `quantization.py`); any stage may also
train the last k vision blocks, and turn on activation checkpointing of the trained blocks.
Vision blocks past the deepest feature layer never run, so they stay frozen in every stage.
"""

from __future__ import annotations

import logging
import types
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model import LlavaModel
from .params import param_table
from .settings import CheckpointingConfig, LoraConfig, QLoraConfig

log = logging.getLogger(__name__)

Stage = Literal["align", "finetune", "full", "lora", "qlora"]


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
    checkpointing: CheckpointingConfig | None = None,
    qlora: QLoraConfig | None = None,
) -> None:
    """Set `requires_grad` for `stage`, turn on activation checkpointing (`gradient_checkpointing`: every
    block, unless `checkpointing` chooses per component), then log the table of trainable parameters."""
    if stage == "lora":
        freeze_for_lora(model, lora or LoraConfig())
    elif stage == "qlora":
        qlora = qlora or QLoraConfig()
        if qlora.vision_8bit and unfreeze_vision_blocks:
            raise ValueError(
                "model.qlora.vision_8bit keeps the tower frozen in 8 bit: drop unfreeze_vision_blocks"
            )
        freeze_for_qlora(model, lora or LoraConfig(), qlora)
    else:
        {"align": freeze_for_align, "finetune": freeze_for_finetune, "full": freeze_for_full}[stage](model)
    if unfreeze_vision_blocks:
        unfreeze_last_vision_blocks(model, unfreeze_vision_blocks)
    every = (checkpointing or CheckpointingConfig()).every(gradient_checkpointing)
    if any(every.values()):
        enable_block_checkpointing(model, every["vision_tower"], every["language_model"])
    log.info("stage %r parameters:\n%s", stage, param_table(components(model)))


def freeze_for_align(model: LlavaModel) -> None:
    """Stage 1: only the projector trains; vision tower and LLM are frozen."""
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)


def freeze_for_finetune(model: LlavaModel) -> None:
    """Stage 2: projector and LLM train (and anyres' `image_newline`); the vision tower is frozen."""
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    model.language_model.requires_grad_(True)
    train_image_newline(model)


def train_image_newline(model: LlavaModel) -> None:
    """Anyres: `image_newline` trains whenever the LLM does (LLaVA-NeXT's rule: not in stage 1, where only
    the projector trains; with `mm_language_model` in stage 2)."""
    if getattr(model, "image_newline", None) is not None:
        model.image_newline.requires_grad_(True)


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
    train_image_newline(model)


def freeze_for_qlora(model: LlavaModel, lora: LoraConfig, qlora: QLoraConfig) -> None:
    """QLoRA: the LLM's linear layers (LM head excepted) quantized to 4 bit, LoRA adapters on top (peft);
    projector fully trained; the vision tower frozen (its linear layers in 8 bit with `vision_8bit`)."""
    from .quantization import (
        quantization_device,
        quantize_language_model,
        quantize_vision_tower_8bit,
        require_kernels,
    )

    # Quantized here, where this process can (quantization_device); the training device is checked
    # again when a trainer sets the module up (strategies.setup_model).
    require_kernels("4bit", quantization_device())
    if not hasattr(model.language_model, "peft_config"):
        n = quantize_language_model(model.language_model, qlora)
        log.info(
            "qlora: %d LLM linear layers in 4 bit (%s, double quantization %s, compute %s)",
            n, qlora.quant_type, qlora.double_quant, qlora.compute_dtype,
        )  # fmt: skip
    if qlora.vision_8bit:
        require_kernels("8bit", quantization_device(), what=" (model.qlora.vision_8bit)")
        log.info(
            "qlora: %d vision-tower linear layers in 8 bit", quantize_vision_tower_8bit(model.vision_tower)
        )
    freeze_for_lora(model, lora)


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


def enable_block_checkpointing(model: LlavaModel, vision: int = 1, language: int = 1) -> None:
    """Activation checkpointing (non-reentrant) of the declared blocks of the components that train:
    every `k`-th block of each (1: every block, 0: none), the 1st, (k+1)-th, ... as transformers counts."""
    lm = model.language_model
    if language and _trains(lm):
        lm.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=language)
    tower = model.vision_tower
    if not (vision and _trains(tower)):
        return
    if hasattr(tower, "hf_model"):
        tower.hf_model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=vision)
    elif vision == 1 and hasattr(tower, "timm_model"):
        tower.timm_model.set_grad_checkpointing(True)
    else:  # timm's own switch covers every block or none
        for i, block in enumerate(tower.blocks()):
            if i % vision == 0:
                checkpoint_block(block)


def checkpoint_block(block: nn.Module) -> None:
    """Make `block` recompute its activations in backward (its forward, so its hooks run once)."""
    block.forward = types.MethodType(_checkpointed_forward, block)


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    forward = type(block).forward.__get__(block)
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())
