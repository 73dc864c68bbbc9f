"""Export to and import from transformers' llava-hf format (`LlavaForConditionalGeneration` + processor).

Key map (ours -> transformers): `vision_tower.*` -> `model.vision_tower.*`,
`multi_modal_projector.*` -> `model.multi_modal_projector.*`, `language_model.<base>.*` ->
`model.language_model.*`, `language_model.lm_head.*` -> `lm_head.*`. Export builds the HF model on
the meta device and assigns our tensors (no copy, no second random init), then lets transformers
write its own format. Import reuses the loaded HF modules directly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .packed_attention import VARLEN, register_varlen_attention
from .vision_hf import HFVisionTower

log = logging.getLogger(__name__)


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' Llava key names."""
    lm = model.language_model
    base = lm.base_model_prefix
    head = [n for n, m in lm.named_children() if m is lm.get_output_embeddings()]
    out = {}
    for key, value in model.state_dict().items():
        if key == "image_newline":  # anyres (llava-next, hf_interop_next.py): same place in transformers
            out["model.image_newline"] = value
            continue
        part, rest = key.split(".", 1)
        if part in ("vision_tower", "multi_modal_projector"):
            out[f"model.{key}"] = value
        elif rest.startswith(base + "."):
            out["model.language_model." + rest[len(base) + 1 :]] = value
        elif head and rest.startswith(head[0] + "."):
            out["lm_head." + rest[len(head[0]) + 1 :]] = value
        else:
            raise ValueError(f"cannot place {key!r} in transformers' Llava layout")
    return out


def _check_exportable(model) -> None:
    if not isinstance(model.vision_tower, HFVisionTower):
        raise ValueError(
            f"save_hf: transformers' Llava cannot represent a {type(model.vision_tower).__name__}: its "
            "TimmWrapper returns NCHW intermediates without prefix tokens, so LLaVA's feature-layer and "
            "token selection would differ. Export needs a transformers vision tower (CLIP, SigLIP, ...); "
            "save the Lightning checkpoint or state dict instead."
        )
    if model.projector_type != "mlp2x_gelu":
        raise ValueError(
            f"save_hf: transformers' LlavaMultiModalProjector is Linear-GELU-Linear (mlp2x_gelu); this model's "
            f"projector is {model.projector_type!r}, which llava-hf cannot hold"
        )


def build_hf_config(model):
    """The `LlavaConfig` describing `model`."""
    from transformers import LlavaConfig

    tower = model.vision_tower
    lm_config = model.language_model.config
    strategy = tower.select_strategy
    if tower.num_prefix_tokens == 0:
        # transformers' "default" always drops one token; with no CLS token, "full" is the same selection.
        strategy = "full"
    return LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=lm_config.to_dict(),
        image_token_index=model.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=tower.feature_layer,
        image_seq_length=tower.num_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm_config, "tie_word_embeddings", False)),
    )


def build_hf_processor(model, image_aspect: str | None = None, chat_template: str | None = None):
    """A `LlavaProcessor` whose image processor reproduces the tower's input transform for `image_aspect`
    (`pad`: `LlavaImageProcessor` with `do_pad`, which pads to a centred square filled with
    `int(255 * mean)` before the resize, as `data.image.ImageTransform` does), with `chat_template`."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaProcessor

    tower = model.vision_tower
    size = tower.image_size
    if image_aspect == "pad":
        clip = tower.config.model_type == "clip_vision_model"
        image_processor = LlavaImageProcessor(
            do_pad=True,
            size={"shortest_edge": size} if clip else {"height": size, "width": size},
            crop_size={"height": size, "width": size},
            do_center_crop=clip,
            image_mean=list(tower.image_mean),
            image_std=list(tower.image_std),
        )
    elif tower.config.model_type == "clip_vision_model":
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_center_crop=True,
            image_mean=list(tower.image_mean),
            image_std=list(tower.image_std),
        )
    else:
        image_processor = CLIPImageProcessor(
            size={"height": size, "width": size},
            do_center_crop=False,
            image_mean=list(tower.image_mean),
            image_std=list(tower.image_std),
        )
    strategy = build_hf_config(model).vision_feature_select_strategy
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=model.tokenizer,
        patch_size=int(tower.config.patch_size),
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=tower.num_prefix_tokens,
        image_token=model.tokenizer.convert_ids_to_tokens(model.image_token_id),
        chat_template=chat_template,
    )


def save_processor(processor, path: Path, chat_template: str | None) -> None:
    """Write `processor` (with its tokenizer) into `path`; the tokenizer carries `chat_template` too, so
    `AutoTokenizer` users and engines reading the tokenizer's template get the same prompts."""
    tokenizer = processor.tokenizer
    before = getattr(tokenizer, "chat_template", None)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    try:
        processor.save_pretrained(str(path))
    finally:  # the live model's tokenizer is left as it was
        tokenizer.chat_template = before


def write_hf(model, hf_cls, config, processor, path: Path, chat_template: str | None) -> None:
    """`model`'s weights as `hf_cls(config)` (a key copy onto meta tensors, no copies of the data), saved
    with `processor` into `path`; the steps `save_hf` and `hf_interop_next.save_hf_next` share."""
    with torch.device("meta"):
        hf = hf_cls(config)
    state = to_hf_state_dict(model)
    expected = set(hf.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"save_hf: key mismatch, missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    hf.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(path))
    save_processor(processor, path, chat_template)
    log.info("wrote %s folder %s", config.model_type, path)


def save_hf(model, path: Path, image_aspect: str | None = None, chat_template: str | None = None) -> None:
    """Write `model` as a llava-hf folder (config, safetensors weights, processor, tokenizer): the
    processor pads to square for `image_aspect="pad"` and carries `chat_template`."""
    from transformers import LlavaForConditionalGeneration

    _check_exportable(model)  # before the config: its messages name what transformers cannot hold
    processor = build_hf_processor(model, image_aspect, chat_template)
    write_hf(model, LlavaForConditionalGeneration, build_hf_config(model), processor, path, chat_template)


def load_hf_parts(hf_cls, model_type: str, path: str, trust_remote_code: bool, load_weights: bool,
                  attn_implementation: str | None):  # fmt: skip
    """The steps `load_hf` and `hf_interop_next.load_hf_next` share: `(hf model, image processor or None,
    tower, language model, tokenizer)` of a folder whose config is `model_type` (`hf_cls` loads it). The
    language model is assembled around the loaded decoder and head, nothing copied."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if cfg.model_type != model_type:
        raise ValueError(
            f"{path}: model_type {cfg.model_type!r} is not a {model_type} checkpoint (model_type "
            f"{model_type!r}, {hf_cls.__name__})"
        )
    if not cfg.multimodal_projector_bias or cfg.projector_hidden_act != "gelu":
        raise ValueError(
            f"{path}: projector without bias or with {cfg.projector_hidden_act!r} activation is not supported "
            "(llava_lightning's mlp2x_gelu has biases and exact GELU)"
        )
    if load_weights:
        hf = hf_cls.from_pretrained(path, config=cfg, trust_remote_code=trust_remote_code)
    else:
        hf = hf_cls(cfg)
    cfg = hf.config
    processor = mean = std = None
    try:
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError):
        log.warning("%s has no image processor; using the vision tower's default normalisation", path)
    tower = HFVisionTower(
        hf.model.vision_tower, cfg.vision_feature_layer, cfg.vision_feature_select_strategy, mean, std
    )
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg.text_config)
    setattr(lm, lm.base_model_prefix, hf.model.language_model)
    lm.set_output_embeddings(hf.lm_head)
    if cfg.tie_word_embeddings:
        lm.tie_weights()
    owned = {id(t) for t in [*hf.model.language_model.parameters(), *hf.model.language_model.buffers()]}
    owned |= {id(t) for t in hf.lm_head.parameters()}
    stray = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if id(t) not in owned]
    if stray:
        raise RuntimeError(f"{type(lm).__name__} has parts outside its base model and head: {stray[:5]}")
    if attn_implementation is not None:
        if attn_implementation == VARLEN:
            register_varlen_attention()
        lm.set_attn_implementation(attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return hf, processor, tower, lm, tokenizer


def assign_projector(model, hf) -> None:
    """`hf`'s projector parameters themselves into `model` (assign), not copies: under DeepSpeed's zero.Init
    they are partitions, which a copy would read as empty."""
    projector = hf.model.multi_modal_projector.state_dict(keep_vars=True)
    model.multi_modal_projector.load_state_dict(projector, strict=True, assign=True)


def load_hf(
    cls,
    path: str,
    trust_remote_code: bool = False,
    load_weights: bool = True,
    attn_implementation: str | None = None,
):
    """Build our `cls` (LlavaModel) from a llava-hf folder or hub name, reusing the loaded modules.

    `load_weights=False` reads only the config (random init; under `torch.device("meta")` the empty
    skeleton sharded init fills after sharding). `attn_implementation` applies to the language model
    only (the vision tower keeps its own), as `LanguageSpec.attn_implementation` does.
    """
    from transformers import LlavaForConditionalGeneration

    hf, _, tower, lm, tokenizer = load_hf_parts(
        LlavaForConditionalGeneration, "llava", path, trust_remote_code, load_weights, attn_implementation
    )
    model = cls(tower, lm, tokenizer, hf.config.image_token_id, "mlp2x_gelu")
    assign_projector(model, hf)
    return model
