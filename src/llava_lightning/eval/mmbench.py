"""MMBench: circular evaluation (a question counts only if every rotation of its options is answered right).

Reproduces MMBench's official evaluation (OpenCompass `tools/eval_mmbench.py`, the rule LLaVA's
`convert_mmbench_for_submission.py` uploads to) without its ChatGPT step:

- The TSV (`mmbench_dev_20230712.tsv`: `index`, `question`, `A`..`D`, `answer`, `category`, `l2-category`)
  holds each question once with index < 1e6 and its circular copies (options rotated, answer moved) at
  index + k * 1e6. A question's group is every row with the same index modulo 1e6. LLaVA's
  `model_vqa_mmbench.py --all-rounds` instead rotates the options itself and writes `round_id`; those
  answers form the group (question_id, round 0..n-1 for each row), round r seeing the options shifted left
  by r (the answer letter moving with them).
- A reply's letter: `can_infer_option` first (the reply's whitespace-separated tokens hold exactly one of
  A-E bare, else exactly one in one of the forms "A." "A," "A:" "A)" "A)." "(A)" "(A)." ":A" ":A," ":A."
  ":A)" ":A)."; a bare "A" in a reply of more than 3 tokens is taken for the article and skipped to the
  forms), then `can_infer_text` (exactly one option's text appears, lowercased, in the reply).
- The group is a hit when every member's letter equals its answer; a missing member is a miss. A reply no
  rule resolves goes to ChatGPT in the official tool; here it is a miss, counted in `unresolved` (the
  score is then a lower bound of the official one).

Options that are empty, "nan" or "none" (any case) are absent (LLaVA's `is_none`; pandas reads these as
NaN). Accuracy in percent, overall and per `category` / `l2-category`; `single_pass_accuracy` scores only
the rows with index < 1e6 (round 0), no circular check.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

from .answers import Coverage, ScoringError, index_answers, note_unknown, percent

CIRCULAR = 1_000_000
LETTERS = ("A", "B", "C", "D")
_FORMS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
          (":", "."), (":", ")"), (":", ")."))  # fmt: skip


def infer_option(text: str) -> str | None:
    """MMBench's `can_infer_option` (letters A-E)."""
    tokens = [t.strip() for t in text.split()]
    letters = "ABCDE"
    bare = [c for c in letters if c in tokens]
    if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
        return bare[0]
    for prefix, suffix in _FORMS:
        found = [c for c in letters if prefix + c + suffix in tokens]
        if len(found) == 1:
            return found[0]
    return None


def infer_from_text(text: str, choices: dict[str, str]) -> str | None:
    """MMBench's `can_infer_text`: the one option whose text the reply contains (lowercased)."""
    text = text.lower()
    found = [letter for letter, option in choices.items() if str(option).lower() in text]
    return found[0] if len(found) == 1 else None


def infer_letter(text: str, choices: dict[str, str]) -> str | None:
    """The option letter MMBench's rules read from a reply, or None."""
    return infer_option(text) or infer_from_text(text, choices)


# pandas' default NA strings: `pd.read_table` (LLaVA and MMBench read the TSV with it) makes these NaN.
_PANDAS_NA = frozenset(
    "#N/A,#N/A N/A,#NA,-1.#IND,-1.#QNAN,-NaN,-nan,1.#IND,1.#QNAN,<NA>,N/A,NA,NULL,NaN,None,n/a,nan,null".split(
        ","
    )
)


def _present(value: str | None) -> bool:
    """Whether a TSV cell holds an option: not NaN for pandas, nor "nan"/"none" (LLaVA's `is_none`)."""
    return (
        value is not None and value != "" and value not in _PANDAS_NA and value.lower() not in ("nan", "none")
    )


def load_tsv(path: str | Path) -> dict[int, dict[str, str]]:
    """MMBench rows by index."""
    path = Path(path)
    if not path.is_file():
        raise ScoringError(f"MMBench TSV {path} does not exist")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images
    rows: dict[int, dict[str, str]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for lineno, row in enumerate(reader, 2):
            try:
                index = int(float(row["index"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ScoringError(f"{path}:{lineno}: no integer 'index' column ({e})") from e
            if not _present(row.get("answer")):
                raise ScoringError(
                    f"{path}:{lineno}: index {index} has no answer; a test-split TSV is scored by the MMBench "
                    "server (convert the answers with LLaVA's convert_mmbench_for_submission.py)"
                )
            rows[index] = row
    if not rows:
        raise ScoringError(f"{path}: no rows")
    return rows


def _view(row: dict[str, str], round_id: int, where: str) -> tuple[dict[str, str], str]:
    """(letter -> option text, answer letter) of a row as round `round_id` of LLaVA's rotation shows it."""
    texts = []
    for letter in LETTERS:  # options stop at the first absent one (LLaVA's get_options)
        if not _present(row.get(letter)):
            break
        texts.append(row[letter])
    letters = LETTERS[: len(texts)]
    gold = row["answer"].strip()
    if gold not in letters:
        raise ScoringError(f"{where}: answer {gold!r} is not one of its options {list(letters)}")
    if round_id % len(texts) == 0:
        return dict(zip(letters, texts)), gold
    shift = round_id % len(texts)
    rotated = texts[shift:] + texts[:shift]
    return dict(zip(letters, rotated)), letters[(letters.index(gold) - shift) % len(texts)]


def _key(answer: dict[str, Any]) -> tuple[int, int]:
    return int(answer["question_id"]), int(answer.get("round_id") or 0)


def score_mmbench(
    answers: list[dict[str, Any]], annotations: str | Path, *, subset: bool = False, strict: bool = False
) -> dict[str, Any]:
    """MMBench circular accuracy; with `subset`, a group is judged on the members that have an answer."""
    rows = load_tsv(annotations)
    copies: dict[int, list[int]] = {}
    for index in sorted(rows):
        copies.setdefault(index % CIRCULAR, []).append(index)
    coverage = Coverage()
    by_key = index_answers(answers, coverage, _key)
    all_rounds = any(r > 0 for _, r in by_key)
    hits: list[tuple[bool, str, str]] = []  # (hit, category, l2-category)
    single: list[bool] = []
    unresolved: list[str] = []  # first few replies no rule reads
    n_unresolved = 0
    for main in sorted(copies):
        if main not in rows:
            raise ScoringError(f"{annotations}: circular copies of index {main} but no row {main}")
        members = [
            (index, r)
            for index in copies[main]
            for r in range(len(_view(rows[index], 0, str(annotations))[0]) if all_rounds else 1)
        ]
        results: list[bool] = []
        for index, round_id in members:
            choices, gold = _view(rows[index], round_id, f"{annotations}: index {index}")
            answer = by_key.pop((index, round_id), None)
            if answer is None:
                coverage.note("missing", f"index {index} round {round_id} has no answer")
                if subset:
                    continue
                correct = False
            else:
                letter = infer_letter(answer["text"], choices)
                if letter is None:
                    n_unresolved += 1
                    if len(unresolved) < 5:
                        unresolved.append(f"index {index} round {round_id}: {answer['text']!r:.80}")
                correct = letter == gold
            coverage.scored += 1
            results.append(correct)
            if (index, round_id) == (main, 0):
                single.append(correct)
        if results:
            hits.append((all(results), rows[main].get("category", ""), rows[main].get("l2-category", "")))
    note_unknown({f"{k[0]} round {k[1]}": v for k, v in by_key.items()}, coverage, str(annotations))
    coverage.check(strict, str(annotations))

    def by(column: int) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[bool]] = {}
        for h in hits:
            groups.setdefault(h[column], []).append(h[0])
        return {k: {"accuracy": percent(sum(v), len(v)), "n": len(v)} for k, v in sorted(groups.items())}

    return {
        "accuracy": percent(sum(h[0] for h in hits), len(hits)),
        "n": len(hits),
        "single_pass_accuracy": percent(sum(single), len(single)),
        "circular": all_rounds or any(len(c) > 1 for c in copies.values()),
        "per_category": by(1),
        "per_l2_category": by(2),
        "unresolved": {"count": n_unresolved, "examples": unresolved},
        "coverage": coverage.as_dict(),
    }
