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

from ..data.image import decode_image
from ..data.image_paths import ImageRoot, record_image_paths
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
) -> dict[str, Any]:
    """Greedy multiple-choice accuracy of `model` (a `LlavaModel`, replying through `inference.generate`).

    Returns `accuracy` (correct / n; unparsed replies are wrong), `n`, `correct`, `unparsed`,
    `chance` (mean of 1 / number of options: the expected accuracy of a uniform guess) and
    `predictions` (per record: `id`, `reply`, `letter` (parsed, or None), `answer`, `correct`,
    `n_options`, and with `group_by` its `group`).
    With `group_by` (a record field every record has), also `groups`: per value of that field, in
    order of first appearance, its own `accuracy`, `n`, `correct` and `chance`.
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
    root = ImageRoot(image_root)
    accuracy = MeanMetric().set_dtype(torch.float64)
    chance = MeanMetric().set_dtype(torch.float64)
    predictions: list[dict[str, Any]] = []
    unparsed = 0
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts = [prompt_of(r) for r in batch]
        images: list[Any] = []
        for r in batch:
            paths = [root.resolve(p) for p in record_image_paths(r)]
            images.append([decode_image(p) for p in paths] if paths else None)
        replies = generate(
            model, images, prompts, template=template, max_new_tokens=max_new_tokens, aspect=aspect
        )
        if len(replies) != len(batch):
            raise RuntimeError(f"generate returned {len(replies)} replies for {len(batch)} prompts")
        for record, prompt, reply in zip(batch, prompts, replies):
            n_options = _n_options(record, prompt)
            answer = _answer(record)
            letter = parse_letter(reply, n_options)
            unparsed += letter is None
            correct = letter is not None and letter == answer
            accuracy.update(torch.tensor(float(correct), dtype=torch.float64))
            chance.update(torch.tensor(1.0 / n_options, dtype=torch.float64))
            predictions.append(
                {
                    "id": record.get("id"),
                    "reply": reply,
                    "letter": letter,
                    "answer": answer,
                    "correct": correct,
                    "n_options": n_options,
                    **({"group": str(record[group_by])} if group_by is not None else {}),
                }
            )
        log.info("multiple choice: %d / %d records", len(predictions), len(records))
    n = len(predictions)
    n_correct = sum(p["correct"] for p in predictions)
    result = {
        "accuracy": float(accuracy.compute()),
        "n": n,
        "correct": n_correct,
        "unparsed": unparsed,
        "chance": float(chance.compute()),
        "predictions": predictions,
    }
    if group_by is not None:
        result["groups"] = _groups(predictions)
    log.info(
        "multiple choice on %s: accuracy %.4f (%d / %d), %d unparsed, chance %.4f",
        json_path,
        result["accuracy"],
        n_correct,
        n,
        unparsed,
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
