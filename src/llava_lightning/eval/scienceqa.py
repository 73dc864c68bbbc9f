"""ScienceQA: option-letter accuracy, overall and on the questions with an image (SQA-IMG).

Reproduces LLaVA's `llava/eval/eval_science_qa.py`: a reply is read as a letter when it is exactly one of
A-E, or starts with a letter followed by ". ", or holds exactly one "The answer is X." (X any capital);
anything else, a letter beyond the question's choices, or no reply at all is wrong. (This is stricter
than `multiple_choice.parse_letter`, which the generation-side evaluation uses.) IMG accuracy is over
the problems with an `image` (LLaVA tests '<image>' in the prompt, which its question file puts there
for exactly those). Annotations: ScienceQA's `problems.json` ({pid: {`choices`, `answer` (index),
`image`, ...}}) with `pid_splits.json` beside it (or the folder holding both); the split is `test`
unless given. In percent.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .answers import Coverage, ScoringError, index_answers, note_unknown, percent, read_json

OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_letter(text: str) -> str | None:
    """The letter LLaVA's ScienceQA scorer reads from a reply, or None ("FAILED")."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def score_scienceqa(
    answers: list[dict[str, Any]],
    annotations: str | Path,
    *,
    split: str | None = None,
    subset: bool = False,
    strict: bool = False,
) -> dict[str, Any]:
    """ScienceQA accuracy on `split` (default test)."""
    path = Path(annotations)
    problems_path = path / "problems.json" if path.is_dir() else path
    problems = read_json(problems_path, "ScienceQA problems file")
    if not isinstance(problems, dict):
        raise ScoringError(f"{problems_path}: expected ScienceQA's {{pid: problem}} layout")
    splits = read_json(
        problems_path.parent / "pid_splits.json", "ScienceQA split file (beside problems.json)"
    )
    split = split or "test"
    if split not in splits:
        raise ScoringError(
            f"{problems_path.parent / 'pid_splits.json'}: no split {split!r} (has {sorted(splits)})"
        )
    coverage = Coverage()
    by_id = index_answers(answers, coverage)
    rows: list[tuple[bool, bool]] = []  # (correct, has image)
    for pid in splits[split]:
        problem = problems.get(pid)
        if problem is None:
            raise ScoringError(f"{problems_path}: split {split!r} names problem {pid!r}, which is not there")
        answer = by_id.pop(str(pid), None)
        if answer is None:
            coverage.note("missing", f"problem {pid!r} has no answer" + ("" if subset else " (wrong)"))
            if subset:
                continue
            letter = None
        else:
            letter = parse_scienceqa_letter(answer["text"])
        n_choices = len(problem["choices"])
        correct = (
            letter is not None
            and letter in OPTIONS[:n_choices]
            and OPTIONS.index(letter) == problem["answer"]
        )
        coverage.scored += 1
        rows.append((correct, bool(problem.get("image"))))
    note_unknown(by_id, coverage, f"split {split!r} of {problems_path}")
    coverage.check(strict, str(problems_path))
    img = [c for c, has_image in rows if has_image]
    return {
        "accuracy": percent(sum(c for c, _ in rows), len(rows)),
        "img_accuracy": percent(sum(img), len(img)),
        "n": len(rows),
        "n_img": len(img),
        "coverage": coverage.as_dict(),
    }
