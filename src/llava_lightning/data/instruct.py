"""Instruction JSON (LLaVA-Instruct-158K, llava_v1_5_mix665k, LCS-558K, ScienceQA-converted) as a map-style dataset.

The JSON is parsed once per process into a compact index: every record re-serialised into one
`bytes` buffer plus a numpy offset array (and per-record image counts). Forked DataLoader workers
share those pages copy-on-write without touching per-record Python objects (a list of dicts would
be copied page by page into every worker as refcounts change), and spawned workers receive two
flat buffers. Records may have no image (text-only), one (`"image": "a.jpg"`) or several
(`"image": ["a.jpg", "b.jpg"]`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .image_paths import ImagePathError, ImageRoot, record_image_paths
from .sample import SampleEncoder, padding

log = logging.getLogger(__name__)


def _image_count(record: Any) -> int:
    """Images a record names (0 for a malformed record: it becomes a counted skip when read)."""
    try:
        return len(record_image_paths(record)) if isinstance(record, dict) else 0
    except ImagePathError:
        return 0


class InstructionIndex:
    """A compact, read-only view of a LLaVA-format JSON list."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"instruction JSON {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); expected a list of LLaVA records") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        chunks, offsets, images = [], [0], []
        for record in records:
            blob = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            chunks.append(blob)
            offsets.append(offsets[-1] + len(blob))
            images.append(_image_count(record))
        del records
        self.buffer = b"".join(chunks)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.num_images = np.asarray(images, dtype=np.int16)
        self._words: np.ndarray | None = None
        log.info("indexed %d records of %s (%.1f MB)", len(self), path, len(self.buffer) / 1e6)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Any:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return json.loads(self.buffer[start:end])

    def word_counts(self) -> np.ndarray:
        """Whitespace-separated words of each record's turns (0 for a malformed record): a length
        estimate that needs no tokenizer. Computed on first use (one parse of the buffer), then kept."""
        if self._words is None:
            words = np.zeros(len(self), dtype=np.int32)
            for i in range(len(self)):
                record = self[i]
                turns = record.get("conversations") if isinstance(record, dict) else None
                if isinstance(turns, list):
                    words[i] = sum(
                        len(turn["value"].split())
                        for turn in turns
                        if isinstance(turn, dict) and isinstance(turn.get("value"), str)
                    )
            self._words = words
        return self._words


class InstructionDataset(Dataset):
    """Encoded samples of an instruction JSON; images are read from inside `image_root` only
    (`image_paths.ImageRoot`: a path that leaves it is a `path_outside_root` skip)."""

    def __init__(
        self,
        index: InstructionIndex | str | Path,
        image_root: str | Path,
        encoder: SampleEncoder,
        follow_links: bool = False,
    ):
        self.index = index if isinstance(index, InstructionIndex) else InstructionIndex(index)
        self.image_root = ImageRoot(image_root, follow_links)
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int | None) -> dict[str, Any]:
        if i is None:  # `EpochSampler.PAD`: a slot that evens out the ranks, counted as `padding`
            return padding(f"{self.index.path}[padding]")
        record = self.index[i]
        where = f"{self.index.path}[{i}]"
        if not isinstance(record, dict) or "conversations" not in record:
            return self.encoder.fail("malformed_record", where, "record needs a 'conversations' list")
        where += f" id={record.get('id')}"
        try:
            paths = [self.image_root.resolve(p) for p in record_image_paths(record)]
        except ImagePathError as err:
            return self.encoder.fail(err.reason, where, str(err))
        except FileNotFoundError as err:
            return self.encoder.fail("missing_image", where, str(err))
        except (OSError, ValueError) as err:  # unreadable path: permissions, a name too long, a NUL byte
            return self.encoder.fail("bad_image", where, f"{type(err).__name__}: {err}")
        return self.encoder(record["conversations"], paths, where)
