"""Vision towers from timm (any ViT-style model with `forward_intermediates`).

Feature layers use the transformers convention (index k >= 1 = output of block k, -1 = last
block); index 0 (the patch embeddings) is not offered by timm and is refused. The attribute is
named `timm_model`, as in transformers' TimmWrapperModel.
"""

from __future__ import annotations

import torch

from .specs import VisionSpec
from .vision_tower import VisionTower, check_select_strategy, normalize_feature_layers


class TimmVisionTower(VisionTower):
    """A timm ViT (built with `num_classes=0`) with LLaVA's feature-layer and token selection."""

    def __init__(
        self,
        timm_model: torch.nn.Module,
        feature_layer: int | list[int] = -2,
        select_strategy: str = "default",
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
    ):
        super().__init__()
        import timm.data

        check_select_strategy(select_strategy)
        if not hasattr(timm_model, "forward_intermediates") or not hasattr(timm_model, "blocks"):
            raise ValueError(
                f"timm model {type(timm_model).__name__} has no forward_intermediates/blocks: "
                "use a ViT-style model (vit_*, eva*, deit*, ...)"
            )
        self.timm_model = timm_model
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        num_blocks = len(timm_model.blocks)
        layers = normalize_feature_layers(feature_layer, num_blocks)
        if 0 in layers:
            raise ValueError("timm towers cannot return the patch embeddings (feature_layer 0); pick a block")
        self._blocks = [i - 1 for i in layers]  # timm block indices, in the requested order
        self.blocks_run = max(layers)  # forward_intermediates(stop_early=True) runs no further
        self.block_class = type(timm_model.blocks[0])
        self.num_prefix_tokens = int(getattr(timm_model, "num_prefix_tokens", 0))
        data_cfg = timm.data.resolve_data_config(model=timm_model)
        self.image_size = int(timm_model.patch_embed.img_size[-1])
        grid = timm_model.patch_embed.grid_size
        self.num_tokens = grid[0] * grid[1] + (self.num_prefix_tokens if select_strategy == "full" else 0)
        self.hidden_size = int(timm_model.embed_dim) * len(layers)
        self.image_mean = tuple(image_mean or data_cfg["mean"])
        self.image_std = tuple(image_std or data_cfg["std"])

    @classmethod
    def from_spec(cls, spec: VisionSpec, load_weights: bool = True) -> TimmVisionTower:
        import timm

        kwargs = dict(spec.config or {})
        pretrained = spec.config is None and load_weights
        kwargs["num_classes"] = 0
        model = timm.create_model(spec.name, pretrained=pretrained, **kwargs)
        return cls(model, spec.feature_layer, spec.select_strategy, spec.image_mean, spec.image_std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        wanted = sorted(set(self._blocks))
        out = self.timm_model.forward_intermediates(
            pixel_values.to(dtype),
            indices=wanted,
            return_prefix_tokens=True,
            stop_early=True,  # blocks after the deepest wanted one are not run
            output_fmt="NLC",
            intermediates_only=True,
            output_dict=True,
        )
        spatial = dict(zip(wanted, out["image_intermediates"]))
        prefix = dict(zip(wanted, out.get("image_intermediates_prefix") or [None] * len(wanted)))
        feats = []
        for b in self._blocks:
            f = spatial[b]
            if self.select_strategy == "full" and prefix[b] is not None:
                f = torch.cat([prefix[b], f], dim=1)
            feats.append(f)
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
