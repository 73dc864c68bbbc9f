"""POPE (object hallucination): yes/no parsing and accuracy, precision, recall, F1 and yes-ratio per split.

Reproduces LLaVA's `llava/eval/eval_pope.py`: a reply is cut at its first period, commas are removed, and
it is "no" when one of its space-separated words is exactly `No`, `no` or `not`, else "yes" (so "Nope"
and an empty reply are "yes"). "yes" is the positive class. Metrics are per split (`random`, `popular`,
`adversarial`; the label files `coco_pope_{split}.json`), in percent; `f1` and `accuracy` at the top level
are the means over the splits scored (LLaVA-1.5 reports the mean F1). An answer without a label file
entry, or a label without an answer, is left out of the metrics and counted in `coverage`.

Labels are JSON lines `{"question_id", "image", "text", "label"}`. The official files number each split
from 1, so ids repeat across splits; LLaVA's eval pairs answers with labels by position. Here an answer
finds its label by key instead: given `questions` (LLaVA's `llava_pope_test.jsonl`: `question_id`,
`image`, `text`, `category`), by (split, image, question's first line); otherwise by `question_id`,
which then must be unique over the label files read (one split, or labels that carry unique ids), and
an answer whose `prompt` asks another question than its label is counted `mismatched`, not scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .answers import Coverage, ScoringError, index_answers, note_unknown, percent, read_json_lines

_PREFIX = "coco_pope_"


def parse_yes_no(text: str) -> str:
    """LLaVA's POPE reading of a reply: "no" if a word of its first sentence is No/no/not, else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(predictions: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (yes = positive) and yes-ratio, in percent, with the counts.
    A ratio with a zero denominator is 0 (the official script divides by zero there)."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(predictions, labels))
    fp = sum(p == "yes" and g != "yes" for p, g in zip(predictions, labels))
    tn = sum(p == "no" and g != "yes" for p, g in zip(predictions, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(predictions, labels))
    n = len(predictions)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": percent(tp + tn, n),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": percent(predictions.count("yes"), n),
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _label_files(annotations: Path) -> list[tuple[str, Path]]:
    if annotations.is_dir():
        files = sorted(annotations.glob(f"{_PREFIX}*.json"))
        if not files:
            raise ScoringError(f"{annotations}: no {_PREFIX}{{random,popular,adversarial}}.json label files")
        return [(f.name[len(_PREFIX) : -len(".json")], f) for f in files]
    if not annotations.is_file():
        raise ScoringError(f"POPE label file {annotations} does not exist")
    name = annotations.name
    split = (
        name[len(_PREFIX) : -len(".json")] if name.startswith(_PREFIX) and name.endswith(".json") else name
    )
    return [(split, annotations)]


def _first_line(text: Any) -> str:
    """A question's first line without `<image>` (LLaVA's files add an answer-format line after it)."""
    lines = [line.strip() for line in str(text).replace("<image>", "").split("\n")]
    return next((line for line in lines if line), "")


def score_pope(
    answers: list[dict[str, Any]],
    annotations: str | Path,
    *,
    questions: str | Path | None = None,
    subset: bool = True,
    strict: bool = False,
) -> dict[str, Any]:
    """POPE metrics per split: `annotations` is a folder of `coco_pope_{split}.json` files or one such
    file; `questions` the question file that gives each answer's split, image and question. A label
    without an answer is always left out (a yes/no confusion matrix has no place for it): `subset` is
    accepted for uniformity and changes nothing."""
    del subset
    labels: list[tuple[str, dict[str, Any]]] = []  # (split, label record)
    for split, path in _label_files(Path(annotations)):
        for i, record in enumerate(read_json_lines(path, "POPE label file")):
            if not isinstance(record, dict) or record.get("label") not in ("yes", "no"):
                raise ScoringError(f"{path}: record {i} has no 'label' of yes/no: {record!r:.120}")
            labels.append((str(record.get("category", split)), record))

    lookup: dict[Any, int] = {}
    if questions is not None:
        for i, (split, r) in enumerate(labels):
            lookup[(split, str(r.get("image")), _first_line(r.get("text")))] = i
        by_question = {}
        for q in read_json_lines(questions, "POPE question file"):
            by_question[str(q.get("question_id"))] = (
                str(q.get("category")),
                str(q.get("image")),
                _first_line(q.get("text")),
            )

        def key(answer: dict[str, Any]) -> Any:
            found = by_question.get(str(answer["question_id"]))
            if found is None:
                raise ValueError(f"not in the question file {questions}")
            return found
    else:
        for i, (_split, r) in enumerate(labels):
            qid = str(r.get("question_id"))
            if qid in lookup:
                raise ScoringError(
                    f"{annotations}: question_id {qid} appears in more than one label record (the official "
                    "coco_pope files number each split from 1); pass --questions with LLaVA's "
                    "llava_pope_test.jsonl so each answer's split, image and question find its label"
                )
            lookup[qid] = i

        def key(answer: dict[str, Any]) -> Any:
            return str(answer["question_id"])

    coverage = Coverage()
    by_label: dict[int, dict[str, Any]] = {}
    for k, answer in index_answers(answers, coverage, key).items():
        i = lookup.get(k)
        if i is None:
            note_unknown({k: answer}, coverage, str(annotations))
            continue
        prompt = answer.get("prompt")
        label_question = _first_line(labels[i][1].get("text"))
        if questions is None and isinstance(prompt, str) and _first_line(prompt) != label_question:
            # ids alone pair an answer with a label; a different question means another numbering
            coverage.note(
                "mismatched",
                f"answer {answer['question_id']!r} asks {_first_line(prompt)!r} but label {k} asks "
                f"{label_question!r}; pass --questions (LLaVA's llava_pope_test.jsonl) to pair them",
            )
            continue
        by_label[i] = answer
    splits: dict[str, tuple[list[str], list[str]]] = {}
    for i, (split, r) in enumerate(labels):
        answer = by_label.get(i)
        if answer is None:
            coverage.note("missing", f"{split} question {r.get('question_id')!r} has no answer (left out)")
            continue
        preds, golds = splits.setdefault(split, ([], []))
        preds.append(parse_yes_no(answer["text"]))
        golds.append(r["label"])
        coverage.scored += 1
    coverage.check(strict, str(annotations))
    per_split = {s: binary_metrics(p, g) for s, (p, g) in sorted(splits.items())}
    n = len(per_split)
    return {
        "f1": sum(m["f1"] for m in per_split.values()) / n if n else 0.0,
        "accuracy": sum(m["accuracy"] for m in per_split.values()) / n if n else 0.0,
        "splits": per_split,
        "coverage": coverage.as_dict(),
    }
