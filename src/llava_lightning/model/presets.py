"""Named model presets: the LLaVA-1.5 recipes by hub name, and tiny random-init models for offline work.

Tiny presets build in well under 2 s with no download: random-init configs and a tokenizer
trained offline (`tiny_tokenizer`). They cover several families so tests exercise each path:
CLIP + Llama (`tiny`), CLIP + Qwen2 (`tiny-qwen2`), SigLIP + Llama (`tiny-siglip`),
timm ViT + Llama (`tiny-timm`), and LLaVA-NeXT anyres on CLIP + Llama (`tiny-next`).
"""

from __future__ import annotations

import copy

from .specs import LanguageSpec, LlavaSpec, VisionSpec

# 96 px images in 32 px patches: 3 x 3 = 9 image tokens, one per cell of the synthetic shapes' grid
# (rendered at 96 px, so not resized). The demo learns more, and faster, with these than with 64
# tokens of 8 px patches over a resized image, where a shape spans several patches (docs/experiments.md).
TINY_CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 96,
    "patch_size": 32,
}
TINY_SIGLIP = {**TINY_CLIP, "model_type": "siglip_vision_model"}
TINY_TIMM = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 128,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 2.0,
}
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 1408,  # the tiny tokenizers (1322 / 1375 pieces with <image> and <pad>), rounded up to 64
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
TINY_QWEN2 = {
    **TINY_LLAMA,
    "model_type": "qwen2",
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": 2,
}

LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
"""LLaVA-NeXT's `image_grid_pinpoints` (height, width) for its 336 px CLIP tower (llava-hf's configs)."""
TINY_NEXT_PINPOINTS = ((96, 192), (192, 96), (192, 192))
"""`tiny-next`'s pinpoints: 1 x 2, 2 x 1 or 2 x 2 crops of the tiny CLIP's 96 px input."""

PRESETS: dict[str, LlavaSpec] = {
    # LLaVA-1.5 (LLaVA's scripts/v1_5): CLIP ViT-L/14-336, layer -2, CLS dropped, mlp2x_gelu, Vicuna v1.5.
    "llava-1.5-7b": LlavaSpec(
        vision=VisionSpec(
            name="openai/clip-vit-large-patch14-336", feature_layer=-2, select_strategy="default"
        ),
        projector="mlp2x_gelu",
        language=LanguageSpec(name="lmsys/vicuna-7b-v1.5", use_fast_tokenizer=False),
    ),
    "llava-1.5-13b": LlavaSpec(
        vision=VisionSpec(
            name="openai/clip-vit-large-patch14-336", feature_layer=-2, select_strategy="default"
        ),
        projector="mlp2x_gelu",
        language=LanguageSpec(name="lmsys/vicuna-13b-v1.5", use_fast_tokenizer=False),
    ),
    # LLaVA-NeXT (LLaVA-1.6, llava-hf/llava-v1.6-*-hf): LLaVA-1.5's parts plus anyres at these pinpoints.
    "llava-next-7b": LlavaSpec(
        vision=VisionSpec(
            name="openai/clip-vit-large-patch14-336", feature_layer=-2, select_strategy="default"
        ),
        projector="mlp2x_gelu",
        language=LanguageSpec(name="lmsys/vicuna-7b-v1.5", use_fast_tokenizer=False),
        image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
    ),
    "llava-next-mistral-7b": LlavaSpec(
        vision=VisionSpec(
            name="openai/clip-vit-large-patch14-336", feature_layer=-2, select_strategy="default"
        ),
        projector="mlp2x_gelu",
        language=LanguageSpec(name="mistralai/Mistral-7B-Instruct-v0.2"),
        image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
    ),
    "tiny": LlavaSpec(
        vision=VisionSpec(name="tiny-clip", config=TINY_CLIP),
        projector="mlp2x_gelu",
        language=LanguageSpec(name="tiny-llama", config=TINY_LLAMA, tokenizer="tiny:llama"),
    ),
    "tiny-qwen2": LlavaSpec(
        vision=VisionSpec(name="tiny-clip", config=TINY_CLIP),
        projector="mlp2x_gelu",
        language=LanguageSpec(name="tiny-qwen2", config=TINY_QWEN2, tokenizer="tiny:chatml"),
    ),
    "tiny-siglip": LlavaSpec(
        vision=VisionSpec(name="tiny-siglip", config=TINY_SIGLIP, feature_layer=-1, select_strategy="full"),
        projector="mlp2x_gelu",
        language=LanguageSpec(name="tiny-llama", config=TINY_LLAMA, tokenizer="tiny:llama"),
    ),
    "tiny-timm": LlavaSpec(
        vision=VisionSpec(name="vit_tiny_patch16_224", library="timm", config=TINY_TIMM),
        projector="mlp2x_gelu",
        language=LanguageSpec(name="tiny-llama", config=TINY_LLAMA, tokenizer="tiny:llama"),
    ),
    # Anyres on the tiny parts: 96 px crops (3 x 3 tokens each), at most 2 x 2 crops + the overview.
    "tiny-next": LlavaSpec(
        vision=VisionSpec(name="tiny-clip", config=TINY_CLIP),
        projector="mlp2x_gelu",
        language=LanguageSpec(name="tiny-llama", config=TINY_LLAMA, tokenizer="tiny:llama"),
        image_grid_pinpoints=[list(p) for p in TINY_NEXT_PINPOINTS],
    ),
}


def get_preset(name: str) -> LlavaSpec:
    """A fresh copy of the preset's spec (safe to modify)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
