"""Multiple-choice evaluation on LLaVA-layout JSON (ScienceQA as converted by `data_recipes`, or the
synthetic shapes eval set).

A record::

    {"id": ..., "image": "relative/path.png",            # optional (a list of paths also works)
     "conversations": [{"from": "human", "value": "<image>\\nQUESTION\\nA. x\\nB. y\\nAnswer with the "
                                                   "option's letter from the given choices directly."},
                       {"from": "gpt", "value": "B"}],
     "answer_letter": "B", "options": ["x", "y"]}

The human turn, without its leading `<image>\\n` lines (`generate` puts one back per image), is the
prompt; decoding is greedy (LLaVA-1.5's ScienceQA evaluation, `model_vqa_science.py`); the reply is parsed for the
first standalone option letter. Accuracy is plain correct / total, unparsed replies counted wrong,
accumulated with a `torchmetrics` `MeanMetric`; `group_by` names a record field (the synthetic set's
`question_type`, ScienceQA's `subject`) to break it down by that field's values too.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torchmetrics.aggregation import MeanMetric

from ..data.prompts import prompt_of
from ..inference.generate import generate

log = logging.getLogger(__name__)

_OPTION_LINE = re.compile(r"^([A-Z])\.\s", re.MULTILINE)
_ANSWER_IS = re.compile(r"(?i:answer\s*(?:is|:))\s*[:\-]?\s*\(?([A-Z])(?![A-Za-z0-9])")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")


def parse_letter(text: str, n_options: int) -> str | None:
    """The option letter (`A`.. the `n_options`-th letter) a reply names, or None.

    "The answer is B" (and "Answer: B") wins; otherwise the first standalone capital letter that is
    an option ("B", "B.", "(B)", "B) grass", "I pick C"). Letters glued to other letters or digits
    ("Bird", "B2") do not count, nor letters beyond the options.
    """
    if n_options <= 0:
        return None
    valid = {chr(ord("A") + i) for i in range(min(n_options, 26))}
    for match in _ANSWER_IS.finditer(text):
        if match.group(1) in valid:
            return match.group(1)
    for match in _STANDALONE.finditer(text):
        if match.group(1) in valid:
            return match.group(1)
    return None


def load_records(json_path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The records of a multiple-choice JSON file (a list), the first `limit` when given."""
    records = json.loads(Path(json_path).read_text())
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    return records[:limit] if limit is not None else records


def _answer(record: dict[str, Any]) -> str:
    letter = record.get("answer_letter")
    if letter is None:
        turns = record.get("conversations") or []
        letter = turns[1]["value"] if len(turns) > 1 else None
    if not isinstance(letter, str) or not letter.strip():
        raise ValueError(f"record {record.get('id')!r} has no answer letter")
    return letter.strip()


def _n_options(record: dict[str, Any], prompt: str) -> int:
    options = record.get("options")
    if options:
        return len(options)
    found = _OPTION_LINE.findall(prompt)  # "A. ..." lines when the record lists no options
    if not found:
        raise ValueError(f"record {record.get('id')!r} has no options")
    return len(found)


def _key(record: dict[str, Any]) -> str:
    return json.dumps(record["question_id"] if "question_id" in record else record.get("id"))


def score_letters(
    answers: list[dict[str, Any]], records: list[dict[str, Any]], group_by: str | None = None
) -> dict[str, Any]:
    """Letter accuracy of LLaVA-format `answers` (`question_id`, `text`) against `records` (questions or
    conversation records carrying `answer_letter`, or the letter as their gpt turn), in the records' order.

    Returns `accuracy` (correct / n; unparsed replies and unanswered records are wrong), `n`, `correct`,
    `unparsed`, `chance` (mean of 1 / number of options), `predictions` (per record: `id`, `reply`, `letter`
    (parsed, or None), `answer`, `correct`, `n_options`, and with `group_by` its `group`), and with
    `group_by` (a field every record has) `groups`: per value, in order of first appearance, its own
    `accuracy`, `n`, `correct` and `chance`.
    """
    if group_by is not None:
        for r in records:
            if group_by not in r:
                raise ValueError(
                    f"record {r.get('id', r.get('question_id'))!r} has no {group_by!r} field to group by; "
                    "add it to every record or leave group_by unset"
                )
    replies = {_key(a): a.get("text", "") for a in answers}
    accuracy = MeanMetric().set_dtype(torch.float64)
    chance = MeanMetric().set_dtype(torch.float64)
    predictions: list[dict[str, Any]] = []
    unparsed = 0
    for record in records:
        prompt = record["text"] if isinstance(record.get("text"), str) else prompt_of(record)
        n_options = _n_options(record, prompt)
        answer = _answer(record)
        reply = replies.get(_key(record))
        letter = parse_letter(reply, n_options) if reply is not None else None
        unparsed += letter is None
        correct = letter is not None and letter == answer
        accuracy.update(torch.tensor(float(correct), dtype=torch.float64))
        chance.update(torch.tensor(1.0 / n_options, dtype=torch.float64))
        predictions.append(
            {
                "id": record.get("id", record.get("question_id")),
                "reply": reply,
                "letter": letter,
                "answer": answer,
                "correct": correct,
                "n_options": n_options,
                **({"group": str(record[group_by])} if group_by is not None else {}),
            }
        )
    n = len(predictions)
    result = {
        "accuracy": float(accuracy.compute()) if n else 0.0,
        "n": n,
        "correct": sum(p["correct"] for p in predictions),
        "unparsed": unparsed,
        "chance": float(chance.compute()) if n else 0.0,
        "predictions": predictions,
    }
    if group_by is not None:
        result["groups"] = _groups(predictions)
    return result


def evaluate_multiple_choice(
    model: Any,
    json_path: str | Path,
    image_root: str | Path,
    template: str = "vicuna_v1",
    batch_size: int = 16,
    max_new_tokens: int = 8,
    aspect: str = "pad",
    limit: int | None = None,
    group_by: str | None = None,
    answers_file: str | Path | None = None,
) -> dict[str, Any]:
    """Greedy multiple-choice accuracy of `model` (a `LlavaModel`, replying through `inference.generate`),
    by the `evaluate` command's path: the records become questions, `answer_questions` answers them
    (strict: a missing image raises), `score_letters` scores the replies (its result, documented there).
    `answers_file`: also write the answers there in LLaVA's format (JSON lines).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    records = load_records(json_path, limit)
    if not records:
        raise ValueError(f"{json_path}: no records to evaluate")
    if group_by is not None:
        for r in records:
            if group_by not in r:
                raise ValueError(
                    f"{json_path}: record {r.get('id')!r} has no {group_by!r} field to group by; "
                    "add it to every record or leave group_by unset"
                )
    from .evaluate import answer_questions, question_from_record

    answers, _ = answer_questions(
        model,
        [question_from_record(r) for r in records],
        image_root,
        template=template,
        aspect=aspect,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        strict=True,
        generate_fn=generate,  # looked up now: tests replace it
    )
    if answers_file is not None:
        Path(answers_file).parent.mkdir(parents=True, exist_ok=True)
        Path(answers_file).write_text("".join(json.dumps(a) + "\n" for a in answers), encoding="utf-8")
    result = score_letters(answers, records, group_by)
    log.info(
        "multiple choice on %s: accuracy %.4f (%d / %d), %d unparsed, chance %.4f",
        json_path,
        result["accuracy"],
        result["correct"],
        result["n"],
        result["unparsed"],
        result["chance"],
    )
    return result


def _groups(predictions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in predictions:
        groups.setdefault(p["group"], []).append(p)
    return {
        name: {
            "accuracy": sum(p["correct"] for p in ps) / len(ps),
            "n": len(ps),
            "correct": sum(p["correct"] for p in ps),
            "chance": sum(1 / p["n_options"] for p in ps) / len(ps),
        }
        for name, ps in groups.items()
    }
