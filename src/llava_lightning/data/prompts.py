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

from .image import decode_image

IMAGE = "<image>"


def image_paths(record: dict[str, Any]) -> list[str]:
    """The record's image paths (none, one, or several)."""
    image = record.get("image")
    if not image:
        return []
    return [image] if isinstance(image, str) else [str(p) for p in image]


def prompt_of(record: dict[str, Any]) -> str:
    """The first human turn without `<image>` placeholders."""
    turns = record.get("conversations") or []
    if not turns or turns[0].get("from") != "human":
        raise ValueError(f"record {record.get('id')!r} has no human turn first")
    text = str(turns[0]["value"])
    while text.startswith(IMAGE + "\n"):
        text = text[len(IMAGE) + 1 :]
    return text.replace(IMAGE, "").strip() if IMAGE in text else text


class PromptDataset(Dataset):
    """Records of a LLaVA JSON file as `{"id", "prompt", "images"}` (decoded PIL images, or None)."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None):
        self.path = Path(path)
        records = json.loads(self.path.read_text())
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        self.records = records
        self.image_root = Path(image_root) if image_root is not None else self.path.parent

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        where = f"{self.path} record {index} (id {record.get('id')!r})"
        try:
            prompt = prompt_of(record)
            paths = image_paths(record)
            images = [decode_image(self.image_root / p) for p in paths] if paths else None
        except (ValueError, OSError) as err:
            # Prediction has no skip: a reply per record is the contract, so name the record and stop.
            raise ValueError(f"{where}: {err}; fix the record or its image path (image_root)") from err
        return {"id": record.get("id", index), "prompt": prompt, "images": images}


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Lists, not tensors: generation tokenizes and pads (left) itself."""
    return {key: [item[key] for item in items] for key in ("id", "prompt", "images")}
