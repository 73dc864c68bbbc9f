"""GQA: exact-match accuracy, overall, binary / open and per structural and semantic type.

Reproduces LLaVA's `scripts/convert_gqa_for_eval.py` (prediction = reply with trailing periods stripped,
lowercased) followed by GQA's official `eval.py`: a question is right when the prediction equals its
`answer` exactly; only `isBalanced` questions count; "open" questions are those whose structural type is
`query`, the rest "binary". Annotations: `testdev_balanced_questions.json`, {question id: {`answer`,
`isBalanced`, `types`: {`structural`, `semantic`, ...}, ...}}. In percent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .answers import Coverage, ScoringError, index_answers, note_unknown, percent, read_json


def gqa_prediction(text: str) -> str:
    """LLaVA's GQA conversion of a reply."""
    return text.rstrip(".").lower()


def _rates(groups: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {k: {"accuracy": percent(sum(v), len(v)), "n": len(v)} for k, v in sorted(groups.items())}


def score_gqa(
    answers: list[dict[str, Any]], annotations: str | Path, *, subset: bool = False, strict: bool = False
) -> dict[str, Any]:
    """GQA accuracy; a balanced question without an answer counts wrong unless `subset` (GQA's eval.py
    refuses a prediction file that lacks one)."""
    questions = read_json(annotations, "GQA question file")
    if not isinstance(questions, dict):
        raise ScoringError(f"{annotations}: expected GQA's {{question id: {{'answer', ...}}}} layout")
    coverage = Coverage()
    by_id = index_answers(answers, coverage)
    scores: list[float] = []
    kinds: dict[str, list[float]] = {}
    structural: dict[str, list[float]] = {}
    semantic: dict[str, list[float]] = {}
    for qid, q in questions.items():
        answer = by_id.pop(str(qid), None)
        if not q.get("isBalanced", True):
            continue
        if "answer" not in q:
            raise ScoringError(f"{annotations}: question {qid} has no 'answer'")
        if answer is None:
            coverage.note(
                "missing", f"question {qid!r} has no answer" + ("" if subset else " (scored wrong)")
            )
            if subset:
                continue
            score = 0.0
        else:
            score = float(gqa_prediction(answer["text"]) == q["answer"])
        coverage.scored += 1
        scores.append(score)
        types = q.get("types") or {}
        if "structural" in types:
            kinds.setdefault("open" if types["structural"] == "query" else "binary", []).append(score)
            structural.setdefault(str(types["structural"]), []).append(score)
        if "semantic" in types:
            semantic.setdefault(str(types["semantic"]), []).append(score)
    note_unknown(by_id, coverage, str(annotations))
    coverage.check(strict, str(annotations))
    result: dict[str, Any] = {"accuracy": percent(sum(scores), len(scores)), "n": len(scores)}
    for kind in ("binary", "open"):
        if kind in kinds:
            result[kind] = percent(sum(kinds[kind]), len(kinds[kind]))
    result["per_structural_type"] = _rates(structural)
    result["per_semantic_type"] = _rates(semantic)
    return {**result, "coverage": coverage.as_dict()}
