"""Turning one raw record (conversation + image sources) into model inputs, or a counted skip.

`SampleEncoder` is the one place where a record meets the template, the tokenizer and the image
transform; both the caption shards and the instruction JSON use it. A record that cannot be used
becomes a `skip(reason, where)` marker (or, in strict mode, an exception naming the record), which
the collator counts and drops: nothing is dropped silently. The slots that give every rank the same
number of samples are `padding` markers, counted the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .anyres_image import AnyresTransform
from .image import ImageDecodeError, ImageTransform, decode_image
from .templates import SampleError, get_template

log = logging.getLogger(__name__)

SKIP = "__skipped__"


def skip(reason: str, where: str, detail: str = "") -> dict[str, str]:
    """A marker the collator counts under `reason`; `where` names the record (file / key / index)."""
    log.warning("skipping %s (%s)%s", where, reason, f": {detail}" if detail else "")
    return {SKIP: reason, "where": where}


PADDING = "padding"
"""Skip reason of the slots that even out ranks (`world * ceil(N / world) - N` per epoch, fewer than
`world`): counted like any skip, but expected, so not logged as a warning and not a sample seen."""


def padding(where: str) -> dict[str, str]:
    """A padding slot's marker: the collator counts it under `padding` and drops it."""
    return {SKIP: PADDING, "where": where}


class StrictModeError(RuntimeError):
    """Raised instead of a skip when the data module runs with `strict: true`."""


@dataclass
class SampleEncoder:
    """Encodes records for one template / tokenizer / image transform (picklable for workers)."""

    template: str
    tokenizer: Any
    transform: ImageTransform | AnyresTransform
    """LLaVA-1.5's one tower input per image, or LLaVA-NeXT's crops (then each image has its own token
    count, from its size, and samples carry `image_sizes`)."""
    num_image_tokens: int
    """Image-token ids per image (anyres: per crop, unused: the geometry gives each image's count)."""
    max_length: int = 2048
    strict: bool = False
    uint8_pixels: bool = False
    """Ship uint8 pixels (normalized later by `LlavaModel`, on its device) instead of float32."""

    def __post_init__(self):
        self._template = get_template(self.template)
        self._dtype = torch.uint8 if self.uint8_pixels else torch.float32
        self._anyres = isinstance(self.transform, AnyresTransform)

    @property
    def image_tokens_estimate(self) -> int:
        """Tokens one image takes, for length estimates before decoding (anyres: the most it can take)."""
        return self.transform.geometry.max_tokens() if self._anyres else self.num_image_tokens

    def __call__(self, conversations: Any, images: list[Any], where: str) -> dict[str, Any]:
        """`images` are encoded bytes or paths, in the order of the `<image>` placeholders."""
        try:
            if not isinstance(conversations, list):
                raise SampleError("malformed_record", "'conversations' is not a list of turns")
            to_tensor = self.transform.to_uint8 if self.uint8_pixels else self.transform
            if self._anyres:  # each image's token count comes from its size: decode first
                geometry = self.transform.geometry
                decoded = [decode_image(src, target_size=self.transform.decode_size) for src in images]
                sizes = [self.transform.image_size(img) for img in decoded]
                num_tokens: Any = [geometry.num_tokens(h, w) for h, w in sizes]
            else:
                num_tokens = self.num_image_tokens
            enc = self._template.encode(
                conversations,
                self.tokenizer,
                num_tokens,
                max_length=self.max_length,
                num_images=len(images),
            )
            if self._anyres:
                pixels = [to_tensor(img) for img in decoded]
            else:
                pixels = [to_tensor(decode_image(src, target_size=self.transform.size)) for src in images]
        except SampleError as err:
            return self.fail(err.reason, where, str(err))
        except (ImageDecodeError, OSError) as err:
            reason = "missing_image" if isinstance(err, FileNotFoundError) else "bad_image"
            return self.fail(reason, where, str(err))
        except Exception as err:  # anything else one sample raises ends no run outside strict mode
            log.debug("unexpected error encoding %s", where, exc_info=True)
            return self.fail("encode_error", where, f"{type(err).__name__}: {err}")
        size = self.transform.size
        if not pixels:
            pixel_values = torch.empty(0, 3, size, size, dtype=self._dtype)
        else:  # anyres: every image's crops, overview first, image after image
            pixel_values = torch.cat(pixels) if self._anyres else torch.stack(pixels)
        sample = {
            "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
            "labels": torch.tensor(enc["labels"], dtype=torch.long),
            "pixel_values": pixel_values,
        }
        if self._anyres:
            sample["image_sizes"] = torch.tensor(sizes, dtype=torch.long).view(-1, 2)
        return sample

    def fail(self, reason: str, where: str, detail: str) -> dict[str, str]:
        """A counted skip of the record at `where`, or in strict mode a `StrictModeError`."""
        if self.strict:
            raise StrictModeError(
                f"{where}: {detail} (strict mode; set strict: false to skip and count such samples)"
            )
        return skip(reason, where, detail)
