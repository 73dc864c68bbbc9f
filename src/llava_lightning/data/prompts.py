"""Prompts for generation: the first human turn (and its images) of LLaVA-format JSON records.

`predict` and the multiple-choice evaluation read records the way LLaVA's eval scripts do: the
human turn, without its `<image>` placeholder lines (generation puts one back per image), is the
prompt; the record's `image` (a path or a list of paths, relative to `image_root`) are its images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..batch import PromptBatch
from .image import decode_image
from .image_paths import ImageRoot, record_image_paths

IMAGE = "<image>"


def prompt_of(record: dict[str, Any]) -> str:
    """The first human turn without `<image>` placeholders."""
    turns = record.get("conversations") or []
    first = turns[0] if isinstance(turns, list) and turns else None
    if not isinstance(first, dict) or first.get("from") != "human" or not isinstance(first.get("value"), str):
        raise ValueError(f"record {record.get('id')!r} has no human turn with a string 'value' first")
    text = first["value"]
    while text.startswith(IMAGE + "\n"):
        text = text[len(IMAGE) + 1 :]
    return text.replace(IMAGE, "").strip() if IMAGE in text else text


class PromptDataset(Dataset):
    """Records of a LLaVA JSON file as `{"id", "prompt", "images"}` (decoded PIL images, or None).
    Images are read from inside `image_root` only (default: the JSON's folder; see `ImageRoot`)."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None, follow_links: bool = False):
        self.path = Path(path)
        records = json.loads(self.path.read_text())
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        self.records = records
        self.image_root = ImageRoot(image_root if image_root is not None else self.path.parent, follow_links)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        if not isinstance(record, dict):
            raise ValueError(f"{self.path} record {index} is a {type(record).__name__}, not an object")
        where = f"{self.path} record {index} (id {record.get('id')!r})"
        try:
            prompt = prompt_of(record)
            paths = [self.image_root.resolve(p) for p in record_image_paths(record)]
            images = [decode_image(p) for p in paths] if paths else None
        except (ValueError, OSError) as err:
            # Prediction has no skip: a reply per record is the contract, so name the record and stop.
            raise ValueError(f"{where}: {err}; fix the record or its image path (image_root)") from err
        return {"id": record.get("id", index), "prompt": prompt, "images": images}


def collate_prompts(items: list[dict[str, Any]]) -> PromptBatch:
    """Lists, not tensors: generation tokenizes and pads (left) itself."""
    return PromptBatch(
        id=[item["id"] for item in items],
        prompt=[item["prompt"] for item in items],
        images=[item["images"] for item in items],
    )
