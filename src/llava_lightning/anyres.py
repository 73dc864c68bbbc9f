"""LLaVA-NeXT "anyres" geometry: which grid of crops an image is tiled into, and which feature vectors
(and how many) it contributes, from its original size alone.

Both sides import this file and not each other: the data side to cut the crops and expand each
`<image>` to `num_tokens(height, width)` image-token ids, the model side to lay the crops' features out
(`feature_index`). One definition, so the data's token count and the model's feature count agree.
Formulas are transformers' (`select_best_resolution`, `get_patch_output_size`, llava_next's
`get_anyres_image_grid_shape`, `unpad_image`, `LlavaNextProcessor._get_number_of_features`); sizes
are `(height, width)` throughout, as there.

An image of size (H, W) is resized into the best pinpoint resolution (aspect kept, centred, zero
padding), cut into `rows x cols` crops of `tile` pixels, and preceded by an overview (the whole image
resized to `tile x tile`). Each crop gives `grid x grid` features. Its tokens are the overview's
`grid^2`, then the crops' features as one `(rows * grid) x (cols * grid)` map with the padded border
rows (or columns) removed, row by row, each row followed by the `image_newline` vector:
`grid^2 + h * (w + 1)` with `(h, w)` the unpadded map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint `(h, w)` keeping the most of the image's pixels once fitted in (ties: least waste)."""
    best, best_effective, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(h), int(w)), effective, waste
    if best is None:
        raise ValueError(f"no pinpoint resolution fits an image of {height}x{width} (pinpoints {pinpoints})")
    return best


def fitted_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The `(h, w)` an image is resized to inside `target` before the padding (transformers'
    `get_patch_output_size`: the side that binds is exact, the other rounded up, never past the target)."""
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclass(frozen=True)
class AnyresGeometry:
    """The crop layout of a vision tower with square inputs of `tile` pixels and `grid x grid` features."""

    tile: int
    """The tower's input size in pixels (each crop's side)."""
    grid: int
    """Feature vectors per crop side (`tile // patch_size`)."""
    pinpoints: tuple[tuple[int, int], ...]
    """Candidate resolutions `(height, width)`, each a multiple of `tile`."""

    def __post_init__(self):
        pins = tuple((int(h), int(w)) for h, w in self.pinpoints)
        object.__setattr__(self, "pinpoints", pins)
        if self.tile <= 0 or self.grid <= 0:
            raise ValueError(f"anyres needs a positive tile and grid, got tile={self.tile}, grid={self.grid}")
        if not pins:
            raise ValueError("image_grid_pinpoints is empty: give resolutions [[height, width], ...]")
        bad = [p for p in pins if p[0] <= 0 or p[1] <= 0 or p[0] % self.tile or p[1] % self.tile]
        if bad:
            raise ValueError(
                f"image_grid_pinpoints {bad} are not positive multiples of the tower's {self.tile}-pixel input: "
                "each pinpoint must be whole crops (e.g. [[336, 672], [672, 336]] for a 336 px tower)"
            )

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """The pinpoint the image of `(height, width)` is resized and padded into."""
        return select_best_resolution(height, width, self.pinpoints)

    def crop_grid(self, height: int, width: int) -> tuple[int, int]:
        """`(rows, cols)` of `tile`-pixel crops the image is cut into (the overview not counted)."""
        h, w = self.best_resolution(height, width)
        return h // self.tile, w // self.tile

    def num_crops(self, height: int, width: int) -> int:
        """Tower inputs of one image: its crops plus the overview."""
        rows, cols = self.crop_grid(height, width)
        return rows * cols + 1

    def unpadded_shape(self, height: int, width: int) -> tuple[int, int]:
        """`(h, w)` of the crops' feature map once the rows (or columns) that only saw padding are removed
        (transformers' `unpad_image`; rounding as there)."""
        rows, cols = self.crop_grid(height, width)
        current_h, current_w = rows * self.grid, cols * self.grid
        if width / height > current_w / current_h:
            new_h = int(round(height * (current_w / width), 7))
            current_h -= (current_h - new_h) // 2 * 2
        else:
            new_w = int(round(width * (current_h / height), 7))
            current_w -= (current_w - new_w) // 2 * 2
        return current_h, current_w

    def num_tokens(self, height: int, width: int) -> int:
        """Image-token ids (feature vectors) of one image: overview, unpadded crops, one newline per row."""
        h, w = self.unpadded_shape(height, width)
        return self.grid * self.grid + h * (w + 1)

    def max_tokens(self) -> int:
        """The most tokens any image can take (the largest pinpoint, nothing unpadded): a length bound."""
        return max(
            self.grid * self.grid + (h // self.tile * self.grid) * (w // self.tile * self.grid + 1)
            for h, w in self.pinpoints
        )

    def feature_index(self, image_sizes: Sequence[Sequence[int]]) -> torch.Tensor:
        """`[sum of num_tokens]` rows to gather, in token order, from the crops' features laid end to end
        (`[num_crops_total * grid^2, hidden]`, images in order, each its overview then its crops row by
        row) with the `image_newline` vector appended as the last row (index `num_crops_total * grid^2`)."""
        g, g2 = self.grid, self.grid * self.grid
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        total = sum(self.num_crops(h, w) for h, w in sizes)
        newline = total * g2
        pieces, first = [], 0
        for height, width in sizes:
            rows, cols = self.crop_grid(height, width)
            h, w = self.unpadded_shape(height, width)
            top, left = (rows * g - h) // 2, (cols * g - w) // 2
            y = torch.arange(top, top + h).view(-1, 1)
            x = torch.arange(left, left + w).view(1, -1)
            crop = 1 + (y // g) * cols + (x // g)  # crop 0 is the overview
            index = (first + crop) * g2 + (y % g) * g + (x % g)
            index = torch.cat([index, torch.full((h, 1), newline)], dim=1)
            pieces += [torch.arange(first * g2, (first + 1) * g2), index.reshape(-1)]
            first += rows * cols + 1
        if not pieces:
            return torch.empty(0, dtype=torch.long)
        return torch.cat(pieces).long()
