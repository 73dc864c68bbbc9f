"""Export to and import from transformers' llava-next format (`LlavaNextForConditionalGeneration` +
`LlavaNextProcessor`): LLaVA-1.5's layout (`hf_interop.py`) plus `model.image_newline` and the
config's `image_grid_pinpoints`.

Key map (ours -> transformers): as `hf_interop.to_hf_state_dict`, and `image_newline` ->
`model.image_newline`. Export builds the HF model on the meta device and assigns our tensors; import
reuses the loaded HF modules directly. The processor written beside the weights
(`LlavaNextImageProcessor` with the tower's size, mean and std and the pinpoints) reproduces
`data.anyres_image.AnyresTransform`'s pixels and the data's image-token counts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .hf_interop import (
    _check_exportable,
    assign_projector,
    build_hf_config,
    load_hf_parts,
    write_hf,
)

log = logging.getLogger(__name__)


def is_llava_next(path: str, trust_remote_code: bool = False) -> bool:
    """True when the checkpoint at `path` (folder or hub name) is a llava-next one (`model_type`)."""
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            return json.load(f).get("model_type") == "llava_next"
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type == "llava_next"


def build_hf_next_config(model):
    """The `LlavaNextConfig` describing anyres `model`."""
    from transformers import LlavaNextConfig

    fields = build_hf_config(model).to_dict()
    keep = (
        "image_token_index",
        "projector_hidden_act",
        "vision_feature_select_strategy",
        "vision_feature_layer",
        "image_seq_length",
        "multimodal_projector_bias",
        "tie_word_embeddings",
    )
    return LlavaNextConfig(
        vision_config=model.vision_tower.config.to_dict(),
        text_config=model.language_model.config.to_dict(),
        image_grid_pinpoints=[list(p) for p in model.image_grid_pinpoints],
        **{k: fields[k] for k in keep},
    )


def build_hf_next_processor(model, chat_template: str | None = None):
    """A `LlavaNextProcessor` whose image processor and token counts reproduce our anyres data, with
    `chat_template`."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    tower = model.vision_tower
    tile = tower.image_size
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in model.image_grid_pinpoints],
        image_mean=list(tower.image_mean),
        image_std=list(tower.image_std),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=model.tokenizer,
        patch_size=int(tower.config.patch_size),
        vision_feature_select_strategy=build_hf_config(model).vision_feature_select_strategy,
        num_additional_image_tokens=tower.num_prefix_tokens,
        image_token=model.tokenizer.convert_ids_to_tokens(model.image_token_id),
        chat_template=chat_template,
    )


def save_hf_next(model, path: Path, chat_template: str | None = None) -> None:
    """Write anyres `model` as a llava-next folder (config, safetensors weights, processor with
    `chat_template`, tokenizer)."""
    from transformers import LlavaNextForConditionalGeneration

    _check_exportable(model)
    processor = build_hf_next_processor(model, chat_template)
    write_hf(
        model, LlavaNextForConditionalGeneration, build_hf_next_config(model), processor, path, chat_template
    )


def load_hf_next(
    cls,
    path: str,
    trust_remote_code: bool = False,
    load_weights: bool = True,
    attn_implementation: str | None = None,
):
    """Build our `cls` (LlavaModel, anyres) from a llava-next folder or hub name, reusing the loaded modules;
    arguments and steps as `hf_interop.load_hf`, plus the pinpoints and `image_newline`."""
    from transformers import LlavaNextForConditionalGeneration

    hf, processor, tower, lm, tokenizer = load_hf_parts(
        LlavaNextForConditionalGeneration,
        "llava_next",
        path,
        trust_remote_code,
        load_weights,
        attn_implementation,
    )
    pinpoints = [list(map(int, p)) for p in hf.config.image_grid_pinpoints]
    theirs = [list(p) for p in getattr(processor, "image_grid_pinpoints", None) or []]
    if theirs and theirs != pinpoints:
        log.warning(
            "%s: the image processor's pinpoints %s differ from the model config's %s; using the config's",
            path,
            theirs,
            pinpoints,
        )
    model = cls(tower, lm, tokenizer, hf.config.image_token_id, "mlp2x_gelu", pinpoints)
    assign_projector(model, hf)
    model.image_newline = hf.model.image_newline
    return model
