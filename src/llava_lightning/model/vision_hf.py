"""Vision towers from transformers (CLIP, SigLIP, any AutoModel vision config).

The Hugging Face vision model's own children are registered directly on this module, so the
state-dict keys are exactly the HF model's (`vision_model.encoder.layers.0...`): export to
llava-hf is a key copy. Blocks after the deepest feature layer are kept (they are part of the
checkpoint) but not run: LLaVA-1.5 reads layer -2, so the last CLIP block is dead compute.
"""

from __future__ import annotations

import torch
from torch import nn

from .specs import VisionSpec
from .vision_tower import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionTower,
    check_select_strategy,
    normalize_feature_layers,
)

_DEFAULT_NORM = {
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip2_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class _LeadingBlocks(nn.ModuleList):
    """A ModuleList that iterates only over its first `run` entries.

    Sharp edge, on purpose: the encoder's `for layer in self.layers` loop then stops after the
    deepest block we read, while every block stays registered (state dict, export, `.to()`).
    Blocks past `run` never see data, so they are also kept out of training (requires_grad False).
    """

    def __init__(self, modules, run: int):
        super().__init__(modules)
        self.run = run

    def __iter__(self):
        return iter(list(self._modules.values())[: self.run])


def _find_block_list(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """The first ModuleList of `num_layers` blocks of one class (the encoder's layers)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if (
                isinstance(child, nn.ModuleList)
                and len(child) == num_layers
                and len({type(m) for m in child}) == 1
            ):
                return parent, name, child
    raise ValueError(f"cannot find the {num_layers} transformer blocks of {type(model).__name__}")


def _vision_config(config):
    """The vision sub-config of a full (e.g. CLIPConfig) or vision-only config."""
    return getattr(config, "vision_config", None) or config


class HFVisionTower(VisionTower):
    """A transformers vision model with LLaVA's feature-layer and token selection."""

    def __init__(
        self,
        hf_model: nn.Module,
        feature_layer: int | list[int] = -2,
        select_strategy: str = "default",
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
    ):
        super().__init__()
        check_select_strategy(select_strategy)
        if list(hf_model.named_parameters(recurse=False)):
            raise ValueError(f"{type(hf_model).__name__} holds parameters outside its submodules")
        # The HF model runs the forward; its children are ours too (same objects), so keys match HF.
        self.__dict__["hf_model"] = hf_model
        for name, child in hf_model.named_children():
            self.add_module(name, child)

        config = hf_model.config
        self.config = config
        num_layers = config.num_hidden_layers
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        self._layers = normalize_feature_layers(feature_layer, num_layers)
        parent, attr, blocks = _find_block_list(hf_model, num_layers)
        self.block_class = type(blocks[0])
        # transformers collects hidden states as blocks run, so even feature layer 0 (the embeddings)
        # needs one block to run for `hidden_states[0]` to exist.
        run = self.blocks_run = max(max(self._layers), 1)
        if run < num_layers:
            setattr(parent, attr, _LeadingBlocks(list(blocks), run))
            for block in list(blocks)[run:]:
                block.requires_grad_(False)

        self.image_size = int(config.image_size)
        patch = int(config.patch_size)
        grid = self.image_size // patch
        embeddings = getattr(hf_model, "vision_model", hf_model).embeddings
        num_positions = getattr(embeddings, "num_positions", grid * grid)
        self.num_prefix_tokens = int(num_positions - getattr(embeddings, "num_patches", grid * grid))
        self.num_tokens = grid * grid + (self.num_prefix_tokens if select_strategy == "full" else 0)
        self.hidden_size = int(config.hidden_size) * len(self._layers)
        default_mean, default_std = _DEFAULT_NORM.get(config.model_type, (IMAGENET_MEAN, IMAGENET_STD))
        self.image_mean = tuple(image_mean or default_mean)
        self.image_std = tuple(image_std or default_std)

    @classmethod
    def from_spec(cls, spec: VisionSpec, load_weights: bool = True) -> HFVisionTower:
        from transformers import AutoConfig, AutoModel

        mean, std = spec.image_mean, spec.image_std
        if spec.config is not None:
            cfg = dict(spec.config)
            model_type = cfg.pop("model_type", "clip_vision_model")
            config = AutoConfig.for_model(model_type, **cfg)
            hf_model = AutoModel.from_config(_vision_config(config))
        else:
            hf_model = _load_vision_model(spec.name, load_weights)
            if mean is None or std is None:
                from transformers import AutoImageProcessor

                processor = AutoImageProcessor.from_pretrained(spec.name, trust_remote_code=False)
                mean = mean or tuple(processor.image_mean)
                std = std or tuple(processor.image_std)
        return cls(hf_model, spec.feature_layer, spec.select_strategy, mean, std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        out = self.hf_model(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        feats = [out.hidden_states[i] for i in self._layers]
        if self.select_strategy == "default":
            feats = [f[:, self.num_prefix_tokens :] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)


def _load_vision_model(name: str, load_weights: bool = True) -> nn.Module:
    """Load only the vision half of a hub checkpoint (e.g. CLIPVisionModel from a full CLIP repo);
    `load_weights=False` builds it from the config alone."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    vision_config = _vision_config(AutoConfig.from_pretrained(name, trust_remote_code=False))
    model_class = MODEL_MAPPING[type(vision_config)]
    if not load_weights:
        return model_class(vision_config)
    return model_class.from_pretrained(name, config=vision_config)
