"""Typed settings of `LlavaLitModule`: the optimizer and schedule, and LoRA (each field a CLI flag)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoraConfig:
    """LoRA settings for the `lora` stage (LLaVA-1.5 LoRA: r 128, alpha 256)."""

    r: int = 128
    """Adapter rank."""
    alpha: int = 256
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """LLM module names to adapt, or `all-linear` (every Linear except the LM head)."""


@dataclass
class OptimConfig:
    """AdamW with parameter groups and a warmup + cosine schedule."""

    lr: float = 2e-5
    """Learning rate of the LLM (and of everything without its own rate)."""
    projector_lr: float | None = None
    """Projector learning rate; None uses `lr`."""
    vision_lr: float | None = None
    """Learning rate of unfrozen vision blocks; None uses `lr`."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Linear warmup over this fraction of the total optimizer steps."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of each group's learning rate."""
