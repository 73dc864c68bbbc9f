"""Convert ScienceQA (problems.json + pid_splits.json) to LLaVA conversation JSON, one file per split.

Each problem becomes one record in the LLaVA-1.5 ScienceQA evaluation layout::

    {"id": pid,
     "image": "{split}/{pid}/image.png",          # only when the problem has an image
     "conversations": [
         {"from": "human", "value": "<image>\\nContext: {hint}\\n{question}\\nA. ...\\nB. ...\\n"
                                    "Answer with the option's letter from the given choices directly."},
         {"from": "gpt", "value": "B"}],
     "answer_letter": "B",
     "options": ["choice 0", "choice 1", ...]}

``<image>\\n`` is present only for problems with an image and ``Context: ...\\n`` only when the hint
is non-empty. ``image`` is relative to ``--image-root`` (ScienceQA's ``{root}/{split}/{pid}/image.png``,
where ``split`` is the problem's own split field, so ``minival`` records point into ``val/``).

    python data_recipes/scienceqa_to_llava.py --problems ScienceQA/data/scienceqa/problems.json \\
        --pid-splits ScienceQA/data/scienceqa/pid_splits.json --image-root ScienceQA/images \\
        --out data/scienceqa --splits train val test
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("data_recipes.scienceqa_to_llava")

ANSWER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def letter(index: int) -> str:
    return chr(ord("A") + index)


def build_prompt(question: str, choices: Sequence[str], hint: str = "", has_image: bool = False) -> str:
    """The human turn: [<image>\\n][Context: hint\\n]question\\nA. ..\\nB. ..\\nAnswer with ..."""
    options = "\n".join(f"{letter(i)}. {c}" for i, c in enumerate(choices))
    context = (hint or "").strip()
    text = f"Context: {context}\n{question}\n{options}" if context else f"{question}\n{options}"
    text += ANSWER_SUFFIX
    return ("<image>\n" + text) if has_image else text


def convert_problem(pid: str, problem: Mapping[str, Any], split: str) -> dict[str, Any]:
    """One ScienceQA problem -> one LLaVA record (raises ValueError on a malformed problem)."""
    choices = [str(c) for c in problem.get("choices") or []]
    if not choices:
        raise ValueError("no choices")
    if len(choices) > 26:
        raise ValueError(f"{len(choices)} choices (more than letters A-Z)")
    answer = problem.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise ValueError(f"answer {answer!r} is not an index into {len(choices)} choices")
    image = problem.get("image")
    record: dict[str, Any] = {"id": pid}
    if image:
        record["image"] = f"{problem.get('split') or split}/{pid}/{image}"
    answer_letter = letter(answer)
    record["conversations"] = [
        {
            "from": "human",
            "value": build_prompt(
                str(problem.get("question", "")), choices, str(problem.get("hint") or ""), bool(image)
            ),
        },
        {"from": "gpt", "value": answer_letter},
    ]
    record["answer_letter"] = answer_letter
    record["options"] = choices
    return record


def convert_split(
    problems: Mapping[str, Mapping[str, Any]],
    pids: Iterable[str],
    split: str,
    image_root: Path | None = None,
    drop_missing_images: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Convert the problems of one split; returns (records, counts of what happened)."""
    records: list[dict[str, Any]] = []
    counts = {
        "written": 0,
        "with_image": 0,
        "unknown_pid": 0,
        "malformed": 0,
        "missing_image": 0,
        "dropped": 0,
    }
    for pid in pids:
        pid = str(pid)
        problem = problems.get(pid)
        if problem is None:
            counts["unknown_pid"] += 1
            log.warning("%s: pid %s is not in problems.json; skipped", split, pid)
            continue
        try:
            record = convert_problem(pid, problem, split)
        except ValueError as err:
            counts["malformed"] += 1
            log.warning("%s: pid %s skipped: %s", split, pid, err)
            continue
        if "image" in record and image_root is not None and not (image_root / record["image"]).is_file():
            counts["missing_image"] += 1
            log.warning("%s: pid %s: image %s not found under %s", split, pid, record["image"], image_root)
            if drop_missing_images:
                counts["dropped"] += 1
                continue
        counts["written"] += 1
        counts["with_image"] += "image" in record
        records.append(record)
    return records, counts


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=Path, required=True, help="ScienceQA problems.json")
    p.add_argument("--pid-splits", type=Path, required=True, help="ScienceQA pid_splits.json")
    p.add_argument("--image-root", type=Path, required=True, help="folder holding {split}/{pid}/image.png")
    p.add_argument("--out", type=Path, required=True, help="output folder for scienceqa_{split}.json")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    p.add_argument(
        "--drop-missing-images",
        action="store_true",
        help="leave out problems whose image file is absent (default: keep them, with a warning)",
    )
    return p.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    problems = json.loads(args.problems.read_text(encoding="utf-8"))
    pid_splits = json.loads(args.pid_splits.read_text(encoding="utf-8"))
    unknown = [s for s in args.splits if s not in pid_splits]
    if unknown:
        raise SystemExit(f"split(s) {unknown} not in {args.pid_splits} (has: {sorted(pid_splits)})")
    args.out.mkdir(parents=True, exist_ok=True)
    parts = []
    for split in args.splits:
        records, counts = convert_split(
            problems, pid_splits[split], split, args.image_root, args.drop_missing_images
        )
        path = args.out / f"scienceqa_{split}.json"
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        log.info("%s: %s -> %s", split, counts, path)
        skipped = counts["unknown_pid"] + counts["malformed"] + counts["dropped"]
        parts.append(
            f"{split} {counts['written']} ({counts['with_image']} with image, {skipped} skipped, "
            f"{counts['missing_image']} missing images)"
        )
    print(f"scienceqa_to_llava: {'; '.join(parts)} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
