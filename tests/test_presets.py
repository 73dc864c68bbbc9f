"""Presets: the LLaVA-1.5 recipes match LLaVA's scripts/v1_5; every tiny preset builds offline."""

import pytest

from llava_lightning import LlavaModel
from llava_lightning.model import PRESETS, get_preset


@pytest.mark.parametrize(
    "name,llm", [("llava-1.5-7b", "lmsys/vicuna-7b-v1.5"), ("llava-1.5-13b", "lmsys/vicuna-13b-v1.5")]
)
def test_llava_15_presets_follow_the_paper(name, llm):
    spec = get_preset(name)
    assert spec.vision.name == "openai/clip-vit-large-patch14-336" and spec.vision.library == "transformers"
    assert spec.vision.feature_layer == -2 and spec.vision.select_strategy == "default"
    assert spec.vision.config is None and spec.language.config is None  # real weights by hub name
    assert spec.projector == "mlp2x_gelu"
    assert spec.language.name == llm and spec.language.image_token == "<image>"


@pytest.mark.parametrize(
    "name,llm",
    [
        ("llava-next-7b", "lmsys/vicuna-7b-v1.5"),
        ("llava-next-mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2"),
    ],
)
def test_llava_next_presets_are_llava_15_parts_with_the_next_pinpoints(name, llm):
    """llava-hf/llava-v1.6-{vicuna,mistral}-7b-hf: CLIP ViT-L/14-336, layer -2, mlp2x_gelu, these pinpoints."""
    spec = get_preset(name)
    assert spec.vision.name == "openai/clip-vit-large-patch14-336" and spec.vision.feature_layer == -2
    assert spec.vision.select_strategy == "default" and spec.projector == "mlp2x_gelu"
    assert spec.language.name == llm
    assert spec.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert get_preset("llava-1.5-7b").image_grid_pinpoints is None


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("tiny")))
def test_tiny_presets_build_offline_and_small(name):
    # Build time (< 2 s) is reported by `make bench`, not asserted here.
    model = LlavaModel.from_preset(name)
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 10e6


def test_get_preset_returns_a_copy_and_unknown_names_list_the_choices():
    get_preset("tiny").projector = "linear"
    assert get_preset("tiny").projector == "mlp2x_gelu"
    with pytest.raises(ValueError, match="tiny-qwen2"):
        get_preset("nope")
