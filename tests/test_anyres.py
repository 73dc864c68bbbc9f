"""LLaVA-NeXT anyres preprocessing and geometry, checked against transformers: `LlavaNextImageProcessor`
(pixel values and image sizes), `LlavaNextProcessor` (image-token count per image) and llava_next's
modeling helpers (best resolution, crop grid, crop count, unpadding)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextImageProcessor, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution as hf_best_resolution
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from llava_lightning.anyres import AnyresGeometry
from llava_lightning.data.anyres_image import AnyresTransform
from llava_lightning.data.image import ImageDecodeError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TILE, PATCH = 96, 32
PINPOINTS = [[96, 192], [192, 96], [192, 192], [96, 288], [288, 96]]
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT's

# (width, height): landscape, portrait, square, smaller than a tile, exactly a tile / a pinpoint,
# extreme strips (1 unpadded row), odd sizes, a 10:1 strip
SIZES = [(500, 300), (300, 500), (400, 400), (50, 40), (96, 96), (192, 96), (97, 301), (1000, 100), (613, 17)]


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 255
    noise = rng.integers(0, 256, (height, width, 3))
    return Image.fromarray((0.5 * gradient + 0.5 * noise).astype(np.uint8))


def next_image_processor(tile=TILE, pinpoints=PINPOINTS) -> LlavaNextImageProcessor:
    return LlavaNextImageProcessor(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def to_uint8(normalised: torch.Tensor) -> torch.Tensor:
    """The processor's normalised floats back to the uint8 pixels they came from."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((normalised * std + mean) * 255).round().to(torch.uint8)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_crops_equal_llava_next_image_processor(width, height):
    img = make_image(width, height, seed=width * height)
    reference = next_image_processor()(img, return_tensors="pt")
    transform = AnyresTransform(AnyresGeometry(TILE, TILE // PATCH, PINPOINTS), CLIP_MEAN, CLIP_STD)
    crops = transform.to_uint8(img)
    n = transform.geometry.num_crops(height, width)
    pixels = reference["pixel_values"][0]  # [max crops in the batch, 3, tile, tile], zero-padded past n
    assert crops.dtype == torch.uint8 and crops.shape == (n, 3, TILE, TILE)
    assert pixels.shape[0] == n
    # Same uint8 pixels, and the same normalised floats (up to float32 rounding of the fused formula).
    assert torch.equal(crops, to_uint8(pixels))
    torch.testing.assert_close(transform(img), pixels, atol=1e-6, rtol=0)
    assert reference["image_sizes"].tolist() == [[height, width]] == [list(transform.image_size(img))]


def test_crops_equal_the_processor_at_llava_next_resolution():
    """336 px tiles and LLaVA-NeXT's pinpoints (the 7B recipe), on a landscape and a portrait image."""
    transform = AnyresTransform(AnyresGeometry(336, 24, NEXT_PINPOINTS), CLIP_MEAN, CLIP_STD)
    processor = next_image_processor(336, NEXT_PINPOINTS)
    for width, height in [(800, 450), (300, 1100)]:
        img = make_image(width, height, seed=1)
        crops = transform.to_uint8(img)
        assert torch.equal(crops, to_uint8(processor(img, return_tensors="pt")["pixel_values"][0]))


@pytest.mark.parametrize("pinpoints", [PINPOINTS, NEXT_PINPOINTS])
def test_geometry_equals_transformers_helpers(pinpoints):
    tile = pinpoints[0][0]
    grid = tile // (PATCH if tile == TILE else 14)
    geometry = AnyresGeometry(tile, grid, pinpoints)
    rng = np.random.default_rng(0)
    sizes = [(h, w) for w, h in SIZES] + [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    for height, width in sizes:
        assert geometry.best_resolution(height, width) == hf_best_resolution((height, width), pinpoints)
        rows, cols = geometry.crop_grid(height, width)
        assert (rows, cols) == get_anyres_image_grid_shape((height, width), pinpoints, tile)
        assert geometry.num_crops(height, width) == image_size_to_num_patches(
            (height, width), pinpoints, tile
        )
        features = torch.zeros(1, rows * grid, cols * grid)
        assert geometry.unpadded_shape(height, width) == tuple(
            unpad_image(features, (height, width)).shape[1:]
        )


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_token_count_equals_llava_next_processor(width, height, tiny_llama):
    """The ids the processor expands one `<image>` into == `num_tokens` (CLIP: CLS dropped)."""
    processor = LlavaNextProcessor(
        image_processor=next_image_processor(),
        tokenizer=tiny_llama,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    img = make_image(width, height)
    ids = processor(images=img, text="<image>\nwhat is this", return_tensors="pt")["input_ids"][0]
    image_id = tiny_llama.convert_tokens_to_ids("<image>")
    geometry = AnyresGeometry(TILE, TILE // PATCH, PINPOINTS)
    assert int((ids == image_id).sum()) == geometry.num_tokens(height, width)
    assert processor._get_num_multimodal_tokens([(height, width)]).num_image_tokens == [
        geometry.num_tokens(height, width)
    ]
    assert geometry.num_tokens(height, width) <= geometry.max_tokens()


def test_feature_index_equals_transformers_pack_image_features():
    """Gathering by `feature_index` == llava_next's reshape / unpad / newline / concat, feature for feature."""
    from types import SimpleNamespace

    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    grid = TILE // PATCH
    geometry = AnyresGeometry(TILE, grid, PINPOINTS)
    sizes = [(h, w) for w, h in SIZES]
    crops = [geometry.num_crops(h, w) for h, w in sizes]
    hidden = 5
    features = torch.randn(sum(crops) * grid * grid, hidden)
    newline = torch.randn(hidden)
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=TILE, patch_size=PATCH), image_grid_pinpoints=PINPOINTS
    )
    per_image = torch.split(features.view(sum(crops), grid * grid, hidden), crops)
    reference, lengths = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=config), per_image, torch.tensor(sizes), "default", image_newline=newline
    )
    index = geometry.feature_index(sizes)
    ours = torch.cat([features, newline[None]]).index_select(0, index)
    assert lengths.tolist() == [geometry.num_tokens(h, w) for h, w in sizes]
    assert torch.equal(ours, torch.cat(reference))


def test_geometry_and_transform_refuse_bad_input():
    with pytest.raises(ValueError, match="multiples"):
        AnyresGeometry(96, 3, [[100, 200]])
    with pytest.raises(ValueError, match="empty"):
        AnyresGeometry(96, 3, [])
    transform = AnyresTransform(AnyresGeometry(TILE, 3, PINPOINTS), CLIP_MEAN, CLIP_STD, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="over the limit"):
        transform.to_uint8(make_image(50, 40))


# -- the data pipeline: each <image> its own count, crops and sizes in sample order ----------------------


def _png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _anyres_encoder(tokenizer, uint8=True):
    from llava_lightning.data.sample import SampleEncoder

    transform = AnyresTransform(AnyresGeometry(TILE, TILE // PATCH, PINPOINTS), CLIP_MEAN, CLIP_STD)
    return SampleEncoder("vicuna_v1", tokenizer, transform, num_image_tokens=9, uint8_pixels=uint8)


def _runs(ids: torch.Tensor, image_id: int) -> list[int]:
    """Lengths of the runs of `image_id` in `ids`, left to right."""
    runs, n = [], 0
    for t in ids.tolist() + [None]:
        if t == image_id:
            n += 1
        elif n:
            runs, n = runs + [n], 0
    return runs


def test_sample_encoder_expands_each_image_to_its_own_count(tiny_llama):
    encoder = _anyres_encoder(tiny_llama)
    images = [make_image(500, 300, 1), make_image(70, 190, 2)]
    record = [
        {"from": "human", "value": "<image>\nWhat is here? <image>\nAnd here?"},
        {"from": "gpt", "value": "A red circle."},
    ]
    sample = encoder(record, [_png(img) for img in images], "rec-0")
    geometry = encoder.transform.geometry
    image_id = tiny_llama.convert_tokens_to_ids("<image>")
    assert _runs(sample["input_ids"], image_id) == [
        geometry.num_tokens(300, 500),
        geometry.num_tokens(190, 70),
    ]
    assert sample["image_sizes"].tolist() == [[300, 500], [190, 70]]
    processor = next_image_processor()
    reference = torch.cat(
        [to_uint8(processor(img, return_tensors="pt")["pixel_values"][0]) for img in images]
    )
    assert torch.equal(sample["pixel_values"], reference)
    text_only = encoder([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], [], "rec-1")
    assert text_only["pixel_values"].shape == (0, 3, TILE, TILE) and text_only["image_sizes"].shape == (0, 2)
    mismatch = encoder(record, [_png(images[0])], "rec-2")
    assert mismatch["__skipped__"] == "image_count_mismatch"


@pytest.mark.parametrize("pack_tokens", [None, 400])
def test_collator_keeps_crops_sizes_and_feature_index_in_token_order(tiny_llama, pack_tokens):
    from llava_lightning.data.collate import LlavaCollator

    encoder = _anyres_encoder(tiny_llama)
    geometry = encoder.transform.geometry
    image_id = tiny_llama.convert_tokens_to_ids("<image>")
    sizes = [[(300, 500)], [], [(190, 70), (60, 60)], [(100, 250)]]
    samples = []
    for i, sample_sizes in enumerate(sizes):
        human = "<image>\n" * len(sample_sizes) + "Describe" + " it" * (20 * i)  # different lengths
        record = [{"from": "human", "value": human}, {"from": "gpt", "value": "A circle."}]
        pngs = [_png(make_image(w, h, seed=i)) for h, w in sample_sizes]
        samples.append(encoder(record, pngs, f"rec-{i}"))
    collate = LlavaCollator(
        tiny_llama.pad_token_id, pack_tokens=pack_tokens, image_token_id=image_id, anyres=geometry
    )
    batch = collate(samples)
    # The order the images' tokens appear in the batch (row-major), and their crops and sizes follow it.
    flat = batch["input_ids"].reshape(-1)
    runs = _runs(flat, image_id)
    order = batch["image_sizes"].tolist()
    assert sorted(map(tuple, order)) == sorted(s for ss in sizes for s in ss)
    assert runs == [geometry.num_tokens(h, w) for h, w in order]
    assert batch["pixel_values"].shape[0] == sum(geometry.num_crops(h, w) for h, w in order)
    assert torch.equal(batch["image_feature_index"], geometry.feature_index(order))
    assert batch["image_positions"].numel() == batch["image_feature_index"].numel()
    if pack_tokens is not None:
        assert len(batch["input_ids"]) < len(samples)
