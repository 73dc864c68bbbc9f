"""llava-lightning: LLaVA (vision encoder + projector + any Hugging Face causal LM) for PyTorch Lightning."""

from .model import LanguageSpec, LlavaModel, LlavaSpec, VisionSpec, get_preset

__all__ = ["LanguageSpec", "LlavaModel", "LlavaSpec", "VisionSpec", "get_preset"]
__version__ = "0.1.0"
