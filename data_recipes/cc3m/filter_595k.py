"""Keep only the CC3M rows of LLaVA-CC3M-Pretrain-595K, as a TSV ready for img2dataset.

LLaVA v1's stage-1 set names its images ``GCC_train_000000123.jpg``: the number is the 0-based row
index in the CC3M training TSV (``Train_GCC-training.tsv``: ``caption<TAB>url``, no header).
``--ids`` is either the 595K ``chat.json`` (or ``metadata.json``: any JSON list of records with an
``image`` or ``id`` field naming ``GCC_train_N``) or a text file with one index (``123``) or name
(``GCC_train_000000123.jpg``) per line. The output keeps the TSV order and starts with the header
``caption<TAB>url`` that img2dataset needs.

    python data_recipes/cc3m/filter_595k.py --tsv Train_GCC-training.tsv \\
        --ids LLaVA-CC3M-Pretrain-595K/chat.json --out cc3m_595k.tsv
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("data_recipes.cc3m.filter_595k")

GCC_NAME = re.compile(r"GCC_train_(\d+)")
HEADER = "caption\turl"


def index_of(name: str) -> int:
    """``GCC_train_000000123.jpg`` or ``123`` -> 123 (ValueError otherwise)."""
    text = name.strip()
    match = GCC_NAME.search(text)
    if match:
        return int(match.group(1))
    if text.isdigit():
        return int(text)
    raise ValueError(f"not a CC3M row id: {name!r}")


def load_ids(path: Path) -> set[int]:
    """Row indices from a 595K chat.json / metadata.json or a text file of indices or names."""
    text = path.read_text(encoding="utf-8")
    ids: set[int] = set()
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        for i, record in enumerate(json.loads(text)):
            name = (record.get("image") or record.get("id")) if isinstance(record, dict) else record
            try:
                ids.add(index_of(str(name)))
            except ValueError as err:
                raise ValueError(f"{path}: record {i}: {err}") from err
        return ids
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            ids.add(index_of(line))
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from err
    return ids


def filter_tsv(tsv: Path, ids: set[int], out: Path) -> dict[str, int]:
    """Copy the rows whose 0-based index is in ``ids``; returns counts."""
    kept = malformed = rows = 0
    seen: set[int] = set()
    out.parent.mkdir(parents=True, exist_ok=True)
    # newline="\n": only LF ends a row (a stray CR inside a caption must not shift the indices);
    # surrogateescape: copy any byte sequence through unchanged.
    with (
        tsv.open(encoding="utf-8", errors="surrogateescape", newline="\n") as src,
        out.open("w", encoding="utf-8", errors="surrogateescape", newline="\n") as dst,
    ):
        dst.write(HEADER + "\n")
        first = True
        for line in src:
            row = line.rstrip("\r\n")
            if first:
                first = False
                if row == HEADER:  # already has the img2dataset header: not a data row
                    log.info("%s starts with a header line; row indices count from the line after it", tsv)
                    continue
            index = rows
            rows += 1
            if index not in ids:
                continue
            seen.add(index)
            if row.count("\t") != 1:
                malformed += 1
                log.warning("row %d is not caption<TAB>url; skipped: %r", index, row[:200])
                continue
            dst.write(row + "\n")
            kept += 1
    not_found = len(ids - seen)
    if not_found:
        log.warning("%d requested ids are beyond the %d rows of %s", not_found, rows, tsv)
    return {"rows": rows, "requested": len(ids), "kept": kept, "not_found": not_found, "malformed": malformed}


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tsv", type=Path, required=True, help="CC3M Train_GCC-training.tsv (caption<TAB>url)")
    p.add_argument("--ids", type=Path, required=True, help="595K chat.json, or a text file of row indices")
    p.add_argument("--out", type=Path, required=True, help="filtered TSV with a caption<TAB>url header")
    return p.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    ids = load_ids(args.ids)
    log.info("%d distinct ids in %s", len(ids), args.ids)
    c = filter_tsv(args.tsv, ids, args.out)
    print(
        f"filter_595k: kept {c['kept']} of {c['rows']} rows ({c['requested']} requested, "
        f"{c['not_found']} not found, {c['malformed']} malformed) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
