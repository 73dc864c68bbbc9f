"""llava-lightning: LLaVA (vision encoder + projector + any Hugging Face causal LM) for PyTorch Lightning."""

from .data import LlavaDataModule
from .inference.generate import generate
from .model import LanguageSpec, LlavaModel, LlavaSpec, VisionSpec, get_preset
from .module import LlavaLitModule
from .prediction_writer import PredictionWriter

__all__ = [
    "LanguageSpec",
    "LlavaDataModule",
    "LlavaLitModule",
    "LlavaModel",
    "LlavaSpec",
    "PredictionWriter",
    "VisionSpec",
    "generate",
    "get_preset",
]
__version__ = "0.1.0"
