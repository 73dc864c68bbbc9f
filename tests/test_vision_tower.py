"""Vision towers: feature-layer / select-strategy choices checked against the encoder's own hidden states."""

import copy

import pytest
import torch

from llava_lightning.model import VisionSpec, build_vision_tower
from llava_lightning.model.presets import TINY_CLIP, TINY_SIGLIP, TINY_TIMM
from llava_lightning.model.vision_hf import _find_block_list


def _reference_hidden_states(tower):
    """An untouched copy of the HF model (all blocks run) and its hidden states."""
    ref = copy.deepcopy(tower.hf_model)
    parent, name, blocks = _find_block_list(ref, len(tower.blocks()))
    setattr(parent, name, torch.nn.ModuleList(list(blocks._modules.values())))
    return ref


@pytest.mark.parametrize(
    "layer,strategy",
    [(-2, "default"), (-1, "full"), (2, "default"), (0, "default"), ([-2, 1], "default"), ([-1, -3], "full")],
)
def test_hf_clip_selection_matches_hidden_states(layer, strategy):
    tower = build_vision_tower(
        VisionSpec(name="tiny", config=TINY_CLIP, feature_layer=layer, select_strategy=strategy)
    )
    ref = _reference_hidden_states(tower)
    size = TINY_CLIP["image_size"]
    x = torch.randn(2, 3, size, size)
    hs = ref(x, output_hidden_states=True).hidden_states
    assert len(hs) == TINY_CLIP["num_hidden_layers"] + 1
    layers = [layer] if isinstance(layer, int) else layer
    parts = [hs[i][:, 1:] if strategy == "default" else hs[i] for i in layers]
    expected = torch.cat(parts, dim=-1)
    out = tower(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grid = (size // TINY_CLIP["patch_size"]) ** 2
    assert tower.num_tokens == out.shape[1] == grid + (strategy == "full")
    assert tower.hidden_size == out.shape[2] == 128 * len(layers)


def test_hf_tower_skips_blocks_after_the_deepest_feature_layer_but_keeps_their_weights():
    tower = build_vision_tower(VisionSpec(name="tiny", config=TINY_CLIP, feature_layer=-2))
    blocks = tower.blocks()
    assert len(blocks) == 4 and tower.block_class.__name__ == "CLIPEncoderLayer"
    calls = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    tower(torch.randn(1, 3, tower.image_size, tower.image_size))
    assert calls == [0, 1, 2]
    assert set(tower.state_dict()) == set(tower.hf_model.state_dict())
    assert any("layers.3." in k for k in tower.state_dict())
    assert not any(p.requires_grad for p in blocks[3].parameters())


def test_hf_tower_reports_image_settings():
    clip = build_vision_tower(VisionSpec(name="tiny", config=TINY_CLIP))
    assert clip.image_size == TINY_CLIP["image_size"]
    assert clip.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert clip.image_std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    siglip = build_vision_tower(
        VisionSpec(name="tiny", config=TINY_SIGLIP, feature_layer=-1, select_strategy="full")
    )
    assert (
        siglip.image_mean == (0.5, 0.5, 0.5)
        and siglip.num_tokens == (TINY_SIGLIP["image_size"] // TINY_SIGLIP["patch_size"]) ** 2
    )  # no CLS
    custom = build_vision_tower(VisionSpec(name="tiny", config=TINY_CLIP, image_mean=(0.1, 0.2, 0.3)))
    assert custom.image_mean == (0.1, 0.2, 0.3)


def test_siglip_full_matches_hidden_states():
    tower = build_vision_tower(
        VisionSpec(name="tiny", config=TINY_SIGLIP, feature_layer=-1, select_strategy="full")
    )
    x = torch.randn(2, 3, tower.image_size, tower.image_size)
    ref = tower.hf_model(x, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(tower(x), ref)


@pytest.mark.parametrize("layer", [5, -6, [1, 9]])
def test_out_of_range_feature_layer_names_the_valid_range(layer):
    with pytest.raises(ValueError, match="out of range"):
        build_vision_tower(VisionSpec(name="tiny", config=TINY_CLIP, feature_layer=layer))


def _timm_blocks_reference(model, x, upto):
    """Run timm's ViT by hand: embeddings, then blocks[:upto]; return [prefix + patch tokens]."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for blk in model.blocks[:upto]:
        h = blk(h)
    return h


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), (-1, "full"), ([1, -1], "default")])
def test_timm_selection_matches_manual_blocks(layer, strategy):
    tower = build_vision_tower(
        VisionSpec(
            name="vit_tiny_patch16_224",
            library="timm",
            config=TINY_TIMM,
            feature_layer=layer,
            select_strategy=strategy,
        )
    ).eval()
    model = tower.timm_model
    x = torch.randn(2, 3, 64, 64)
    layers = [layer] if isinstance(layer, int) else layer
    parts = []
    for ly in layers:
        idx = ly if ly >= 0 else len(model.blocks) + 1 + ly
        h = _timm_blocks_reference(model, x, idx)
        parts.append(h[:, model.num_prefix_tokens :] if strategy == "default" else h)
    torch.testing.assert_close(tower(x), torch.cat(parts, dim=-1), rtol=1e-5, atol=1e-5)
    assert tower.num_tokens == 64 + (strategy == "full")
    assert tower.block_class.__name__ == "Block" and len(tower.blocks()) == 4
    assert tower.image_size == 64 and len(tower.image_mean) == 3


def test_timm_refuses_embedding_layer():
    with pytest.raises(ValueError, match="feature_layer 0"):
        build_vision_tower(
            VisionSpec(name="vit_tiny_patch16_224", library="timm", config=TINY_TIMM, feature_layer=0)
        )
