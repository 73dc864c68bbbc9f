"""Typed settings of `LlavaLitModule`: the optimizer and schedule, LoRA, QLoRA's quantization, activation
checkpointing (each field a CLI flag)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BlockChoice = Literal["none", "every"] | int
"""Which blocks of a component recompute their activations in backward: `none`, `every` block, or an
int k: every k-th block (the 1st, (k+1)-th, 2k+1-th, ..., as transformers counts); 1 is `every`."""


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
class QLoraConfig:
    """Quantization of the `qlora` stage (bitsandbytes; the adapters are `LoraConfig`'s): the LLM's linear
    layers, LM head excepted, stored in 4 bit (QLoRA: NF4, double quantization, bf16 compute)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the LLM's linear weights (NF4: QLoRA's normal-float levels)."""
    double_quant: bool = True
    """Quantize the per-block scales too (about 0.4 bit less per weight)."""
    blocksize: int = 64
    """Weights per quantization block (one scale each)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the 4-bit layers dequantize to and multiply in."""
    vision_8bit: bool = False
    """Also store the frozen vision tower's linear layers in 8 bit (LLM.int8(); needs bitsandbytes' int8
    kernels on the training device)."""


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


@dataclass
class CheckpointingConfig:
    """Activation checkpointing per component; a component left None follows `gradient_checkpointing`
    (true: every block, false: none). Only components that train are checkpointed."""

    vision: BlockChoice | None = None
    """Vision-tower blocks: none, every, or k (every k-th block); None follows gradient_checkpointing."""
    language: BlockChoice | None = None
    """LLM decoder layers: none, every, or k (every k-th layer); None follows gradient_checkpointing."""

    def __post_init__(self):
        for name in ("vision", "language"):
            choice = getattr(self, name)
            if choice is not None:
                every_k(choice, f"activation_checkpointing.{name}")

    def every(self, gradient_checkpointing: bool) -> dict[str, int]:
        """`{"vision_tower": k, "language_model": k}`: checkpoint every k-th block, 0 for none."""
        default = "every" if gradient_checkpointing else "none"
        return {
            "vision_tower": every_k(default if self.vision is None else self.vision),
            "language_model": every_k(default if self.language is None else self.language),
        }


def every_k(choice: BlockChoice, name: str = "checkpointing choice") -> int:
    """`none` -> 0, `every` -> 1, k >= 1 -> k; anything else a ValueError naming the choices."""
    if choice == "none":
        return 0
    if choice == "every":
        return 1
    if isinstance(choice, int) and not isinstance(choice, bool) and choice >= 1:
        return choice
    raise ValueError(f"{name} must be 'none', 'every' or an int k >= 1 (every k-th block), got {choice!r}")
