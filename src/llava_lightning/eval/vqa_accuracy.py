"""VQA accuracy for TextVQA, VQAv2 and VizWiz: answer normalization and the 10-human soft score.

The score of a prediction against 10 human answers is, for each human left out, min(1, #other humans
who gave the prediction / 3), averaged over the 10 (the official "10 choose 9" average). What is
normalized before comparing differs by benchmark, as their official code does:

- TextVQA (LLaVA's `llava/eval/m4c_evaluator.py`, `TextVQAAccuracyEvaluator`, from MMF/EvalAI): the
  prediction and every human answer go through `EvalAIAnswerProcessor` (`evalai_normalize`).
- VQAv2 (`vqaEval.py` of the VQA API, GT-Vision-Lab, current version "Fixed processing answers bug",
  the reference implementation of the VQA metric) and VizWiz (the VizWiz API's `vqaEval.py`): LLaVA's
  `convert_vqav2_for_submission.py` / `convert_vizwiz_for_submission.py` first put the prediction through
  `EvalAIAnswerProcessor`. vqaEval.py then strips prediction and human answers and, only when the 10
  humans do not all agree, puts both through `processPunctuation` and `processDigitArticle`
  (`vqav2_accuracy`). The VizWiz vqaEval.py always puts the prediction through both and leaves the
  humans' answers as written ("unanswerable" is an answer like any other; `vizwiz_accuracy`).

`processPunctuation` drops punctuation next to a space (or everywhere once the text holds a digit-comma-
digit) and turns the rest into spaces; periods not followed by a digit go. `processDigitArticle`
lowercases, maps number words zero..ten (and "none") to digits, drops articles and restores contractions
("dont" -> "don't"). Accuracy is reported in percent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .answers import (
    Coverage,
    ScoringError,
    answer_id,
    index_answers,
    note_unknown,
    percent,
    read_json,
    read_json_lines,
)

# Official contraction table (identical in vqaEval.py and EvalAIAnswerProcessor): "key value" pairs.
_CONTRACTIONS_TABLE = """
aint ain't  arent aren't  cant can't  couldve could've  couldnt couldn't  couldn'tve couldn't've
couldnt've couldn't've  didnt didn't  doesnt doesn't  dont don't  hadnt hadn't  hadnt've hadn't've
hadn'tve hadn't've  hasnt hasn't  havent haven't  hed he'd  hed've he'd've  he'dve he'd've  hes he's
howd how'd  howll how'll  hows how's  Id've I'd've  I'dve I'd've  Im I'm  Ive I've  isnt isn't
itd it'd  itd've it'd've  it'dve it'd've  itll it'll  let's let's  maam ma'am  mightnt mightn't
mightnt've mightn't've  mightn'tve mightn't've  mightve might've  mustnt mustn't  mustve must've
neednt needn't  notve not've  oclock o'clock  oughtnt oughtn't  ow's'at 'ow's'at  'ows'at 'ow's'at
'ow'sat 'ow's'at  shant shan't  shed've she'd've  she'dve she'd've  she's she's  shouldve should've
shouldnt shouldn't  shouldnt've shouldn't've  shouldn'tve shouldn't've  somebody'd somebodyd
somebodyd've somebody'd've  somebody'dve somebody'd've  somebodyll somebody'll  somebodys somebody's
someoned someone'd  someoned've someone'd've  someone'dve someone'd've  someonell someone'll
someones someone's  somethingd something'd  somethingd've something'd've
something'dve something'd've  somethingll something'll  thats that's  thered there'd
thered've there'd've  there'dve there'd've  therere there're  theres there's  theyd they'd
theyd've they'd've  they'dve they'd've  theyll they'll  theyre they're  theyve they've  twas 'twas
wasnt wasn't  wed've we'd've  we'dve we'd've  weve we've  werent weren't  whatll what'll
whatre what're  whats what's  whatve what've  whens when's  whered where'd  wheres where's
whereve where've  whod who'd  whod've who'd've  who'dve who'd've  wholl who'll  whos who's
whove who've  whyll why'll  whyre why're  whys why's  wont won't  wouldve would've  wouldnt wouldn't
wouldnt've wouldn't've  wouldn'tve wouldn't've  yall y'all  yall'll y'all'll  y'allll y'all'll
yall'd've y'all'd've  y'alld've y'all'd've  y'all'dve y'all'd've  youd you'd  youd've you'd've
you'dve you'd've  youll you'll  youre you're  youve you've"""
CONTRACTIONS = dict(
    pair.split(" ") for line in _CONTRACTIONS_TABLE.strip().splitlines() for pair in line.split("  ")
)
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official pattern's "(?!<=\d)" is a malformed look-behind (a look-ahead for "<=digit"), so every
# period not followed by a digit goes: "yes." -> "yes", "1.5" stays. The official call passes re.UNICODE
# where `count` goes, so at most 32 periods are removed; kept for exactness.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)
_DIGIT_COMMA_VQA = re.compile(r"(\d)(,)(\d)")  # vqaEval.py
_DIGIT_COMMA_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")  # EvalAIAnswerProcessor


def process_punctuation(text: str, digit_comma: re.Pattern[str] = _DIGIT_COMMA_VQA) -> str:
    """`processPunctuation`: each mark is removed where it touches a space (or anywhere once the text has
    a digit-comma-digit), else replaced by a space; then periods not followed by a digit are removed."""
    out = text
    glued = digit_comma.search(text) is not None
    for p in PUNCTUATION:
        if glued or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """`processDigitArticle`: lowercase words; number words -> digits; articles dropped; contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def evalai_normalize(answer: str) -> str:
    """EvalAIAnswerProcessor (TextVQA's scorer, and LLaVA's VQAv2/VizWiz submission conversion)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text, _DIGIT_COMMA_EVALAI))


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_normalize(answer: str) -> str:
    """What the VizWiz vqaEval.py does to a submitted answer before comparing."""
    return process_digit_article(process_punctuation(_strip(answer)))


def soft_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Mean over the humans of min(1, #other humans who answered `prediction` / 3), in [0, 1]."""
    if not human_answers:
        return 0.0
    same = sum(h == prediction for h in human_answers)
    return sum(min(1.0, (same - (h == prediction)) / 3) for h in human_answers) / len(human_answers)


def _textvqa_question(prompt: str) -> str:
    """The question inside a LLaVA TextVQA prompt (`eval_textvqa.py`'s `prompt_processor`), lowercased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1) if match else prompt
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    else:
        question = lines[0]
    return question.lower()


def _human_answers(record: dict[str, Any], where: str) -> list[str]:
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers:
        raise ScoringError(f"{where}: no 'answers' list")
    return [a["answer"] if isinstance(a, dict) else a for a in answers]


def _score_list(
    entries: list[tuple[str, dict[str, Any], str | None]],
    answers: list[dict[str, Any]],
    find: Callable[[dict[str, Any]], int | None],
    accuracy_of: Callable[[str, dict[str, Any]], float],
    subset: bool,
    strict: bool,
    source: str,
) -> dict[str, Any]:
    """Match answers to `entries` (key, annotation record, group) through `find` (answer -> entry index,
    or None for an unknown question) and average `accuracy_of(text, record)`; the result with its
    `coverage` (`strict`: any unmatched answer or question raises)."""
    coverage = Coverage()

    def key(answer: dict[str, Any]) -> Any:
        i = find(answer)
        return i if i is not None else ("unknown", answer_id(answer))

    by_entry: dict[int, dict[str, Any]] = {}
    for k, answer in index_answers(answers, coverage, key).items():
        if isinstance(k, tuple):
            note_unknown({k[1]: answer}, coverage, source)
        else:
            by_entry[k] = answer
    total, groups = 0.0, {}
    for i, (name, record, group) in enumerate(entries):
        answer = by_entry.get(i)
        if answer is None:
            coverage.note("missing", f"question {name!r} has no answer" + ("" if subset else " (scored 0)"))
            if subset:
                continue
            acc = 0.0
        else:
            acc = accuracy_of(answer["text"], record)
        coverage.scored += 1
        total += acc
        if group is not None:
            g = groups.setdefault(str(group), [0.0, 0])
            g[0] += acc
            g[1] += 1
    result: dict[str, Any] = {"accuracy": percent(total, coverage.scored), "n": coverage.scored}
    if groups:
        result["per_answer_type"] = {
            k: {"accuracy": percent(s, n), "n": n} for k, (s, n) in sorted(groups.items())
        }
    coverage.check(strict, source)
    return {**result, "coverage": coverage.as_dict()}


def score_textvqa(
    answers: list[dict[str, Any]], annotations: str | Path, *, subset: bool = False, strict: bool = False
) -> dict[str, Any]:
    """TextVQA accuracy against `TextVQA_0.5.1_val.json` (`data`: `question_id`, `image_id`, `question`,
    `answers`). An answer's `question_id` is the TextVQA question id, or (LLaVA's question file
    `llava_textvqa_val_v051_ocr.jsonl`) the image id, the question then read from its `prompt` as LLaVA's
    `eval_textvqa.py` does: an image's several questions are told apart by (image id, question)."""
    data = read_json(annotations, "TextVQA annotation file")
    records = data.get("data") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ScoringError(f"{annotations}: expected TextVQA's {{'data': [...]}} layout")
    entries, lookup, by_image_question = [], {}, {}
    for i, r in enumerate(records):
        if "question_id" not in r:
            raise ScoringError(f"{annotations}: data[{i}] has no question_id")
        entries.append((str(r["question_id"]), r, None))
        lookup[str(r["question_id"])] = i
        if "image_id" in r and "question" in r:
            by_image_question[(str(r["image_id"]), str(r["question"]).lower())] = i

    def find(answer: dict[str, Any]) -> int | None:
        qid = answer_id(answer)
        prompt = answer.get("prompt")
        if isinstance(prompt, str):  # LLaVA's layout first: its ids are image ids
            i = by_image_question.get((qid, _textvqa_question(prompt)))
            if i is not None:
                return i
        return lookup.get(qid)

    def accuracy_of(text: str, record: dict[str, Any]) -> float:
        humans = [
            evalai_normalize(h) for h in _human_answers(record, f"{annotations}: {record['question_id']}")
        ]
        return soft_accuracy(evalai_normalize(text), humans)

    return _score_list(entries, answers, find, accuracy_of, subset, strict, str(annotations))


def vqav2_accuracy(text: str, human_answers: list[str]) -> float:
    """One VQAv2 answer's accuracy: LLaVA's submission conversion, then vqaEval.py."""
    prediction = _strip(evalai_normalize(text))
    humans = [_strip(h) for h in human_answers]
    if len(set(humans)) > 1:  # vqaEval normalizes only when the humans disagree (then both sides)
        humans = [process_digit_article(process_punctuation(h)) for h in humans]
        prediction = process_digit_article(process_punctuation(prediction))
    return soft_accuracy(prediction, humans)


def score_vqav2(
    answers: list[dict[str, Any]], annotations: str | Path, *, subset: bool = False, strict: bool = False
) -> dict[str, Any]:
    """VQAv2 accuracy against `v2_mscoco_val2014_annotations.json` (`annotations`: `question_id`,
    `answers` [{`answer`}], `answer_type`), overall and per answer type (yes/no, number, other)."""
    data = read_json(annotations, "VQAv2 annotation file")
    records = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise ScoringError(f"{annotations}: expected VQAv2's {{'annotations': [...]}} layout")
    entries, lookup = [], {}
    for i, r in enumerate(records):
        if "question_id" not in r:
            raise ScoringError(f"{annotations}: annotations[{i}] has no question_id")
        entries.append((str(r["question_id"]), r, r.get("answer_type")))
        lookup[str(r["question_id"])] = i

    def accuracy_of(text: str, record: dict[str, Any]) -> float:
        return vqav2_accuracy(text, _human_answers(record, f"{annotations}: {record['question_id']}"))

    find = lambda a: lookup.get(answer_id(a))  # noqa: E731
    return _score_list(entries, answers, find, accuracy_of, subset, strict, str(annotations))


def vizwiz_accuracy(text: str, human_answers: list[str]) -> float:
    """One VizWiz answer's accuracy: LLaVA's submission conversion, then the VizWiz vqaEval.py (the
    humans' answers as written; "unanswerable" is an answer like any other)."""
    return soft_accuracy(vqa_normalize(evalai_normalize(text)), human_answers)


def score_vizwiz(
    answers: list[dict[str, Any]],
    annotations: str | Path,
    *,
    questions: str | Path | None = None,
    subset: bool = False,
    strict: bool = False,
) -> dict[str, Any]:
    """VizWiz-VQA accuracy against `val.json` (a list of {`image`, `question`, `answers`, `answer_type`,
    `answerable`}), overall and per answer type (unanswerable among them). VizWiz has no question ids:
    an answer's `question_id` is the image file name (or its stem), the record's position in `val.json`,
    or, given `questions` (LLaVA's question file: `question_id`, `image`), the id of a question there."""
    records = read_json(annotations, "VizWiz annotation file")
    if not isinstance(records, list):
        raise ScoringError(f"{annotations}: expected VizWiz's list of {{'image', 'answers', ...}} records")
    entries, lookup = [], {}
    for i, r in enumerate(records):
        image = r.get("image")
        if not isinstance(image, str):
            raise ScoringError(f"{annotations}: record {i} has no 'image'")
        entries.append((image, r, r.get("answer_type")))
        for k in (image, Path(image).stem, str(i)):
            lookup.setdefault(k, i)
    if questions is not None:
        for q in read_json_lines(questions, "question file"):
            i = lookup.get(str(q.get("image")))
            if i is None:
                raise ScoringError(f"{questions}: question {q.get('question_id')!r} names image "
                                   f"{q.get('image')!r}, which {annotations} does not have")  # fmt: skip
            lookup[str(q["question_id"])] = i

    def accuracy_of(text: str, record: dict[str, Any]) -> float:
        return vizwiz_accuracy(text, _human_answers(record, f"{annotations}: {record['image']}"))

    find = lambda a: lookup.get(answer_id(a))  # noqa: E731
    return _score_list(entries, answers, find, accuracy_of, subset, strict, str(annotations))
