"""The vision-tower interface shared by Hugging Face and timm encoders, and the factory that builds one.

Every tower maps `pixel_values [B, 3, S, S]` to features `[B, num_tokens, hidden_size]` and reports
what the rest of the system needs: the token count (how many `<image>` ids a sample holds), the
feature width (projector input), the input size, mean and std (the image transform) and its
transformer-block class (the unit to shard and checkpoint).
"""

from __future__ import annotations

from torch import nn

from .specs import VisionSpec

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionTower(nn.Module):
    """Base class: subclasses set these attributes in `__init__` and implement `forward`."""

    num_tokens: int
    """Feature vectors per image (after the select strategy)."""
    hidden_size: int
    """Feature width (encoder width x number of feature layers)."""
    image_size: int
    """Square input resolution in pixels."""
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    block_class: type[nn.Module]
    """The transformer block class (for FSDP wrapping and activation checkpointing)."""
    feature_layer: int | list[int]
    select_strategy: str
    blocks_run: int
    """How many leading blocks run (those after the deepest feature layer are skipped)."""

    def blocks(self) -> list[nn.Module]:
        """The tower's transformer blocks in order (for unfreezing the last k, sharding, checkpointing)."""
        return [m for m in self.modules() if isinstance(m, self.block_class)]


def check_select_strategy(select_strategy: str) -> None:
    """Refuse anything but LLaVA's two token-selection strategies."""
    if select_strategy not in ("default", "full"):
        raise ValueError(f"select_strategy must be 'default' or 'full', got {select_strategy!r}")


def normalize_feature_layers(feature_layer: int | list[int], num_layers: int) -> list[int]:
    """Map transformers-style hidden-state indices (0 = embeddings, -1 = last block) to 0..num_layers."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    if not layers:
        raise ValueError("feature_layer must name at least one layer")
    out = []
    for layer in layers:
        idx = layer if layer >= 0 else num_layers + 1 + layer
        if not 0 <= idx <= num_layers:
            raise ValueError(
                f"feature_layer {layer} is out of range for an encoder with {num_layers} blocks "
                f"(valid: {-num_layers - 1}..{num_layers})"
            )
        out.append(idx)
    return out


def build_vision_tower(spec: VisionSpec, load_weights: bool = True) -> VisionTower:
    """Build the tower described by `spec` (weights from the hub/path, or random init from `spec.config`;
    `load_weights=False`: a hub-named tower from its config alone)."""
    if spec.library == "transformers":
        from .vision_hf import HFVisionTower

        return HFVisionTower.from_spec(spec, load_weights)
    if spec.library == "timm":
        from .vision_timm import TimmVisionTower

        return TimmVisionTower.from_spec(spec, load_weights)
    raise ValueError(f"unknown vision library {spec.library!r}: use 'transformers' or 'timm'")
