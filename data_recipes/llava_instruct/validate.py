"""Check a LLaVA instruction JSON against its image folder before a long training run.

Lists the samples whose image(s) are missing under ``--image-root`` or, with ``--check-decode``,
cannot be decoded by PIL. ``image`` may be a string or a list (multi-image samples); samples
without ``image`` are text-only and fine. A sample whose ``image`` field is neither is reported
as invalid. Each distinct file is checked once (mix665k reuses COCO images), in ``--workers``
threads. Prints a one-line summary, writes the bad samples as JSON lines to ``--report`` and
exits with 1 if any sample is bad, else 0.

    python data_recipes/llava_instruct/validate.py --json playground/data/llava_v1_5_mix665k.json \\
        --image-root playground/data --check-decode --workers 16 --report bad.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger("data_recipes.llava_instruct.validate")

MAX_LOGGED = 20


def image_paths(record: Mapping[str, Any]) -> list[str] | None:
    """The sample's image paths ([] for text-only); None when the field is malformed."""
    if "image" not in record or record["image"] is None:
        return []
    image = record["image"]
    if isinstance(image, str) and image:
        return [image]
    if isinstance(image, list) and image and all(isinstance(p, str) and p for p in image):
        return list(image)
    return None


def check_file(path: Path, decode: bool) -> str | None:
    """None if fine, else "missing" or "unreadable: <error>"."""
    if not path.is_file():
        return "missing"
    if decode:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as err:  # PIL raises many types for a bad file
            return f"unreadable: {type(err).__name__}: {err}"
    return None


def validate(
    records: Sequence[Mapping[str, Any]], image_root: Path, decode: bool = False, workers: int = 8
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Returns (summary counts, bad entries)."""
    per_sample: list[list[str] | None] = [image_paths(r) for r in records]
    unique = sorted({p for paths in per_sample if paths for p in paths})
    log.info(
        "%d samples, %d distinct image files; checking%s",
        len(records),
        len(unique),
        " and decoding" if decode else "",
    )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = dict(
            zip(unique, pool.map(lambda p: check_file(image_root / p, decode), unique, chunksize=64))
        )
    summary = {
        "total": len(records),
        "text_only": 0,
        "images_checked": len(unique),
        "missing": 0,
        "unreadable": 0,
        "invalid": 0,
        "bad_samples": 0,
    }
    bad: list[dict[str, Any]] = []
    for index, (record, paths) in enumerate(zip(records, per_sample)):
        if paths is None:
            problems = [{"path": None, "error": f"invalid image field: {record.get('image')!r}"}]
            summary["invalid"] += 1
        elif not paths:
            summary["text_only"] += 1
            continue
        else:
            problems = [{"path": p, "error": results[p]} for p in paths if results[p] is not None]
        if problems:
            bad.append(
                {"index": index, "id": record.get("id"), "image": record.get("image"), "problems": problems}
            )
            if len(bad) <= MAX_LOGGED:
                log.warning("sample #%d (id %s): %s", index, record.get("id"), problems)
    summary["missing"] = sum(1 for err in results.values() if err == "missing")
    summary["unreadable"] = sum(1 for err in results.values() if err is not None and err != "missing")
    summary["bad_samples"] = len(bad)
    return summary, bad


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="LLaVA instruction JSON (list of samples)")
    p.add_argument("--image-root", type=Path, required=True, help="folder the image paths are relative to")
    p.add_argument("--check-decode", action="store_true", help="also decode every image with PIL (slower)")
    p.add_argument("--workers", type=int, default=min(32, (os.cpu_count() or 1) * 2), help="checking threads")
    p.add_argument("--report", type=Path, default=None, help="write the bad samples here as JSON lines")
    return p.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    records = json.loads(args.json.read_text(encoding="utf-8"))
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SystemExit(f"{args.json}: expected a JSON list of objects")
    summary, bad = validate(records, args.image_root, args.check_decode, args.workers)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        with args.report.open("w", encoding="utf-8") as f:
            for entry in bad:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        log.info("%d bad samples written to %s", len(bad), args.report)
    unreadable = summary["unreadable"] if args.check_decode else "not checked"
    print(
        f"validate: total {summary['total']} samples, text-only {summary['text_only']}, "
        f"image files {summary['images_checked']}: missing {summary['missing']}, unreadable {unreadable}; "
        f"invalid image fields {summary['invalid']}; bad samples {summary['bad_samples']}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
