"""Pack LLaVA-Pretrain (LCS-558K, ``blip_laion_cc_sbu_558k.json``) into img2dataset-style caption shards.

Input: the LLaVA-Pretrain JSON (records ``{"id", "image", "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": CAPTION}]}``) and the unzipped ``images.zip``
folder. Output: ``OUT/shard-00000.tar ...`` with, per sample, ``{key}.jpg`` (the original bytes,
not re-encoded; a non-JPEG file keeps its own extension, e.g. ``{key}.png``), ``{key}.txt`` (the
caption = the gpt turn) and ``{key}.json`` (key, original id and image path, caption, size).
Keys are 9-digit running numbers in JSON order. ``OUT/sizes.json`` maps each shard's file name to
its sample count (``{"shard-00000.tar": 10000, ...}``), which ``CaptionShards`` reads to split the
samples over ranks exactly once.

Samples whose image is missing or unreadable, or that have no caption, are skipped; every skip
is counted, logged and listed in ``OUT/skipped.jsonl``; ``OUT/stats.json`` holds the counts.

    python data_recipes/lcs558k_to_shards.py --json LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \\
        --image-root LLaVA-Pretrain/images --out data/lcs558k_shards --shard-size 10000
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger("data_recipes.lcs558k_to_shards")

MAX_LOGGED_SKIPS = 20


class ShardWriter:
    """Writes ``{out}/shard-{n:05d}.tar`` files of at most ``shard_size`` samples (mtime 0)."""

    def __init__(self, out: Path, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.out = out
        self.shard_size = shard_size
        self.shards = 0
        self.samples = 0
        self.sizes: dict[str, int] = {}  # samples per shard file name
        self._in_shard = 0
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, files: Mapping[str, bytes]) -> None:
        if self._tar is None or self._in_shard >= self.shard_size:
            self.close()
            self._tar = tarfile.open(
                self.out / f"shard-{self.shards:05d}.tar", "w", format=tarfile.USTAR_FORMAT
            )
            self.shards += 1
            self._in_shard = 0
            self.sizes[f"shard-{self.shards - 1:05d}.tar"] = 0
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.samples += 1
        self.sizes[f"shard-{self.shards - 1:05d}.tar"] += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def caption_of(record: Mapping[str, Any]) -> str | None:
    """The first gpt turn's text, stripped; None when there is none."""
    for turn in record.get("conversations") or []:
        if turn.get("from") == "gpt":
            text = str(turn.get("value", "")).strip()
            return text or None
    return None


def read_image(path: Path, verify: bool = True) -> tuple[bytes, str, int | None, int | None]:
    """(bytes, extension for the shard, width, height); raises OSError if missing or unreadable."""
    data = path.read_bytes()
    suffix = path.suffix.lower().lstrip(".")
    if not verify:
        ext = "jpg" if suffix in ("jpg", "jpeg") else (suffix or "bin")
        return data, ext, None, None
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
            img.verify()
    except Exception as err:  # PIL raises many types for a bad file
        raise OSError(f"unreadable: {type(err).__name__}: {err}") from err
    ext = "jpg" if fmt == "JPEG" else (suffix or str(fmt).lower())
    return data, ext, width, height


def convert(
    records: Iterable[Mapping[str, Any]],
    image_root: Path,
    out: Path,
    shard_size: int = 10000,
    verify: bool = True,
) -> dict[str, Any]:
    """Write the shards; returns the stats (written, shards, skipped by reason)."""
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, int] = {"missing": 0, "unreadable": 0, "no_caption": 0, "no_image": 0}
    n_logged = 0
    with (
        ShardWriter(out, shard_size) as writer,
        (out / "skipped.jsonl").open("w", encoding="utf-8") as skip_log,
    ):

        def skip(index: int, record: Mapping[str, Any], reason: str, detail: str) -> None:
            nonlocal n_logged
            skipped[reason] += 1
            entry = {
                "index": index,
                "id": record.get("id"),
                "image": record.get("image"),
                "reason": reason,
                "detail": detail,
            }
            skip_log.write(json.dumps(entry, ensure_ascii=False) + "\n")
            if n_logged < MAX_LOGGED_SKIPS:
                log.warning("skipped #%d (id %s): %s: %s", index, record.get("id"), reason, detail)
                n_logged += 1
                if n_logged == MAX_LOGGED_SKIPS:
                    log.warning("further skips are only listed in %s", out / "skipped.jsonl")

        for index, record in enumerate(records):
            image = record.get("image")
            if not image:
                skip(index, record, "no_image", "record has no image")
                continue
            text = caption_of(record)
            if text is None:
                skip(index, record, "no_caption", "no gpt turn with text")
                continue
            path = image_root / str(image)
            if not path.is_file():
                skip(index, record, "missing", str(path))
                continue
            try:
                data, ext, width, height = read_image(path, verify)
            except OSError as err:
                skip(index, record, "unreadable", f"{path}: {err}")
                continue
            key = f"{writer.samples:09d}"
            meta: dict[str, Any] = {"key": key, "id": record.get("id"), "image": str(image), "caption": text}
            if width is not None:
                meta["width"], meta["height"] = width, height
            writer.write(
                key,
                {
                    ext: data,
                    "txt": text.encode("utf-8"),
                    "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                },
            )
            if writer.samples % 50000 == 0:
                log.info("%d samples written", writer.samples)
    stats = {
        "written": writer.samples,
        "shards": writer.shards,
        "skipped": sum(skipped.values()),
        "skipped_by_reason": skipped,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    (out / "sizes.json").write_text(json.dumps(writer.sizes, indent=1) + "\n", encoding="utf-8")
    return stats


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="blip_laion_cc_sbu_558k.json")
    p.add_argument(
        "--image-root", type=Path, required=True, help="folder the records' image paths are relative to"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for shard-*.tar")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    p.add_argument("--no-verify", action="store_true", help="skip the PIL check of each image (faster)")
    return p.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    records = json.loads(args.json.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise SystemExit(f"{args.json}: expected a JSON list of records")
    log.info("%d records in %s", len(records), args.json)
    stats = convert(records, args.image_root, args.out, args.shard_size, verify=not args.no_verify)
    reasons = ", ".join(f"{k} {v}" for k, v in stats["skipped_by_reason"].items() if v)
    print(
        f"lcs558k_to_shards: written {stats['written']} in {stats['shards']} shards, "
        f"skipped {stats['skipped']}{f' ({reasons})' if reasons else ''} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
