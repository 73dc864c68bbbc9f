"""Answer files in LLaVA's format, and the bookkeeping of matching answers to a benchmark's questions.

An answer file is JSON lines, one answer per line: `{"question_id": ..., "prompt": ..., "text": ...}`
(LLaVA's `model_vqa_loader.py` also writes `answer_id`, `model_id`, `metadata`; extra keys are ignored).
`load_answers` keeps the good lines and names each bad one; a scorer then matches answers to the
annotation's questions through a `Coverage`, which counts what did not match (bad lines, answers without
`question_id`/`text`, duplicates, answers for unknown questions, questions without an answer) and keeps the
first few messages naming the records. Question ids are compared as strings (`7` and `"7"` are one id).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_EXAMPLES = 5  # messages kept per kind of problem


class ScoringError(ValueError):
    """Bad input to a scorer (an unreadable annotation file, or, with `strict`, any unmatched answer)."""


def load_answers(path: str | Path, strict: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """The answers of a JSON-lines answer file and one message per line that is not a JSON object
    (`FILE:LINE: reason`); with `strict`, the first bad line raises a `ScoringError` instead."""
    path = Path(path)
    if not path.is_file():
        raise ScoringError(f"answer file {path} does not exist")
    answers: list[dict[str, Any]] = []
    bad: list[str] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ScoringError(f"answer file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            message = f"{path}:{lineno}: not JSON ({e.msg} at column {e.colno})"
        else:
            if isinstance(record, dict):
                answers.append(record)
                continue
            message = f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
        if strict:
            raise ScoringError(message + "; fix the line or drop --strict to skip it")
        bad.append(message)
    return answers, bad


def answer_id(answer: dict[str, Any]) -> str:
    """An answer's question id as a string."""
    return str(answer["question_id"])


@dataclass
class Coverage:
    """What matched between an answer list and a benchmark's questions; `as_dict()` goes into the metrics."""

    answers: int = 0  # answer records given
    scored: int = 0  # questions scored (with an answer, or counted wrong for lack of one)
    counts: dict[str, int] = field(default_factory=dict)  # kind -> number of problems
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind -> first messages

    def note(self, kind: str, message: str) -> None:
        """Count one problem of `kind` (`bad_lines`, `invalid`, `duplicates`, `unknown`, `missing`, ...)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(message)

    def as_dict(self) -> dict[str, Any]:
        return {"answers": self.answers, "scored": self.scored, **self.counts, "examples": self.examples}

    def check(self, strict: bool, source: str) -> None:
        """With `strict`, raise a `ScoringError` naming every kind of problem and its first records."""
        if not strict or not self.counts:
            return
        lines = [f"{source}: answers do not match the annotations (--strict):"]
        for kind, n in self.counts.items():
            lines.append(f"  {n} {kind}: " + "; ".join(self.examples.get(kind, [])))
        raise ScoringError("\n".join(lines))


def index_answers(
    answers: Iterable[dict[str, Any]],
    coverage: Coverage,
    key: Callable[[dict[str, Any]], Hashable] = answer_id,
) -> dict[Hashable, dict[str, Any]]:
    """The answers by `key` (the question id by default). Records without `question_id` or a string
    `text`, or whose key cannot be made (`key` raises ValueError), are counted `invalid`; a repeated key
    is counted in `duplicates` and the last answer wins (as LLaVA's `{id: answer}` dicts do)."""
    out: dict[Hashable, dict[str, Any]] = {}
    for i, answer in enumerate(answers):
        coverage.answers += 1
        if (
            not isinstance(answer, dict)
            or "question_id" not in answer
            or not isinstance(answer.get("text"), str)
        ):
            coverage.note(
                "invalid", f"answer #{i}: needs 'question_id' and a string 'text', got {answer!r:.120}"
            )
            continue
        try:
            k = key(answer)
        except (ValueError, KeyError, TypeError) as e:
            coverage.note("invalid", f"answer #{i} (question_id {answer['question_id']!r}): {e}")
            continue
        if k in out:
            coverage.note(
                "duplicates", f"answer #{i}: question {k!r} answered again; the last answer is scored"
            )
        out[k] = answer
    return out


def note_unknown(remaining: dict[Hashable, dict[str, Any]], coverage: Coverage, what: str) -> None:
    """Count the answers left over after matching: their question is not in the annotations."""
    for k in remaining:
        coverage.note("unknown", f"question {k!r} is not in {what}")


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file, or a `ScoringError` naming it and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise ScoringError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScoringError(f"{what} {path} is not a JSON file: {e}") from e


def read_json_lines(path: str | Path, what: str) -> list[Any]:
    """A JSON-lines file (or a file holding one JSON list), or a `ScoringError` naming the bad line."""
    path = Path(path)
    if not path.is_file():
        raise ScoringError(f"{what} {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return read_json(path, what)
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ScoringError(f"{what} {path}:{lineno} is not JSON: {e.msg}") from e
    return out


def percent(num: float, den: int) -> float:
    """100 * num / den (0.0 for an empty denominator)."""
    return 100.0 * num / den if den else 0.0
