"""SEED-Bench: multiple-choice accuracy, overall, image / video, and per question type.

Reproduces LLaVA's `scripts/convert_seed_for_submission.py`: a reply is right when it equals the answer
letter exactly (LLaVA asks for "the option's letter ... directly" and strips the reply; "B." or
"(B)" is wrong), and a question without a reply counts wrong. Annotations: `SEED-Bench.json`,
{`questions`: [{`question_id`, `answer`, `question_type_id`, `data_type`}], `question_type`: {name: id}}.
Question ids match as strings (LLaVA tries int and str). In percent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .answers import Coverage, ScoringError, index_answers, note_unknown, percent, read_json


def score_seed(
    answers: list[dict[str, Any]], annotations: str | Path, *, subset: bool = False, strict: bool = False
) -> dict[str, Any]:
    """SEED-Bench accuracies; `subset` scores only the questions that have an answer."""
    data = read_json(annotations, "SEED-Bench annotation file")
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list):
        raise ScoringError(f"{annotations}: expected SEED-Bench's {{'questions': [...]}} layout")
    type_names = {str(v): k for k, v in (data.get("question_type") or {}).items()}
    coverage = Coverage()
    by_id = index_answers(answers, coverage)
    overall: list[bool] = []
    per_type: dict[str, list[bool]] = {}
    per_data: dict[str, list[bool]] = {}
    for i, q in enumerate(questions):
        if "question_id" not in q or "answer" not in q:
            raise ScoringError(f"{annotations}: questions[{i}] needs 'question_id' and 'answer'")
        answer = by_id.pop(str(q["question_id"]), None)
        if answer is None:
            coverage.note(
                "missing", f"question {q['question_id']!r} has no answer" + ("" if subset else " (wrong)")
            )
            if subset:
                continue
            correct = False
        else:
            correct = answer["text"] == q["answer"]
        coverage.scored += 1
        overall.append(correct)
        type_id = str(q.get("question_type_id"))
        per_type.setdefault(type_names.get(type_id, type_id), []).append(correct)
        per_data.setdefault(str(q.get("data_type", "image")), []).append(correct)
    note_unknown(by_id, coverage, str(annotations))
    coverage.check(strict, str(annotations))
    result: dict[str, Any] = {"accuracy": percent(sum(overall), len(overall)), "n": len(overall)}
    for kind, rows in sorted(per_data.items()):
        result[f"{kind}_accuracy"] = percent(sum(rows), len(rows))
    result["per_question_type"] = {
        k: {"accuracy": percent(sum(v), len(v)), "n": len(v)} for k, v in per_type.items()
    }
    return {**result, "coverage": coverage.as_dict()}
