"""Data: decoding and transforming images, conversation templates, datasets and loaders."""

from .captions import CaptionShards
from .collate import LlavaCollator
from .datamodule import DataSkipError, LlavaDataModule, SourceConfig
from .image import ImageDecodeError, ImageTransform, decode_image
from .instruct import InstructionDataset, InstructionIndex
from .mixture import WeightedMixture
from .sample import SampleEncoder, StrictModeError
from .templates import SampleError, get_template

__all__ = [
    "CaptionShards",
    "DataSkipError",
    "ImageDecodeError",
    "ImageTransform",
    "InstructionDataset",
    "InstructionIndex",
    "LlavaCollator",
    "LlavaDataModule",
    "SampleEncoder",
    "SampleError",
    "SourceConfig",
    "StrictModeError",
    "WeightedMixture",
    "decode_image",
    "get_template",
]
