"""Decoding images safely and turning them into the vision tower's normalized pixel tensors.

`decode_image` turns encoded bytes or a file into an RGB `PIL.Image`: EXIF orientation applied, every
common mode (palette, grey, 16-bit, CMYK, alpha) mapped to 8-bit RGB, decompression bombs and truncated
or corrupt files refused with `ImageDecodeError`, and large JPEGs decoded at a reduced DCT scale when the
caller says how small the image will end up. `ImageTransform` is the CLIP preprocessing LLaVA uses
(`square`: resize the short side + centre crop; `pad`: LLaVA-1.5's expand-to-square with the mean colour
first): the same pixels as `transformers.CLIPImageProcessor` (same resize kernel), without its per-call
overhead and extra copies.

Memory stays bounded whatever a header claims: `decode_image` refuses, from the header, images over
`max_pixels` or more elongated than `max_aspect_ratio`, and `ImageTransform` refuses an image whose
padded canvas or resized-before-crop array would exceed its own `max_pixels`, before allocating it.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from typing import IO, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageTransform",
    "TowerImageSpec",
    "decode_image",
    "to_rgb",
]

DEFAULT_MAX_PIXELS = 178_956_970
"""Default per-call pixel limit: Pillow's own hard limit (2 x `Image.MAX_IMAGE_PIXELS`). Also the
default budget of `ImageTransform`'s largest array (the padded canvas, the resize before the crop)."""

DEFAULT_MAX_ASPECT_RATIO = 100
"""Default limit on long side / short side. The pixel limit alone lets a tiny file be a 1 x 100000
strip, whose expand-to-square canvas is 10^10 pixels and whose short-side resize is `size` x
`size * 100000`. At 100:1 the resize before the crop is at most `size` x `100 * size` (34 MB at 336),
the padded canvas is capped by `ImageTransform`'s budget, and nothing a caption or question could be
about is lost: past 100:1 the short side of a padded image shrinks below 1% of the frame (3.4
pixels of a 336 frame), and a square crop shows under 1% of the image."""

ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited onto white (as `transformers`' `convert_to_rgb` does; LLaVA's plain
`convert("RGB")` would instead keep whatever colour the transparent pixels happen to store)."""

_DRAFT_FACTOR = 2
"""JPEG draft mode is used only when the short side is at least this many times the target size."""

# What Pillow raises for data it cannot decode (truncated streams, bad chunks, bad headers, bombs).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    EOFError,
    ValueError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # when a warnings filter turns it into an exception
)


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageDecodeError(ValueError):
    """The data is not a decodable image, is truncated or corrupt, or is larger than allowed."""


def _ratio(value: float) -> str:
    """An aspect ratio as `N:1` (`1.5:1` when not a whole number)."""
    return f"{value:.0f}:1" if float(value).is_integer() else f"{value:.1f}:1"


def _describe(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return repr(os.fspath(source))


def decode_image(
    source: bytes | str | os.PathLike[str],
    target_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Decode `source` (encoded bytes or a file path) into an 8-bit RGB image.

    - EXIF orientation is applied, so the image comes out upright.
    - Modes are mapped to RGB: palette and grey are expanded, 16/32-bit grey is rescaled to 8 bits (not
      clipped), CMYK is converted, and transparency (alpha channel or palette/tRNS transparency) is
      composited onto white (`ALPHA_BACKGROUND`).
    - An image with more than `max_pixels` pixels is refused from its header, before any pixel is
      decoded. Pillow's global `Image.MAX_IMAGE_PIXELS` check still runs inside `Image.open`; its
      `DecompressionBombError` (and its warning, where a warnings filter raises it) becomes
      `ImageDecodeError` too. So is an image whose long side is more than `max_aspect_ratio` times its
      short side (`DEFAULT_MAX_ASPECT_RATIO`, 100:1: see there why), or one with a zero-sized side.
    - Truncated or corrupt data raises `ImageDecodeError` (`ImageFile.LOAD_TRUNCATED_IMAGES` is left as
      it is; leave it False to get this guarantee).
    - With `target_size` (the size the caller will downscale the short side to), a JPEG whose short side
      is at least twice `target_size` is decoded at a reduced DCT scale (1/2, 1/4 or 1/8), never below
      `target_size` on the short side, so the later resize still downscales. `None` decodes at full size.

    A missing or unreadable file raises the usual `OSError` (`FileNotFoundError`, ...), not
    `ImageDecodeError`. Animated images give their first frame.
    """
    if target_size is not None and target_size <= 0:
        raise ValueError(f"target_size must be positive or None, got {target_size}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not max_aspect_ratio >= 1:
        raise ValueError(
            f"max_aspect_ratio must be at least 1 (long side / short side), got {max_aspect_ratio}"
        )

    if isinstance(source, (bytes, bytearray, memoryview)):
        stream: IO[bytes] = io.BytesIO(source)
    else:
        stream = open(os.fspath(source), "rb")  # open errors (missing file, ...) propagate as they are
    try:
        return _decode(stream, source, target_size, max_pixels, max_aspect_ratio)
    finally:
        stream.close()


def _decode(
    stream: IO[bytes],
    source: bytes | str | os.PathLike[str],
    target_size: int | None,
    max_pixels: int,
    max_aspect_ratio: float,
) -> Image.Image:
    what = _describe(source)
    try:
        img = Image.open(stream)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"image {what} is not in a format Pillow recognises (or is damaged)") from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot decode image {what}: {exc}") from exc

    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image {what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(possible decompression bomb)"
        )
    if min(width, height) <= 0:
        raise ImageDecodeError(f"image {what}: {width}x{height} has no pixels (a zero-sized side)")
    long_side, short_side = max(width, height), min(width, height)
    if long_side > max_aspect_ratio * short_side:
        raise ImageDecodeError(
            f"image {what} is {width}x{height}, an aspect ratio of {_ratio(long_side / short_side)}, over "
            f"the limit of {_ratio(max_aspect_ratio)} (a strip no model input can show; its transform "
            "would need a huge canvas or resize); pass max_aspect_ratio= to allow more"
        )

    if target_size is not None and min(width, height) >= _DRAFT_FACTOR * target_size:
        # JPEG only (a no-op for other formats): Pillow picks the largest DCT scale 1/s (s in 1, 2, 4, 8)
        # that keeps both sides >= the requested size, so the short side stays >= target_size.
        img.draft("RGB", (target_size, target_size))
        if img.size != (width, height):
            logger.debug("decoding %s (%dx%d) in JPEG draft mode at %dx%d", what, width, height, *img.size)

    try:
        img.load()
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"image {what} is truncated or corrupt: {exc}") from exc

    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:  # a broken EXIF block must not cost the pixels
        logger.warning("ignoring unreadable EXIF orientation of image %s: %s", what, exc)

    try:
        return to_rgb(img)
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"cannot convert image {what} (mode {img.mode}) to RGB: {exc}") from exc


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit grey by rescaling (never by clipping).

    `I;16*` and non-negative `I` data is taken as 16-bit (divided by 257), `F` data in [0, 1] is scaled
    by 255, and anything else is stretched linearly from its own minimum..maximum to 0..255.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = arr.astype(np.float32) / 257.0  # 0..65535 -> 0..255
    else:
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0
        elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
            scaled = arr / 257.0  # taken as 16-bit data (what a 16-bit file decoded as "I" holds)
        else:
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (transparency composited onto `ALPHA_BACKGROUND`); RGB passes through."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return _wide_grey_to_l(img).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _pixels(image: Image.Image, pad_fill: tuple[int, int, int] | None) -> np.ndarray:
    """A writable `[H, W, 3]` uint8 copy of an RGB image, padded to a centred square when `pad_fill` is set.

    The padding is LLaVA's `expand2square`: the image pasted at `(0, (W - H) // 2)` on a `W` x `W`
    canvas when it is wider than tall, at `((H - W) // 2, 0)` on an `H` x `H` canvas otherwise.
    """
    width, height = image.size
    if pad_fill is None or width == height:
        return np.array(image)
    side = max(width, height)
    top, left = (side - height) // 2, (side - width) // 2
    # Filled in numpy, row by row (a fresh Pillow canvas costs page faults; a per-pixel fill is slow).
    row = np.tile(np.asarray(pad_fill, dtype=np.uint8), (side, 1))
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:top] = row
    canvas[top + height :] = row
    canvas[top : top + height, :left] = row[:left]
    canvas[top : top + height, left + width :] = row[left + width :]
    canvas[top : top + height, left : left + width] = np.asarray(image)
    return canvas


class TowerImageSpec(Protocol):
    """What the image transform reads from a vision tower: its input size, mean and std.

    Declared here so the data side names what it needs without importing the model: any object with
    these attributes fits (the model's `VisionTower` does, without naming this protocol).
    """

    @property
    def image_size(self) -> int:
        """Square input resolution in pixels."""
        ...

    @property
    def image_mean(self) -> Sequence[float]:
        """Normalization mean (RGB)."""
        ...

    @property
    def image_std(self) -> Sequence[float]:
        """Normalization std (RGB)."""
        ...


class ImageTransform:
    """PIL image -> normalized float32 `[3, size, size]` tensor for the vision tower (CLIP preprocessing).

    `aspect="square"` equals `CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size,
    "width": size}, image_mean=mean, image_std=std)`: bicubic (antialiased) resize of the short side to
    `size`, the long side to `int(size * long / short)`, centre crop, scale by 1/255, normalize.
    `aspect="pad"` first pads the image to a centred square filled with the mean colour
    (`int(255 * mean)`, LLaVA-1.5's `expand2square`), then does the same.

    Same kernel as `CLIPImageProcessor` (torch's uint8 antialiased bicubic, run on the channels-last
    pixels without a layout copy), without its per-call overhead: the crop is a view, and the uint8 ->
    float32 conversion and the fused `(x - 255 * mean) * (1 / (255 * std))` run in one output buffer. Non-RGB images are converted as `decode_image` does.
    Holds only numbers, so it pickles into DataLoader workers.

    `max_pixels` bounds the largest array the transform makes, checked before it is allocated: the
    padded square (`aspect="pad"`: long side squared) and the resized image before the crop
    (`size` x `int(size * long / short)`). An image over it raises `ImageDecodeError` (a `bad_image`
    skip for `SampleEncoder`). `decode_image`'s aspect-ratio limit keeps the resize far below it, but
    a decoded image can still be over it in `pad` mode (150 x 15000: a 225-million-pixel canvas).
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        aspect: Literal["square", "pad"] = "square",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {tuple(std)}")
        if aspect not in ("square", "pad"):
            raise ValueError(f"aspect must be 'square' or 'pad', got {aspect!r}")
        if max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        self.size = int(size)
        self.max_pixels = int(max_pixels)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.aspect = aspect
        self.fill = (int(self.mean[0] * 255), int(self.mean[1] * 255), int(self.mean[2] * 255))
        # (x / 255 - mean) / std == (x - 255 * mean) * (1 / (255 * std)), in float32.
        self._offset = torch.tensor(self.mean, dtype=torch.float32).mul(255).view(3, 1, 1)
        self._scale = torch.tensor(self.std, dtype=torch.float32).mul(255).reciprocal().view(3, 1, 1)

    @classmethod
    def from_tower(cls, tower: TowerImageSpec, aspect: Literal["square", "pad"] = "square") -> ImageTransform:
        """The transform a vision tower expects (its `image_size`, `image_mean` and `image_std`)."""
        return cls(tower.image_size, tower.image_mean, tower.image_std, aspect=aspect)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std}, "
            f"aspect={self.aspect!r}, max_pixels={self.max_pixels})"
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(image))

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """The resized and cropped (or padded) pixels, uint8 `[3, size, size]`, not yet normalized.

        Data loaders ship these (4x smaller than float32 between processes); `LlavaModel` normalizes
        uint8 pixel values on its own device with the same mean and std.
        """
        new_w, new_h = self._check_budget(*image.size)
        pixels = _pixels(to_rgb(image), self.fill if self.aspect == "pad" else None)
        height, width = pixels.shape[:2]
        size = self.size
        # [1, 3, H, W] view of the HWC buffer (channels-last), the layout the uint8 kernel works in.
        x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
        if (height, width) != (size, size):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            x = x[:, :, top : top + size, left : left + size]
        return x[0].contiguous()

    def _check_budget(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the image is resized to before the crop; `ImageDecodeError` when the
        padded canvas or that resize would exceed `max_pixels` (checked before either is allocated)."""
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"image {width}x{height} has no pixels (a zero-sized side)")
        if self.aspect == "pad":
            side = max(width, height)
            if side * side > self.max_pixels:
                raise ImageDecodeError(
                    f"image {width}x{height} padded to a square (aspect='pad') needs a canvas of "
                    f"{side}x{side} = {side * side} pixels, over the limit of {self.max_pixels} "
                    "(ImageTransform max_pixels); shrink or drop the image, or raise max_pixels"
                )
            width = height = side
        size = self.size
        # CLIPImageProcessor: short side -> size, long side -> int(size * long / short).
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        if new_w * new_h > self.max_pixels:
            raise ImageDecodeError(
                f"image {width}x{height} resized to short side {size} would be {new_w}x{new_h} = "
                f"{new_w * new_h} pixels before the crop, over the limit of {self.max_pixels} "
                "(ImageTransform max_pixels); decode_image's max_aspect_ratio refuses such strips"
            )
        return new_w, new_h

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 `[3, H, W]` -> float32 `(x / 255 - mean) / std`."""
        out = torch.empty(pixels.shape, dtype=torch.float32)
        out.copy_(pixels)
        return out.sub_(self._offset).mul_(self._scale)

    def decode_and_transform(self, source: bytes | str | os.PathLike[str]) -> torch.Tensor:
        """`decode_image(source, target_size=size)` followed by this transform."""
        return self(decode_image(source, target_size=self.size))
