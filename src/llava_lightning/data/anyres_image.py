"""LLaVA-NeXT image preprocessing ("anyres"): one image -> an overview plus a grid of crops.

`AnyresTransform` gives the same pixels as transformers' `LlavaNextImageProcessor` (torchvision
backend, `size={"shortest_edge": tile}`, `crop_size` = tile) for square-input towers: the image is
resized (bicubic, antialiased, on uint8 as there) into the best pinpoint resolution with its aspect
kept, padded with zeros (black, before normalisation) centred to that resolution and cut into
`tile x tile` crops row by row; the overview is the whole image resized to `tile x tile` and comes
first. The geometry (which pinpoint, how many crops, how many tokens) is `anyres.AnyresGeometry`, shared
with the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..anyres import AnyresGeometry, fitted_size
from .image import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, to_rgb


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 `[1, 3, H, W]` -> `[1, 3, height, width]` as torchvision's `resize` (bicubic, antialiased;
    the same size is returned as it is)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)


class AnyresTransform:
    """PIL image -> uint8 `[num_crops, 3, tile, tile]` (overview first) and its `(height, width)`.

    Normalisation is the model's (`LlavaModel.normalize_pixels`) or `normalize` here, as for
    `ImageTransform`. Holds only numbers, so it pickles into DataLoader workers. `max_pixels` bounds
    the decoded image (the resized arrays are bounded by the largest pinpoint).
    """

    def __init__(
        self,
        geometry: AnyresGeometry,
        mean: Sequence[float],
        std: Sequence[float],
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {tuple(std)}")
        self.geometry = geometry
        self.size = geometry.tile
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.max_pixels = int(max_pixels)
        self._offset = torch.tensor(self.mean, dtype=torch.float32).mul(255).view(3, 1, 1)
        self._scale = torch.tensor(self.std, dtype=torch.float32).mul(255).reciprocal().view(3, 1, 1)

    @property
    def decode_size(self) -> int:
        """The short side a JPEG may be draft-decoded down to: the largest pinpoint side, so that no
        resize of the image (into any pinpoint) ever upsamples what draft mode dropped."""
        return max(max(p) for p in self.geometry.pinpoints)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.geometry}, mean={self.mean}, std={self.std})"

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """The overview and the crops, uint8 `[num_crops, 3, tile, tile]`, not yet normalised."""
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"image {width}x{height} has no pixels (a zero-sized side)")
        if width * height > self.max_pixels:
            raise ImageDecodeError(
                f"image {width}x{height} = {width * height} pixels is over the limit of {self.max_pixels}"
            )
        tile = self.size
        # Contiguous [1, 3, H, W] (transformers' layout: the uint8 kernel's rounding follows the layout).
        x = torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1).contiguous().unsqueeze(0)
        best_h, best_w = self.geometry.best_resolution(height, width)
        new_h, new_w = fitted_size(height, width, (best_h, best_w))
        resized = _resize(x, new_h, new_w)
        canvas = torch.zeros(1, 3, best_h, best_w, dtype=torch.uint8)
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        canvas[:, :, top : top + new_h, left : left + new_w] = resized
        crops = canvas.view(3, best_h // tile, tile, best_w // tile, tile).permute(1, 3, 0, 2, 4)
        overview = _resize(x, tile, tile)
        return torch.cat([overview, crops.reshape(-1, 3, tile, tile)]).contiguous()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(image))

    @staticmethod
    def image_size(image: Image.Image) -> tuple[int, int]:
        """`(height, width)`: what the model needs beside the crops (transformers' `image_sizes` row)."""
        return image.size[1], image.size[0]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 `[..., 3, H, W]` -> float32 `(x / 255 - mean) / std`."""
        out = torch.empty(pixels.shape, dtype=torch.float32)
        out.copy_(pixels)
        return out.sub_(self._offset).mul_(self._scale)

    def decode_and_transform(
        self, source: bytes | str | os.PathLike[str]
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """`decode_image(source)` followed by this transform: (normalised crops, (height, width))."""
        image = decode_image(source, target_size=self.decode_size)
        return self(image), self.image_size(image)
