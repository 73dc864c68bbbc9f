"""MME: acc and acc+ per subtask, perception and cognition totals.

Reproduces the MME release's `eval_tool/calculation.py` (run by LLaVA's `scripts/v1_5/eval/mme.sh` after
`convert_answer_to_mme.py`). A reply is lowercased; exactly "yes"/"no" is that answer, else its first four
characters decide: "yes" among them -> yes, else "no" among them -> no (so "not sure" is no), else
"other" (always wrong). Per subtask, `acc` = correct questions / questions and `acc_plus` = images whose
questions (two each) are all correct / images; the subtask score is (acc + acc_plus) * 100.
`perception` sums the scores of the 10 perception subtasks (max 2000), `cognition` those of the 4
cognition subtasks (max 800). Subtasks without ground truth are listed in `missing_subtasks` and left
out of the sums.

Ground truth comes from the release folder `MME_Benchmark_release_version`: per subtask either
`images/` + `questions_answers_YN/IMAGE.txt` or `IMAGE.txt` beside the images, lines `question\\tanswer`;
or from a folder of per-subtask files `SUBTASK.txt` with lines `image\\tquestion\\tanswer` (the eval
tool's `Your_Results` templates). An answer's `question_id` is `SUBTASK/.../IMAGE.ext` (LLaVA's
`llava_mme.jsonl`) and its `prompt` the question; questions match after removing LLaVA's "Answer the
question using a single word or phrase." and the release's "Please answer yes or no." and collapsing
spaces (`convert_answer_to_mme.py` tries the same with a one- and a two-space variant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .answers import Coverage, ScoringError, index_answers, note_unknown, percent

PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_DROP = ("Answer the question using a single word or phrase.", "Please answer yes or no.")


def parse_yes_no(text: str) -> str:
    """MME's `parse_pred_ans` on the lowercased reply: yes, no or other."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def question_key(question: str) -> str:
    """A question without LLaVA's and MME's answer-format sentences, spaces collapsed."""
    for sentence in _DROP:
        question = question.replace(sentence, " ")
    return " ".join(question.split())


def _answer(text: str, where: str) -> str:
    answer = text.strip().lower()
    if answer not in ("yes", "no"):
        raise ScoringError(f"{where}: ground-truth answer {text!r} is not Yes or No")
    return answer


def load_ground_truth(folder: str | Path) -> dict[str, list[tuple[str, str, str]]]:
    """Subtask -> [(image stem, question key, "yes"/"no")] from either MME layout (module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScoringError(
            f"MME annotations {folder} is not a folder (the release's MME_Benchmark_release_version)"
        )
    out: dict[str, list[tuple[str, str, str]]] = {}
    for subtask in PERCEPTION + COGNITION:
        flat = folder / f"{subtask}.txt"
        rows: list[tuple[str, str, str]] = []
        if flat.is_file():  # eval-tool layout: image \t question \t answer [\t prediction]
            for lineno, line in enumerate(flat.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) < 3:
                    raise ScoringError(f"{flat}:{lineno}: expected image<TAB>question<TAB>answer")
                rows.append(
                    (Path(parts[0]).stem, question_key(parts[1]), _answer(parts[2], f"{flat}:{lineno}"))
                )
        elif (folder / subtask).is_dir():
            qa_dir = folder / subtask / "questions_answers_YN"
            if not qa_dir.is_dir():
                qa_dir = folder / subtask
            for txt in sorted(qa_dir.glob("*.txt")):
                for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise ScoringError(f"{txt}:{lineno}: expected question<TAB>answer")
                    rows.append((txt.stem, question_key(parts[0]), _answer(parts[1], f"{txt}:{lineno}")))
        if rows:
            out[subtask] = rows
    if not out:
        raise ScoringError(
            f"{folder}: no MME subtask found (expected subtask folders such as existence/ or files such as "
            "existence.txt)"
        )
    return out


def _answer_key(answer: dict[str, Any]) -> tuple[str, str, str]:
    qid = str(answer["question_id"])
    if "/" not in qid:
        raise ValueError("MME question ids are SUBTASK/IMAGE (LLaVA's llava_mme.jsonl)")
    prompt = answer.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(
            "MME answers need their 'prompt' (the question) to tell an image's two questions apart"
        )
    return qid.split("/")[0], qid.split("/")[-1].split(".")[0], question_key(prompt)


def score_mme(
    answers: list[dict[str, Any]], annotations: str | Path, *, subset: bool = False, strict: bool = False
) -> dict[str, Any]:
    """MME scores; missing answers count as "other" (wrong) unless `subset`."""
    truth = load_ground_truth(annotations)
    coverage = Coverage()
    by_key = index_answers(answers, coverage, _answer_key)
    subtasks: dict[str, dict[str, Any]] = {}
    for subtask, rows in truth.items():
        images: dict[str, list[bool]] = {}
        for stem, question, gold in rows:
            answer = by_key.pop((subtask, stem, question), None)
            if answer is None:
                coverage.note("missing", f"{subtask}/{stem}: {question!r} has no answer")
                if subset:
                    continue
                predicted = "other"
            else:
                predicted = parse_yes_no(answer["text"])
            images.setdefault(stem, []).append(predicted == gold)
            coverage.scored += 1
        if not images:
            continue
        n = sum(len(v) for v in images.values())
        acc = percent(sum(sum(v) for v in images.values()), n)
        acc_plus = percent(sum(all(v) for v in images.values()), len(images))
        subtasks[subtask] = {
            "score": acc + acc_plus,
            "acc": acc,
            "acc_plus": acc_plus,
            "n": n,
            "images": len(images),
        }
    note_unknown(by_key, coverage, str(annotations))
    coverage.check(strict, str(annotations))
    perception = sum(subtasks[s]["score"] for s in PERCEPTION if s in subtasks)
    cognition = sum(subtasks[s]["score"] for s in COGNITION if s in subtasks)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "subtasks": subtasks,
        "missing_subtasks": [s for s in PERCEPTION + COGNITION if s not in subtasks],
        "coverage": coverage.as_dict(),
    }
