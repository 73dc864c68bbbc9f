"""Free-form description check for the synthetic shapes set: does the model's answer to "Describe the
image briefly." name the right colour and shape of a one-shape image?

Records are the held-out set's (`data.synthetic.write_eval`), which carry the drawn scene::

    {"image": "images/000001.jpg", "scene": [{"shape": "circle", "colour": "red", "position": "center"}], ...}

Only one-shape scenes count (a description of several shapes has no single right colour), each image
once. Decoding is greedy. A reply is right when the first colour word in it is the shape's colour and
the first shape word is its shape ("A red circle in the center." is right; "A blue circle ..." is not;
a reply naming neither is wrong).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..data.image import decode_image
from ..data.image_paths import ImageRoot, record_image_paths
from ..inference.generate import generate

DESCRIBE_PROMPT = "Describe the image briefly."


def _first(words: tuple[str, ...], text: str) -> str | None:
    """The word of `words` that occurs first in `text` (whole words, case-insensitive), or None."""
    found = [(m.start(), w) for w in words if (m := re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE))]
    return min(found)[1] if found else None


def single_shape_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records whose scene holds exactly one shape, each image once (first record wins)."""
    seen: set[str] = set()
    out = []
    for r in records:
        scene = r.get("scene")
        if not isinstance(scene, list) or len(scene) != 1 or r.get("image") in seen:
            continue
        seen.add(r["image"])
        out.append(r)
    return out


def evaluate_descriptions(
    model,
    records: list[dict[str, Any]],
    image_root: str | Path,
    colours: tuple[str, ...],
    shapes: tuple[str, ...],
    batch_size: int = 32,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """Rates over the one-shape records: `accuracy` (colour and shape right), `colour`, `shape`, with
    `n` and a few `examples` (image, reply, right)."""
    chosen = single_shape_records(records)
    if not chosen:
        raise ValueError(
            "no record with a one-shape `scene`: use the synthetic held-out set (format 7 or later)"
        )
    root = ImageRoot(image_root)
    both = colour_ok = shape_ok = 0
    examples = []
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start : start + batch_size]
        images = [decode_image(root.resolve(record_image_paths(r)[0])) for r in batch]
        replies = generate(model, images, [DESCRIBE_PROMPT] * len(batch), max_new_tokens=max_new_tokens)
        for r, reply in zip(batch, replies):
            truth = r["scene"][0]
            c = _first(colours, reply) == truth["colour"]
            s = _first(shapes, reply) == truth["shape"]
            colour_ok += c
            shape_ok += s
            both += c and s
            if len(examples) < 6:
                examples.append({"image": r["image"], "reply": reply, "right": bool(c and s)})
    n = len(chosen)
    return {
        "n": n,
        "accuracy": both / n,
        "colour": colour_ok / n,
        "shape": shape_ok / n,
        "examples": examples,
    }
