"""Image decoding (formats, modes, EXIF, bombs, extreme aspect ratios, truncation, draft mode) and the
CLIP transform (with its pixel budget), checked against transformers' CLIPImageProcessor and LLaVA's
expand2square."""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from llava_lightning import LlavaModel
from llava_lightning.data.image import ImageDecodeError, ImageTransform, decode_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN_FILL = (122, 116, 104)  # int(255 * CLIP mean), LLaVA's pad colour


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise over colour gradients: fine detail for resampling kernels to disagree on, plus structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 255
    noise = rng.integers(0, 256, (height, width, 3))
    return Image.fromarray((0.5 * gradient + 0.5 * noise).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def llava_expand2square(pil_img, background_color):
    """LLaVA's `expand2square` (llava/mm_utils.py), as written there."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def clip_processor(size: int) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalized pixels back to [0, 1] units."""
    return x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


# landscape, portrait, square, odd sizes, and (last) one smaller than the target on both sides
SHAPES = {
    64: [(500, 300), (300, 500), (400, 400), (333, 517), (40, 50)],
    336: [(500, 300), (300, 500), (400, 400), (341, 827), (200, 150)],
}
CASES = [(size, w, h) for size, shapes in SHAPES.items() for w, h in shapes]


@pytest.mark.parametrize("aspect", ["square", "pad"])
@pytest.mark.parametrize(("size", "width", "height"), CASES)
def test_transform_matches_clip_image_processor(aspect, size, width, height):
    img = make_image(width, height, seed=width * height)
    ours = ImageTransform(size, CLIP_MEAN, CLIP_STD, aspect=aspect)(img)
    reference_input = img if aspect == "square" else llava_expand2square(img, MEAN_FILL)
    reference = clip_processor(size)(reference_input, return_tensors="pt")["pixel_values"][0]

    assert ours.dtype == torch.float32 and ours.shape == (3, size, size) and ours.is_contiguous()
    torch.testing.assert_close(denormalize(ours), denormalize(reference), atol=2 / 255, rtol=0)


def test_pad_fills_with_the_mean_colour_and_square_crops():
    img = Image.new("RGB", (200, 100), (255, 0, 0))  # wide: pad adds bands above and below
    pad = denormalize(ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect="pad")(img))
    square = denormalize(ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect="square")(img))
    fill = torch.tensor(MEAN_FILL, dtype=torch.float32).view(3, 1) / 255
    torch.testing.assert_close(pad[:, 0, :], fill.expand(3, 64), atol=1e-5, rtol=0)  # top band
    torch.testing.assert_close(pad[:, -1, :], fill.expand(3, 64), atol=1e-5, rtol=0)  # bottom band
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)
    torch.testing.assert_close(pad[:, 32, :], red.expand(3, 64), atol=1e-5, rtol=0)  # the image, centred
    torch.testing.assert_close(square, red.view(3, 1, 1).expand(3, 64, 64), atol=1e-5, rtol=0)  # cropped


def test_transform_converts_non_rgb_input_and_validates_arguments():
    grey = make_image(80, 60).convert("L")
    out = ImageTransform(32, CLIP_MEAN, CLIP_STD)(grey)
    assert out.shape == (3, 32, 32)
    rgb = denormalize(out)
    torch.testing.assert_close(rgb[0], rgb[1], atol=1e-5, rtol=0)  # grey stays grey
    with pytest.raises(ValueError, match="aspect"):
        ImageTransform(32, CLIP_MEAN, CLIP_STD, aspect="stretch")
    with pytest.raises(ValueError, match="3 values"):
        ImageTransform(32, (0.5, 0.5), CLIP_STD)


def _mode_sources():
    base = make_image(48, 32)
    rgba = base.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    grey16 = Image.fromarray((np.arange(48 * 32).reshape(32, 48) * 40).astype(np.uint16))
    grey32 = Image.fromarray((np.arange(48 * 32).reshape(32, 48) * 1000).astype(np.int32))
    return {
        "jpeg-RGB": (encode(base, "JPEG"), "RGB"),
        "jpeg-L": (encode(base.convert("L"), "JPEG"), "L"),
        "jpeg-CMYK": (encode(base.convert("CMYK"), "JPEG"), "CMYK"),
        "png-RGB": (encode(base, "PNG"), "RGB"),
        "png-L": (encode(base.convert("L"), "PNG"), "L"),
        "png-LA": (encode(rgba.convert("LA"), "PNG"), "LA"),
        "png-P": (encode(palette, "PNG"), "P"),
        "png-P-transparent": (encode(palette, "PNG", transparency=0), "P"),
        "png-RGBA": (encode(rgba, "PNG"), "RGBA"),
        "png-I;16": (encode(grey16, "PNG"), "I;16"),
        "png-1": (encode(base.convert("1"), "PNG"), "1"),
        "tiff-I": (encode(grey32, "TIFF"), "I"),
        "webp-RGB": (encode(base, "WEBP", quality=90), "RGB"),
        "webp-RGBA": (encode(rgba, "WEBP", lossless=True), "RGBA"),
    }


MODE_SOURCES = _mode_sources()


@pytest.mark.parametrize("name", sorted(MODE_SOURCES))
def test_every_format_and_mode_decodes_to_rgb(name):
    data, stored_mode = MODE_SOURCES[name]
    assert Image.open(io.BytesIO(data)).mode == stored_mode  # the case really exercises that mode
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (48, 32)
    pixels = np.asarray(img)
    assert pixels.std() > 5  # real content survived, not a constant image


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))  # opaque black
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    img = np.asarray(decode_image(encode(rgba, "PNG")))
    assert img[1, 3].tolist() == [255, 255, 255]  # fully transparent -> white
    assert img[0, 0].tolist() == [0, 0, 0]
    assert 120 <= img[0, 1, 0] <= 135  # blended halfway

    palette = Image.new("P", (4, 2), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)  # index 0 black (transparent), 1 red
    palette.putpixel((2, 1), 1)
    img = np.asarray(decode_image(encode(palette, "PNG", transparency=0)))
    assert img[0, 0].tolist() == [255, 255, 255]
    assert img[1, 2].tolist() == [200, 10, 10]


def test_16_bit_grey_is_rescaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
    img = np.asarray(decode_image(encode(Image.fromarray(values), "PNG")))
    assert img.dtype == np.uint8
    np.testing.assert_allclose(img[..., 0], values / 257, atol=1)  # full range kept, 65535 -> 255
    assert img.min() == 0 and img.max() == 255 and len(np.unique(img)) > 200
    assert (img[..., 0] == img[..., 1]).all()


def test_cmyk_jpeg_keeps_its_colours():
    rgb = Image.new("RGB", (32, 32), (200, 40, 90))
    img = np.asarray(decode_image(encode(rgb.convert("CMYK"), "JPEG", quality=95))).astype(int)
    assert np.abs(img - [200, 40, 90]).max() <= 6


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    data = encode(img, "JPEG", exif=exif, quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    out = np.asarray(decode_image(data)).astype(int)
    assert out.shape == (40, 20, 3)  # upright: 20 wide, 40 tall
    assert (np.abs(out[5, 10] - [255, 0, 0]) < 40).all()  # the left (red) side is now on top
    assert (np.abs(out[35, 10] - [0, 0, 255]) < 40).all()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` but holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused():
    # over our per-call limit, refused from the header (decoding would fail differently: no pixel data)
    with pytest.raises(ImageDecodeError, match=r"5000x5000 = 25000000 pixels, over the limit of 1000000"):
        decode_image(_png_header_only(5000, 5000), max_pixels=1_000_000)
    # a real image with a tiny limit
    with pytest.raises(ImageDecodeError, match="48x32"):
        decode_image(MODE_SOURCES["png-RGB"][0], max_pixels=100)
    # over Pillow's own hard limit: its DecompressionBombError comes out as ImageDecodeError
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(_png_header_only(100_000, 100_000), max_pixels=10**12)
    assert issubclass(ImageDecodeError, ValueError)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_data_raises(fmt):
    data = encode(make_image(120, 90), fmt)
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_garbage_raises_and_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="not in a format Pillow recognises"):
        decode_image(b"definitely not an image" * 10)
    with pytest.raises(ImageDecodeError):
        decode_image(b"")
    with pytest.raises(FileNotFoundError):
        decode_image(tmp_path / "missing.jpg")


def test_decodes_from_paths(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(MODE_SOURCES["png-RGB"][0])
    from_path = decode_image(path)
    from_str = decode_image(str(path))
    assert from_path.size == (48, 32)
    assert np.array_equal(np.asarray(from_path), np.asarray(from_str))
    assert np.array_equal(np.asarray(from_path), np.asarray(make_image(48, 32)))  # PNG is lossless


def test_jpeg_draft_mode_decodes_large_images_at_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(encode(make_image(2000, 1500).resize((2000, 1500)), "JPEG", quality=85))
    small = decode_image(path, target_size=64)
    assert small.size[0] < 2000 and small.size[1] < 1500
    assert min(small.size) >= 64  # never below the target on the short side
    assert decode_image(path).size == (2000, 1500)
    assert decode_image(path, target_size=1000).size == (2000, 1500)  # short side < 2x target: no draft
    half = decode_image(path, target_size=700)
    assert half.size == (1000, 750)  # 1/2 scale keeps the short side >= 700; 1/4 would not
    # drafted decoding still looks like the full decode, downscaled
    full = np.asarray(decode_image(path).resize(small.size, Image.Resampling.BOX)).astype(float)
    assert np.abs(np.asarray(small).astype(float) - full).mean() < 4


def test_decode_and_transform_is_decode_then_transform():
    transform = ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect="pad")
    data = MODE_SOURCES["jpeg-RGB"][0]
    torch.testing.assert_close(
        transform.decode_and_transform(data), transform(decode_image(data)), atol=0, rtol=0
    )


def test_transform_pickles():
    transform = ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect="pad")
    clone = pickle.loads(pickle.dumps(transform))
    assert (clone.size, clone.mean, clone.std, clone.aspect) == (64, CLIP_MEAN, CLIP_STD, "pad")
    img = make_image(90, 70)
    torch.testing.assert_close(clone(img), transform(img), atol=0, rtol=0)


def test_from_tower_feeds_the_tower():
    tower = LlavaModel.from_preset("tiny").vision_tower.eval()
    transform = ImageTransform.from_tower(tower, aspect="pad")
    assert transform.size == tower.image_size
    assert transform.mean == tuple(tower.image_mean) and transform.std == tuple(tower.image_std)
    pixels = transform(make_image(100, 60))
    assert pixels.shape == (3, tower.image_size, tower.image_size)
    with torch.no_grad():
        features = tower(pixels[None])
    assert features.shape == (1, tower.num_tokens, tower.hidden_size)


# -- bounded memory whatever the header says ------------------------------------------------------


def _grey_png(width: int, height: int) -> bytes:
    """A real (decodable) grey PNG: a few hundred bytes even for 1 x 100000."""
    return encode(Image.new("L", (width, height), 90), "PNG")


def _peak_traced_bytes(fn) -> tuple[int, str]:
    """(peak bytes numpy and Python allocated while `fn` ran, its ImageDecodeError message)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError) as info:
            fn()
        return tracemalloc.get_traced_memory()[1], str(info.value)
    finally:
        tracemalloc.stop()


ELONGATED = {
    "png-1x100000": (_grey_png(1, 100_000), "1x100000", "100000:1"),
    "png-100000x1": (_grey_png(100_000, 1), "100000x1", "100000:1"),
    # header only, under the pixel limits but 5 million pixels long: refused before any decoding
    "header-10x5000000": (_png_header_only(10, 5_000_000), "10x5000000", "500000:1"),
    "header-5000000x10": (_png_header_only(5_000_000, 10), "5000000x10", "500000:1"),
}


@pytest.mark.parametrize("aspect", ["square", "pad"])
@pytest.mark.parametrize("name", sorted(ELONGATED))
def test_extreme_aspect_ratios_are_refused_from_the_header(aspect, name):
    data, dims, ratio = ELONGATED[name]
    transform = ImageTransform(336, CLIP_MEAN, CLIP_STD, aspect=aspect)
    peak, message = _peak_traced_bytes(lambda: transform.decode_and_transform(data))
    assert f"is {dims}, an aspect ratio of {ratio}, over the limit of 100:1" in message
    assert peak < 2**20  # refused before any pixel buffer was made
    with pytest.raises(ImageDecodeError, match="aspect ratio"):
        decode_image(data)


def test_the_aspect_ratio_limit_is_a_parameter():
    data = _grey_png(200, 10)  # 20:1
    assert decode_image(data).size == (200, 10)
    with pytest.raises(ImageDecodeError, match=r"20:1, over the limit of 10:1"):
        decode_image(data, max_aspect_ratio=10)
    assert decode_image(_grey_png(1, 1000), max_aspect_ratio=1000).size == (1, 1000)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        decode_image(data, max_aspect_ratio=0.5)


@pytest.mark.parametrize("aspect", ["square", "pad"])
@pytest.mark.parametrize(("width", "height"), [(1000, 50), (40, 800)])
def test_a_20_to_1_image_still_transforms_exactly(aspect, width, height):
    img = make_image(width, height, seed=7)
    data = encode(img, "PNG")
    ours = ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect=aspect).decode_and_transform(data)
    reference_input = img if aspect == "square" else llava_expand2square(img, MEAN_FILL)
    reference = clip_processor(64)(reference_input, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(denormalize(ours), denormalize(reference), atol=2 / 255, rtol=0)


def test_pad_canvas_over_the_pixel_budget_is_refused_before_it_is_allocated():
    # 150 x 15000 passes decode_image (100:1, 2.25 million pixels), but its padded square would be
    # 15000 x 15000 = 225 million pixels (675 MB), over the default budget.
    data = _grey_png(150, 15_000)
    img = decode_image(data)
    pad = ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect="pad")
    peak, message = _peak_traced_bytes(lambda: pad(img))
    assert "15000x15000 = 225000000 pixels" in message and "limit of 178956970" in message
    assert peak < 2**20
    with pytest.raises(ImageDecodeError, match="15000x15000"):
        pad.decode_and_transform(data)
    square = ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect="square")
    assert square(img).shape == (3, 64, 64)  # its largest array is 64 x 6400

    # the budget is a parameter of the transform, and covers square mode's resize before the crop
    small = make_image(400, 100)
    with pytest.raises(ImageDecodeError, match=r"400x400 = 160000 pixels, over the limit of 100000"):
        ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect="pad", max_pixels=100_000)(small)
    assert ImageTransform(64, CLIP_MEAN, CLIP_STD, max_pixels=100_000)(small).shape == (3, 64, 64)
    with pytest.raises(ImageDecodeError, match=r"64x6400000 = 409600000 pixels"):
        square(Image.new("L", (1, 100_000)))  # a PIL image that never went through decode_image
    with pytest.raises(ValueError, match="max_pixels"):
        ImageTransform(64, CLIP_MEAN, CLIP_STD, max_pixels=0)


def test_zero_sized_images_are_refused(monkeypatch):
    for aspect in ("square", "pad"):
        with pytest.raises(ImageDecodeError, match="0x5 has no pixels"):
            ImageTransform(64, CLIP_MEAN, CLIP_STD, aspect=aspect)(Image.new("RGB", (0, 5)))
    # Pillow refuses such files itself; a header that got through would be refused as well
    monkeypatch.setattr(Image, "open", lambda stream: Image.new("RGB", (7, 0)))
    with pytest.raises(ImageDecodeError, match="7x0 has no pixels"):
        decode_image(b"any")
