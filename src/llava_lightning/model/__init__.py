"""The model: vision towers, projectors, the language model, `LlavaModel` and its presets."""

from .llava import LlavaModel, LlavaOutput
from .presets import PRESETS, get_preset
from .specs import LanguageSpec, LlavaSpec, VisionSpec
from .vision_tower import VisionTower, build_vision_tower

__all__ = [
    "PRESETS",
    "LanguageSpec",
    "LlavaModel",
    "LlavaOutput",
    "LlavaSpec",
    "VisionSpec",
    "VisionTower",
    "build_vision_tower",
    "get_preset",
]
