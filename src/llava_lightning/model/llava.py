"""`LlavaModel`: vision tower -> projector -> causal LM, with image features scattered into the text.

Module names follow transformers' Llava (`vision_tower`, `multi_modal_projector`, `language_model`).
`input_ids` already hold one image-token id per image feature vector (the data pipeline expands
each `<image>`), exactly as transformers' processor does; images are consumed in order: sample 0's
images first, left to right, then sample 1's, and so on. Text-only samples simply hold no image ids.

With `image_grid_pinpoints` (LLaVA-NeXT "anyres", as transformers' `LlavaNextForConditionalGeneration`)
each image is several tower inputs (an overview and a grid of crops, `pixel_values` of all images' crops
in order) and `image_sizes` `[num_images, 2]` (height, width) give each image's layout: its overview's
features, then its crops' features unpadded to the image's aspect with the `image_newline` vector after
each row (`anyres.AnyresGeometry.feature_index`, shared with the data side's token count).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..anyres import AnyresGeometry
from ..batch import flat_positions, supervised_positions
from .language_model import build_language_model, decoder_block_class
from .linear_ce import CE_CHUNK_ROWS, linear_cross_entropy
from .packed_attention import packed_lm_kwargs
from .projector import build_projector
from .shapes import full_shape
from .specs import LlavaSpec
from .vision_tower import VisionTower, build_vision_tower

log = logging.getLogger(__name__)


@dataclass
class LlavaOutput(ModelOutput):
    """What `LlavaModel.forward` returns.

    A transformers `ModelOutput` (a dict and a registered pytree node), not a bare dataclass: FSDP2
    and DeepSpeed ZeRO-3 hook backward only on output tensors in containers they know (the GPU
    failure a bare dataclass caused: docs/experiments.md).
    """

    loss: torch.Tensor | None = None
    """Mean cross-entropy over supervised tokens (labels != -100), or None without labels."""
    logits: torch.Tensor | None = None
    """`[B, T, vocab]` logits, or None when `return_logits=False`."""
    loss_sum: torch.Tensor | None = None
    """Summed cross-entropy (for normalising over a whole accumulated optimizer step)."""
    num_supervised: torch.Tensor | None = None
    """Number of supervised tokens behind `loss`."""
    cache: Any = None
    """The language model's KV cache when it returned one."""


def _has_logit_postprocessing(config) -> bool:
    # Models that soft-cap or scale logits after lm_head (Gemma-2, Cohere, Granite) cannot use the
    # "lm_head on supervised positions only" shortcut; they take the language model's own forward.
    return bool(
        getattr(config, "final_logit_softcapping", None)
        or getattr(config, "logit_scale", 1.0) not in (None, 1.0)
        or getattr(config, "logits_scaling", 1.0) not in (None, 1.0)
    )


class LlavaModel(nn.Module):
    """A LLaVA model: `vision_tower`, `multi_modal_projector`, `language_model` (+ its tokenizer)."""

    def __init__(
        self,
        vision_tower: VisionTower,
        language_model: nn.Module,
        tokenizer: Any,
        image_token_id: int,
        projector: str = "mlp2x_gelu",
        image_grid_pinpoints: list[list[int]] | None = None,
    ):
        super().__init__()
        self.vision_tower = vision_tower
        hidden = full_shape(language_model.get_input_embeddings().weight)[1]
        self.multi_modal_projector = build_projector(projector, vision_tower.hidden_size, hidden)
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.projector_type = projector
        self.tower_on_text_only = False
        """Run tower + projector (on a blank image, adding zero) for image-less batches outside training
        too: set under sharding strategies, whose ranks must run the same modules (`LlavaLitModule.setup`)."""
        self.image_grid_pinpoints = (
            [list(map(int, p)) for p in image_grid_pinpoints] if image_grid_pinpoints else None
        )
        self.anyres: AnyresGeometry | None = None
        """The crop geometry of LLaVA-NeXT anyres (None: LLaVA-1.5, one tower input per image)."""
        self.image_newline: nn.Parameter | None = None
        """Anyres: the vector after each row of an image's crop features (transformers' `image_newline`)."""
        if self.image_grid_pinpoints:
            grid = math.isqrt(vision_tower.num_tokens)
            if grid * grid != vision_tower.num_tokens:
                raise ValueError(
                    f"image_grid_pinpoints (anyres) needs a square grid of patch features per crop; this tower "
                    f"gives {vision_tower.num_tokens} tokens per image: use select_strategy 'default' (CLS dropped)"
                )
            self.anyres = AnyresGeometry(vision_tower.image_size, grid, self.image_grid_pinpoints)
            embeddings = language_model.get_input_embeddings().weight
            # transformers' init: randn(hidden) / sqrt(hidden), in the embeddings' dtype.
            self.image_newline = nn.Parameter(
                torch.randn(hidden, dtype=embeddings.dtype, device=embeddings.device) / math.sqrt(hidden)
            )

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_spec(cls, spec: LlavaSpec, load_weights: bool = True) -> LlavaModel:
        """Build from a `LlavaSpec` (hub names load weights; `config` fields build random-init parts).

        `load_weights=False` reads only the hub configs; under `torch.device("meta")` that is the empty
        skeleton `LlavaLitModule(sharded_init=True)` shards before any weight is loaded.
        """
        tower = build_vision_tower(spec.vision, load_weights)
        lm, tokenizer, image_token_id = build_language_model(spec.language, load_weights)
        return cls(tower, lm, tokenizer, image_token_id, spec.projector, spec.image_grid_pinpoints)

    @classmethod
    def from_preset(cls, name: str) -> LlavaModel:
        """Build a named preset (`llava-1.5-7b`, `llava-1.5-13b`, `tiny`, ...; see `presets.PRESETS`)."""
        from .presets import get_preset

        return cls.from_spec(get_preset(name))

    @classmethod
    def from_hf(cls, path: str | Path, **kwargs) -> LlavaModel:
        """Load a llava-hf checkpoint (folder or hub name), e.g. `llava-hf/llava-1.5-7b-hf`, or a llava-next
        one (`llava-hf/llava-v1.6-vicuna-7b-hf`; dispatched on the config's `model_type`); keyword arguments
        as `hf_interop.load_hf` (`trust_remote_code`, `load_weights`, `attn_implementation`)."""
        from .hf_interop_next import is_llava_next

        if is_llava_next(str(path), kwargs.get("trust_remote_code", False)):
            from .hf_interop_next import load_hf_next

            return load_hf_next(cls, str(path), **kwargs)
        from .hf_interop import load_hf

        return load_hf(cls, str(path), **kwargs)

    def save_hf(
        self,
        path: str | Path,
        template: str | None = None,
        image_aspect: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        """Write a folder that `LlavaForConditionalGeneration` (anyres: `LlavaNextForConditionalGeneration`)
        and `AutoProcessor.from_pretrained` load; with `template` / `image_aspect`, also the training
        settings `--model.pretrained` reads back (`pretrained.SETTINGS_FILE`). `image_aspect="pad"` makes
        the processor pad to square as training did; `chat_template` (the Jinja of `template`:
        `data.chat_template.jinja_chat_template`, as `export` passes it) goes into processor and tokenizer."""
        from .hf_interop import save_hf
        from .hf_interop_next import save_hf_next
        from .pretrained import write_settings

        if self.anyres is not None:
            save_hf_next(self, Path(path), chat_template)
        else:
            save_hf(self, Path(path), image_aspect, chat_template)
        if template is not None or image_aspect is not None:
            write_settings(path, template, image_aspect)

    def init_projector_from(self, path: str | Path) -> None:
        """Load projector weights from our artifact (`.safetensors`) or LLaVA's `mm_projector.bin`."""
        from .projector_io import load_projector_state

        state = load_projector_state(Path(path), self.projector_type)
        self.multi_modal_projector.load_state_dict(state, strict=True)
        log.info("projector initialised from %s", path)

    # ----------------------------------------------------------------------------- scaling contract
    def block_classes(self) -> dict[str, type[nn.Module]]:
        """The transformer-block class of each component (units to shard and checkpoint)."""
        return {
            "vision_tower": self.vision_tower.block_class,
            "language_model": decoder_block_class(self.language_model),
        }

    # ----------------------------------------------------------------------------- forward
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        image_feature_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected image features `[num_images, num_tokens, hidden]`; anyres: `[num_image_tokens, hidden]`,
        every image's tokens in order (`pack_image_features`).

        `pixel_values` are normalised floats, or uint8 `[N, 3, S, S]` straight from the data loader
        (4x less to move between processes); uint8 is normalised here, on the model's device.
        """
        if self.anyres is None:
            return self.tower_features(pixel_values)
        if pixel_values.dim() == 5:  # transformers' layout: [images, max crops, 3, S, S], zero-padded
            if image_sizes is None:
                raise ValueError("anyres pixel_values [images, crops, 3, S, S] need image_sizes")
            counts = [self.anyres.num_crops(h, w) for h, w in image_sizes.tolist()]
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, counts)])
        features = self.tower_features(pixel_values)
        return self.pack_image_features(features, image_sizes, image_feature_index)

    def pack_image_features(
        self,
        features: torch.Tensor,
        image_sizes: torch.Tensor | None,
        image_feature_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Anyres: the crops' projected features `[num_crops, grid^2, hidden]` -> `[num_image_tokens, hidden]`
        (each image: overview, unpadded crop rows each followed by `image_newline`), gathered by index.

        `image_feature_index` (the collator's `anyres.feature_index`, made on the CPU) spares reading
        `image_sizes` on the host (a sync); without it the index is made here from `image_sizes`."""
        if image_feature_index is None:
            if image_sizes is None:
                raise ValueError(
                    "anyres (image_grid_pinpoints) needs image_sizes [num_images, 2] (height, width) with pixel_values"
                )
            sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
            crops = sum(self.anyres.num_crops(h, w) for h, w in sizes)
            if crops != features.shape[0]:
                raise ValueError(
                    f"pixel_values hold {features.shape[0]} crops but image_sizes {sizes} make {crops} "
                    "(each image: its overview and crop grid, anyres.AnyresGeometry.num_crops)"
                )
            image_feature_index = self.anyres.feature_index(sizes)
        flat = features.reshape(-1, features.shape[-1])
        rows = torch.cat([flat, self.image_newline[None].to(flat.dtype)])
        return rows.index_select(0, image_feature_index.to(rows.device))

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features of each tower input, `[N, num_tokens, hidden]`."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = self.normalize_pixels(pixel_values)
        tower = self.vision_tower
        # A frozen tower runs without building a graph (stage 1 and 2 never backpropagate into it).
        frozen = not any(p.requires_grad for p in tower.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            features = tower(pixel_values)
        return self.project(features)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector on vision-tower features, cast first to the projector's dtype (a frozen tower
        may be stored in another one, e.g. bf16 under FSDP2); `identity` has no weights, and its
        output is cast to the embeddings' dtype where it is scattered (`embed`)."""
        weight = next(self.multi_modal_projector.parameters(), None)
        return self.multi_modal_projector(features if weight is None else features.to(weight.dtype))

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 `[N, 3, H, W]` -> `(x / 255 - mean) / std` in float32 with the tower's mean and std."""
        tower = self.vision_tower
        mean, std = _channels(tower.image_mean, pixels), _channels(tower.image_std, pixels)
        return (pixels.float() / 255.0 - mean) / std

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_positions: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_feature_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings with image features scattered over the image-token positions.

        `vision_features` (the tower's output, e.g. computed without a graph for a frozen tower)
        replace `pixel_values`; the projector runs on them here. `image_positions` (the collator's
        flat positions of the image-token ids) spare the host-device sync of finding them here.
        Anyres: `image_sizes` / `image_feature_index` as for `pack_image_features`.
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if image_positions is None:
            image_positions = flat_positions(input_ids == self.image_token_id)
        n_tokens = image_positions.numel()  # a shape: known on the host without a sync
        if vision_features is not None:
            features = self.project(vision_features)
            if self.anyres is not None:
                features = self.pack_image_features(features, image_sizes, image_feature_index)
        elif pixel_values is None or pixel_values.shape[0] == 0:
            if n_tokens:
                raise ValueError(
                    f"Image features and image tokens do not match: {n_tokens} image tokens in input_ids "
                    "but no pixel_values were given"
                )
            if not (self.training and torch.is_grad_enabled()) and not self.tower_on_text_only:
                return embeds
            # A batch without images (text-only samples), in training or under a sharding strategy: the
            # tower and projector still run, on a blank image, adding zero, so every rank runs the same
            # modules in the same order whatever its batch holds (ZeRO and FSDP gather parameters
            # module by module, collectively, in validation too; DDP expects a gradient for every
            # trainable parameter), as LLaVA does.
            size = self.vision_tower.image_size
            blank = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=input_ids.device)
            zero = self.tower_features(blank).sum()
            if self.image_newline is not None:
                zero = zero + self.image_newline.sum()
            return embeds + zero.to(embeds.dtype) * 0.0
        else:
            features = self.get_image_features(pixel_values, image_sizes, image_feature_index)
        if features.dim() == 2:  # anyres: each image its own count
            n_features = features.shape[0]
            what = "anyres image_sizes give"
        else:
            n_features = features.shape[0] * features.shape[1]
            what = f"{features.shape[0]} images x {features.shape[1]} tokens"
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: {n_tokens} image tokens in input_ids, "
                f"{n_features} image feature vectors ({what}); each image needs exactly that many image-token ids"
            )
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        # index_copy, not masked_scatter: its backward gathers by index (masked_select would sync).
        return embeds.reshape(-1, embeds.shape[-1]).index_copy(0, image_positions, features).view_as(embeds)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = True,
        vision_features: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        image_positions: torch.Tensor | None = None,
        supervised_positions: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_feature_index: torch.Tensor | None = None,
        **lm_kwargs: Any,
    ) -> LlavaOutput:
        """Loss (mean over tokens with label != -100, next-token shifted) and logits.

        With `return_logits=False` and labels, the LM head runs only on supervised positions (the
        training path: image and prompt positions need no vocabulary projection).

        Packed rows (several samples per row, `data/packing.py`): `position_ids` restarting at 0 at each
        sample, `attention_mask=None`, and for varlen kernels `cu_seqlens` / `max_seqlen`; no token
        attends across a sample boundary (`packed_attention.py`).
        `image_positions` / `supervised_positions` (`LlavaBatch`'s, from the collator) make the step
        free of host-device syncs; without them they are computed here. Anyres models take `image_sizes`
        (and the collator's `image_feature_index`) with `pixel_values` (`pack_image_features`).
        """
        embeds = self.embed(
            input_ids, pixel_values, vision_features, image_positions, image_sizes, image_feature_index
        )
        if labels is not None:
            # A loss needs no KV cache; transformers would build one by default, copying every layer's K/V.
            lm_kwargs.setdefault("use_cache", False)
        lm = self.language_model
        if position_ids is not None and attention_mask is None:
            implementation = getattr(lm.config, "_attn_implementation", None)
            lm_kwargs.update(packed_lm_kwargs(implementation, cu_seqlens, max_seqlen))
        shortcut = labels is not None and not return_logits and not _has_logit_postprocessing(lm.config)
        if not shortcut:
            out = lm(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **lm_kwargs
            )
            logits = out.logits
            result = LlavaOutput(logits=logits if return_logits else None, cache=_cache_of(out))
            if labels is not None:
                result.loss, result.loss_sum, result.num_supervised = _shifted_ce(
                    logits, labels, None, supervised_positions
                )
            return result
        decoder = lm.get_decoder()
        out = decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **lm_kwargs
        )
        loss, loss_sum, count = _shifted_ce(out[0], labels, lm.get_output_embeddings(), supervised_positions)
        return LlavaOutput(loss=loss, loss_sum=loss_sum, num_supervised=count, cache=_cache_of(out))

    # ----------------------------------------------------------------------------- generation
    def generate_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ):
        """New token ids for left-padded prompts (see `generation.generate_ids`)."""
        from .generation import generate_ids

        return generate_ids(self, input_ids, attention_mask, **kwargs)


def _channels(values, like: torch.Tensor) -> torch.Tensor:
    """`[1, 3, 1, 1]` per-channel constants made on `like`'s device by fills: a host tensor copied
    there would make the host wait for the device on every step."""
    return torch.stack([torch.full((), float(v), device=like.device) for v in values]).view(1, -1, 1, 1)


def _cache_of(out) -> Any:
    # Item access, not attributes: transformers 5 keeps a deprecated `past_key_values` property that warns.
    if not hasattr(out, "get"):
        return None
    cache = out.get("cache")
    if cache is None and "past_key_values" in out.keys():  # an output class that kept the old name
        cache = out["past_key_values"]
    return cache


def _shifted_ce(
    states: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module | None,
    positions: torch.Tensor | None = None,
    chunk: int = CE_CHUNK_ROWS,
):
    """Next-token cross-entropy over supervised positions; `states` are logits, or hidden states for `head`.

    `positions`: the flat positions `b * T + t` whose next token is scored (`batch.supervised_positions`;
    computed here when None, with a host sync). Rows are gathered by index and scored `chunk` at a
    time (`linear_ce.py`): no fp32 `[rows, vocab]` tensor at once, no boolean-mask gather.
    """
    if positions is None:
        positions = supervised_positions(labels)
    flat = states.reshape(-1, states.shape[-1])
    targets = labels.reshape(-1).index_select(0, positions + 1)
    if head is not None:
        loss_sum = linear_cross_entropy(flat.index_select(0, positions), head, targets, chunk)
    else:
        loss_sum = flat.new_zeros((), dtype=torch.float32)
        for start in range(0, positions.numel(), chunk):
            rows = positions[start : start + chunk]
            logits = flat.index_select(0, rows).float()
            loss_sum = loss_sum + F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    # From the positions' shape: a fill, not a host-to-device copy.
    count = torch.full((), positions.numel(), dtype=torch.long, device=labels.device)
    return loss_sum / count.clamp(min=1), loss_sum, count
