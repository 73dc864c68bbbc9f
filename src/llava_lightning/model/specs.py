"""Typed descriptions of the three parts of a LLaVA model (vision tower, projector, language model).

A spec is what a YAML file, a CLI flag or a preset holds; `LlavaModel.from_spec` turns it into modules.
Each part is built either from a hub name / local path (real weights) or, when `config` is given,
from a configuration with random initialisation (offline, no download).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class VisionSpec:
    """Which vision encoder to build and which of its features the projector reads."""

    name: str = "openai/clip-vit-large-patch14-336"
    """Hub name or local path (library=transformers), or timm model name (library=timm)."""
    library: Literal["transformers", "timm"] = "transformers"
    """Which library builds the encoder."""
    config: dict[str, Any] | None = None
    """If set, build with random init from this config instead of loading weights: transformers config
    fields including `model_type` (e.g. clip_vision_model), or `timm.create_model` keyword arguments."""
    feature_layer: int | list[int] = -2
    """Hidden-state index as in transformers (0 = embeddings, -1 = last block); a list concatenates on channels."""
    select_strategy: Literal["default", "full"] = "default"
    """`default` drops the CLS/prefix tokens, `full` keeps them."""
    image_mean: tuple[float, float, float] | None = None
    """Normalisation mean; None takes the encoder's own (image processor or timm data config)."""
    image_std: tuple[float, float, float] | None = None
    """Normalisation std; None takes the encoder's own."""


@dataclass
class LanguageSpec:
    """Which causal language model and tokenizer to build."""

    name: str = "lmsys/vicuna-7b-v1.5"
    """Hub name or local path of any AutoModelForCausalLM."""
    config: dict[str, Any] | None = None
    """If set, build with random init from this config (transformers fields including `model_type`)."""
    tokenizer: str | None = None
    """Tokenizer hub name or path; None uses `name`; `tiny:llama` / `tiny:chatml` build one offline."""
    use_fast_tokenizer: bool = True
    """Use the fast (Rust) tokenizer where one exists."""
    image_token: str = "<image>"
    """The special token that stands for one image feature vector."""
    pad_token: str = "<pad>"
    """Pad token added when the tokenizer has none."""
    pad_vocab_to_multiple_of: int = 64
    """Round the resized embedding matrix up to this multiple (llava-hf uses 64)."""
    attn_implementation: str | None = None
    """Attention kernel of the language model: `sdpa`, `eager`, `flex_attention`, `flash_attention_2`
    (needs the flash-attn package) or `llava_varlen` (torch's varlen kernel, CUDA); None: transformers'
    default. Packed batches (`data.pack_tokens`) keep samples apart on each of these."""
    trust_remote_code: bool = False
    """Let transformers run code that the hub repository or folder of `name` / `tokenizer` names (off unless
    you trust it). Only you switch it on, never a checkpoint: on `--ckpt_path` this is the command line's
    value, `export` takes `--trust_remote_code`, `LlavaLitModule.load_from_checkpoint` its
    `trust_remote_code` argument; a checkpoint's saved value is ignored (with a warning when it asked)."""


@dataclass
class LlavaSpec:
    """A whole LLaVA model: vision tower -> projector -> language model."""

    vision: VisionSpec = field(default_factory=VisionSpec)
    """The vision encoder."""
    projector: str = "mlp2x_gelu"
    """`linear`, `mlp{N}x_gelu` (N >= 2) or `identity`."""
    language: LanguageSpec = field(default_factory=LanguageSpec)
    """The language model and its tokenizer."""
    image_grid_pinpoints: list[list[int]] | None = None
    """LLaVA-NeXT "anyres": candidate resolutions `[[height, width], ...]` (multiples of the tower's input
    size) each image is tiled into, plus an overview and an `image_newline` per feature row (`anyres.py`);
    None: LLaVA-1.5, one tower input and a fixed token count per image."""
