"""The benchmark scorers (`eval/tasks.py`) against the benchmarks' published scoring definitions.

Each fixture is a few predictions whose official score was worked out BY HAND from the official code's
rules (LLaVA's eval_pope.py, eval_science_qa.py, m4c_evaluator.py (EvalAI answer processing),
convert_*_for_submission.py; the VQA / VizWiz vqaEval.py; MME's calculation.py; GQA's eval.py; MMBench's
eval_mmbench.py; LLaVA's SEED conversion). The comment on each case names the rule it exercises.
Annotation files are written small, in each benchmark's official format, into tmp_path. Where the
formula is simple, an independent straightforward re-implementation in the test cross-checks it.
Percentages are compared with a 1e-9 tolerance (1e-4 against torchmetrics, which computes in float32).
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_f1_score,
    binary_precision,
    binary_recall,
)

from llava_lightning.eval.answers import ScoringError
from llava_lightning.eval.mmbench import infer_letter
from llava_lightning.eval.mme import parse_yes_no as mme_yes_no
from llava_lightning.eval.pope import parse_yes_no as pope_yes_no
from llava_lightning.eval.scienceqa import parse_scienceqa_letter
from llava_lightning.eval.tasks import TASKS, score
from llava_lightning.eval.vqa_accuracy import evalai_normalize, soft_accuracy, vqav2_accuracy

approx = lambda x: pytest.approx(x, abs=1e-9)  # noqa: E731


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _write_lines(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _answer(qid, text: str, prompt: str | None = None, **extra) -> dict:
    record = {"question_id": qid, "text": text, **extra}
    if prompt is not None:
        record["prompt"] = prompt
    return record


def official_vqa_accuracy(prediction: str, humans: list[str]) -> float:
    """The VQA metric as published: the mean over the 10 leave-one-out subsets of 9 humans of
    min(1, #humans in the subset who gave the prediction / 3). Written independently of the scorer."""
    subsets = list(itertools.combinations(range(len(humans)), len(humans) - 1))
    return sum(min(1.0, sum(humans[j] == prediction for j in s) / 3) for s in subsets) / len(subsets)


def test_every_task_is_listed_with_its_options():
    assert set(TASKS) == {"scienceqa", "pope", "mme", "textvqa", "vqav2", "vizwiz", "gqa", "mmbench", "seed"}
    for task in TASKS.values():
        assert "strict" in task.options and task.annotations and task.description


# ---------------------------------------------------------------- VQA accuracy: normalization


@pytest.mark.parametrize(
    ("raw", "normalized", "rule"),
    [
        ("Yes.", "yes", "lowercase; a period not before a digit goes"),
        ("Coca-Cola", "coca cola", "a mark not touching a space becomes a space"),
        ("a - b", "b", "a mark touching a space is removed; 'a' is an article"),
        ("The Two dogs!", "2 dogs", "article dropped, number word -> digit, '!' removed"),
        ("It is None.", "it is 0", "'none' is a number word (0)"),
        ("3.5", "3.5", "a period before a digit stays"),
        ("1,000", "1000", "commas go (EvalAI word_tokenize)"),
        ("dont", "don't", "contraction restored"),
        ("man's hat", "man 's hat", "EvalAI splits 's"),
        ("what?", "what", "question mark removed"),
        ("U.S.A.", "usa", "every period not before a digit goes"),
        ("  red\tball\n", "red ball", "tabs and newlines are spaces, stripped"),
        ("an eleven", "eleven", "only zero..ten are number words"),
    ],
)
def test_evalai_normalization(raw, normalized, rule):
    assert evalai_normalize(raw) == normalized, rule


@pytest.mark.parametrize(
    ("prediction", "humans", "expected"),
    [
        ("a", ["a"] * 10, 1.0),  # every subset of 9 holds >= 3 matches
        ("a", ["a"] * 3 + ["b"] * 7, 0.9),  # 3 matching humans see 2 others (2/3), 7 see 3 (1)
        ("a", ["a"] * 2 + ["b"] * 8, 0.6),  # 2 x 1/3 + 8 x 2/3 over 10
        ("a", ["a"] + ["b"] * 9, 0.3),  # the one matching human sees 0, the 9 others 1/3
        ("a", ["b"] * 10, 0.0),
    ],
)
def test_soft_accuracy_is_the_10_choose_9_average(prediction, humans, expected):
    assert soft_accuracy(prediction, humans) == approx(expected)
    assert official_vqa_accuracy(prediction, humans) == approx(expected)


# ---------------------------------------------------------------- TextVQA


def _textvqa(tmp_path: Path) -> Path:
    def q(qid, image, question, answers):
        return {"question_id": qid, "image_id": image, "question": question, "answers": answers,
                "image_classes": [], "flickr_original_url": "", "set_name": "val"}  # fmt: skip

    data = [
        q(1, "img1", "what brand is it?", ["coca-cola"] * 2 + ["pepsi"] * 8),
        q(2, "img1", "how many bottles?", ["2"] * 3 + ["two dogs"] * 7),
        q(3, "img2", "can you read it?", ["don't"] + ["no"] * 9),
        q(4, "img2", "is it open?", ["yes"] * 10),
        q(5, "img3", "what color?", ["red"] * 10),
        q(6, "img3", "what time?", ["noon"] * 10),
    ]
    return _write_json(
        tmp_path / "TextVQA_0.5.1_val.json",
        {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data},
    )


def _llava_textvqa_prompt(question: str) -> str:
    # LLaVA's llava_textvqa_val_v051_ocr.jsonl text: question, OCR tokens, answer format
    return f"{question}\nReference OCR token: foo, bar\nAnswer the question using a single word or phrase."


TEXTVQA_CASES = [
    (1, "Coca-Cola.", 0.6),  # punctuation: '-' -> space, final period dropped; 2 of 10 humans
    (2, "The two", 0.9),  # articles + number words: "2"; 3 of 10 humans
    (3, "Dont", 0.3),  # contractions: "don't"; 1 of 10 humans
    (4, "Yes", 1.0),  # case: all 10 humans
    (5, "blue", 0.0),  # wrong
    # question 6 has no answer: 0 (or left out with subset)
]


def test_textvqa_by_question_id(tmp_path):
    ann = _textvqa(tmp_path)
    answers = [_answer(qid, text) for qid, text, _ in TEXTVQA_CASES]
    result = score("textvqa", answers, ann)
    assert result["accuracy"] == approx(100 * 2.8 / 6)
    assert result["n"] == 6 and result["coverage"]["missing"] == 1
    subset = score("textvqa", answers, ann, subset=True)
    assert subset["accuracy"] == approx(100 * 2.8 / 5) and subset["n"] == 5


def test_textvqa_llava_answer_file_by_image_and_prompt(tmp_path):
    """LLaVA's TextVQA question ids are image ids (img1 has two questions): the prompt's question
    tells them apart, as eval_textvqa.py's (image_id, question.lower()) key does."""
    ann = _textvqa(tmp_path)
    questions = {1: ("img1", "What brand is it?"), 2: ("img1", "How many bottles?"), 3: ("img2", "can you read it?"),
                 4: ("img2", "is it open?"), 5: ("img3", "what color?")}  # fmt: skip
    answers = [
        _answer(questions[qid][0], text, _llava_textvqa_prompt(questions[qid][1]))
        for qid, text, _ in TEXTVQA_CASES
    ]
    result = score("textvqa", answers, ann)
    assert result["coverage"].get("duplicates", 0) == 0 and result["coverage"].get("unknown", 0) == 0
    assert result["accuracy"] == approx(100 * 2.8 / 6)


def test_textvqa_matches_the_independent_formula(tmp_path):
    ann = _textvqa(tmp_path)
    data = {r["question_id"]: r for r in json.loads(ann.read_text())["data"]}
    for qid, text, expected in TEXTVQA_CASES:
        humans = [evalai_normalize(h) for h in data[qid]["answers"]]
        assert official_vqa_accuracy(evalai_normalize(text), humans) == approx(expected)
        assert score("textvqa", [_answer(qid, text)], ann, subset=True)["accuracy"] == approx(100 * expected)


# ---------------------------------------------------------------- VQAv2


def _vqav2(tmp_path: Path, questions: dict[int, tuple[str, list[str]]]) -> Path:
    annotations = [
        {"question_id": qid, "image_id": qid * 10, "question_type": "what", "answer_type": answer_type,
         "multiple_choice_answer": humans[0],
         "answers": [{"answer": h, "answer_confidence": "yes", "answer_id": i + 1} for i, h in enumerate(humans)]}
        for qid, (answer_type, humans) in questions.items()
    ]  # fmt: skip
    return _write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})


def test_vqav2_rules(tmp_path):
    ann = _vqav2(
        tmp_path,
        {
            1: ("yes/no", ["yes"] * 10),
            2: ("number", ["2"] * 10),
            3: ("other", ["the red one"] * 4 + ["red"] * 6),
            4: ("other", ["t-shirt"] * 10),
            5: ("other", ["Red"] * 10),
        },
    )
    cases = [
        (1, "Yes.", 1.0),  # LLaVA's EvalAI conversion lowercases and drops the period
        (2, "two", 1.0),  # number words: the conversion maps "two" to "2"
        # humans disagree, so vqaEval normalizes them too: "the red one" -> "red one" (articles) = 4 humans
        (3, "Red one", 1.0),
        # humans agree, so vqaEval compares with their answer as written: "t shirt" != "t-shirt"
        (4, "T-shirt", 0.0),
        # humans agree on "Red" (as written, capital): the lowercased prediction does not match
        (5, "red", 0.0),
    ]
    for qid, text, expected in cases:
        humans = [a["answer"] for a in json.loads(ann.read_text())["annotations"][qid - 1]["answers"]]
        assert vqav2_accuracy(text, humans) == approx(expected), qid
    result = score("vqav2", [_answer(qid, text) for qid, text, _ in cases], ann)
    assert result["accuracy"] == approx(100 * 3 / 5)
    assert result["per_answer_type"] == {
        "number": {"accuracy": approx(100.0), "n": 1},
        "other": {"accuracy": approx(100 / 3), "n": 3},
        "yes/no": {"accuracy": approx(100.0), "n": 1},
    }


# ---------------------------------------------------------------- VizWiz


def _vizwiz(tmp_path: Path) -> Path:
    def record(i, humans, answer_type):
        return {"image": f"VizWiz_val_{i:08d}.jpg", "question": "what is this?", "answer_type": answer_type,
                "answerable": int(answer_type != "unanswerable"),
                "answers": [{"answer": h, "answer_confidence": "yes"} for h in humans]}  # fmt: skip

    records = [
        record(0, ["unanswerable"] * 10, "unanswerable"),
        record(1, ["Coca Cola"] * 5 + ["soda"] * 5, "other"),
        record(2, ["2"] * 3 + ["3"] * 7, "number"),
    ]
    return _write_json(tmp_path / "val.json", records)


def test_vizwiz_rules_and_keys(tmp_path):
    ann = _vizwiz(tmp_path)
    cases = [
        ("VizWiz_val_00000000.jpg", "Unanswerable.", 1.0),  # unanswerable: an answer like any other
        # humans' answers are compared as written: "coca cola" (normalized) != "Coca Cola"
        ("VizWiz_val_00000001", "Coca Cola", 0.0),
        ("2", "two", 0.9),  # number words; the record's position in val.json as its id; 3 of 10 humans
    ]
    result = score("vizwiz", [_answer(k, t) for k, t, _ in cases], ann)
    assert result["accuracy"] == approx(100 * 1.9 / 3)
    assert result["per_answer_type"]["unanswerable"] == {"accuracy": approx(100.0), "n": 1}
    # LLaVA's question file maps its own question ids to the images
    questions = _write_lines(
        tmp_path / "llava_val.jsonl",
        [{"question_id": 100 + i, "image": f"VizWiz_val_{i:08d}.jpg", "text": "q"} for i in range(3)],
    )
    answers = [_answer(100 + i, t) for i, (_, t, _) in enumerate(cases)]
    assert score("vizwiz", answers, ann, questions=questions)["accuracy"] == approx(100 * 1.9 / 3)


# ---------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("reply", "parsed", "rule"),
    [
        ("Yes, there is a dog.", "yes", "no negative word in the first sentence"),
        ("No.", "no", "'No' is a word of the first sentence"),
        ("no, it is not", "no", "commas removed before splitting"),
        ("There is not a dog in the image.", "no", "'not' counts as no"),
        ("I see no dog", "no", "'no' anywhere in the first sentence"),
        ("yes. No other animals.", "yes", "only the first sentence is read"),
        ("Nope", "yes", "anything without the exact words No/no/not is yes"),
        ("NO", "yes", "the words are case-sensitive: 'NO' is not one of them"),
        ("", "yes", "an empty reply is yes"),
    ],
)
def test_pope_yes_no_parsing(reply, parsed, rule):
    assert pope_yes_no(reply) == parsed, rule


POPE_SPLITS = {
    # split: [(label, reply)], ids 1..n in every split (as the official coco_pope files number them)
    "random": [("yes", "Yes"), ("yes", "No"), ("no", "Yes, there is."), ("no", "There is not.")],
    "popular": [("yes", "yes"), ("yes", "Yes."), ("no", "no"), ("no", "Nope")],
}


def _pope(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    folder = tmp_path / "coco"
    questions, answers, qid = [], [], 0
    for split, rows in POPE_SPLITS.items():
        labels = []
        for i, (label, reply) in enumerate(rows):
            image, text = f"COCO_val2014_{split}_{i}.jpg", f"Is there a thing{i} in the image?"
            labels.append({"question_id": i + 1, "image": image, "text": text, "label": label})
            questions.append({"question_id": qid, "image": image, "category": split,
                              "text": text + "\nAnswer the question using a single word or phrase."})  # fmt: skip
            answers.append(_answer(qid, reply, questions[-1]["text"]))
            qid += 1
        _write_lines(folder / f"coco_pope_{split}.json", labels)
    return folder, _write_lines(tmp_path / "llava_pope_test.jsonl", questions), answers


def test_pope_metrics_per_split(tmp_path):
    folder, questions, answers = _pope(tmp_path)
    result = score("pope", answers, folder, questions=questions)
    random, popular = result["splits"]["random"], result["splits"]["popular"]
    # random: TP 1, FN 1, FP 1, TN 1
    assert (random["tp"], random["fn"], random["fp"], random["tn"]) == (1, 1, 1, 1)
    assert [random[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == [approx(50.0)] * 5
    # popular: TP 2, FP 1 ("Nope" reads yes), TN 1: precision 2/3, recall 1, F1 0.8, yes-ratio 3/4
    assert popular["accuracy"] == approx(75.0) and popular["precision"] == approx(200 / 3)
    assert popular["recall"] == approx(100.0) and popular["f1"] == approx(80.0)
    assert popular["yes_ratio"] == approx(75.0)
    assert result["f1"] == approx(65.0) and result["accuracy"] == approx(62.5)
    # independent cross-check: torchmetrics on the parsed predictions
    for split, rows in POPE_SPLITS.items():
        preds = torch.tensor([pope_yes_no(r) == "yes" for _, r in rows], dtype=torch.long)
        target = torch.tensor([label == "yes" for label, _ in rows], dtype=torch.long)
        m = result["splits"][split]
        for key, metric in (("accuracy", binary_accuracy), ("precision", binary_precision),
                            ("recall", binary_recall), ("f1", binary_f1_score)):  # fmt: skip
            assert m[key] == pytest.approx(100 * metric(preds, target).item(), abs=1e-4), key  # float32


def test_pope_ids_repeat_across_splits_so_the_question_file_is_needed(tmp_path):
    folder, _, answers = _pope(tmp_path)
    with pytest.raises(ScoringError, match="--questions"):
        score("pope", answers, folder)


def test_pope_one_split_by_id_and_a_mismatched_prompt_is_not_scored(tmp_path):
    folder, _, _ = _pope(tmp_path)
    labels = folder / "coco_pope_random.json"
    answers = [_answer(i + 1, reply, f"Is there a thing{i} in the image?") for i, (_, reply) in
               enumerate(POPE_SPLITS["random"])]  # fmt: skip
    assert score("pope", answers, labels)["splits"]["random"]["f1"] == approx(50.0)
    answers[0]["prompt"] = "Is there a cat in the image?"  # another numbering: would pair wrongly
    result = score("pope", answers, labels)
    assert result["coverage"]["mismatched"] == 1 and result["splits"]["random"]["n"] == 3
    with pytest.raises(ScoringError, match="mismatched"):
        score("pope", answers, labels, strict=True)


# ---------------------------------------------------------------- MME


@pytest.mark.parametrize(
    ("reply", "parsed", "rule"),
    [
        ("Yes", "yes", "exactly yes, lowercased"),
        ("No", "no", "exactly no"),
        ("Yes, there is.", "yes", "'yes' in the first four characters"),
        ("Not sure", "no", "'no' in the first four characters ('not ')"),
        ("There is a train", "other", "neither in the first four characters: other (always wrong)"),
        ("I think yes", "other", "'yes' after the first four characters does not count"),
    ],
)
def test_mme_yes_no_parsing(reply, parsed, rule):
    assert mme_yes_no(reply) == parsed, rule


# subtask -> image -> [(question, gold, reply)]
MME_CASES = {
    "existence": {  # perception
        "000000000001": [("Is there a train in this image?", "Yes", "Yes"), ("Is there a bed in this image?", "No", "No")],
        "000000000002": [("Is there a cat in this image?", "Yes", "Yes"), ("Is there a dog in this image?", "No", "Yes, I think")],
    },
    "artwork": {  # perception, the release layout with images/ and questions_answers_YN/
        "10002": [("Is this by Monet?", "Yes", "There is"), ("Is this by Dali?", "No", "Not really")],
    },
    "code_reasoning": {  # cognition
        "0020": [("Does the code print 3?", "Yes", "yes"), ("Does the code print 4?", "No", "no")],
    },
}  # fmt: skip


def _mme_release(tmp_path: Path) -> tuple[Path, list[dict]]:
    root = tmp_path / "MME_Benchmark_release_version"
    answers = []
    for subtask, images in MME_CASES.items():
        with_folders = subtask == "artwork"
        for stem, rows in images.items():
            qa_dir = root / subtask / ("questions_answers_YN" if with_folders else "")
            qa_dir.mkdir(parents=True, exist_ok=True)
            lines = [f"{q} Please answer yes or no.\t{gold}" for q, gold, _ in rows]
            (qa_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")
            image = f"{subtask}/images/{stem}.jpg" if with_folders else f"{subtask}/{stem}.png"
            for q, _, reply in rows:  # LLaVA's llava_mme.jsonl prompt: its answer-format line instead
                answers.append(
                    _answer(image, reply, f"{q}\nAnswer the question using a single word or phrase.")
                )
    return root, answers


def official_mme_scores(lines_by_subtask: dict[str, list[str]]) -> dict[str, float]:
    """calculation.py's rule, re-implemented independently: per subtask file, consecutive line pairs are
    an image; acc = right / questions, acc+ = images with both right / images, score = 100 (acc + acc+)."""
    scores = {}
    for subtask, lines in lines_by_subtask.items():
        right, plus = 0, 0
        for a, b in zip(lines[::2], lines[1::2]):
            ok = [gt.lower() == mme_yes_no(pred) for _, _, gt, pred in (a.split("\t"), b.split("\t"))]
            right += sum(ok)
            plus += all(ok)
        scores[subtask] = 100 * right / len(lines) + 100 * plus / (len(lines) // 2)
    return scores


def test_mme_acc_and_acc_plus(tmp_path):
    root, answers = _mme_release(tmp_path)
    result = score("mme", answers, root)
    existence = result["subtasks"]["existence"]
    # 3 of 4 questions right; image 1 has both right, image 2 one: acc 75, acc+ 50
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (
        approx(75),
        approx(50),
        approx(125),
    )
    # "There is" is other (wrong), "Not really" reads no (right): acc 50, acc+ 0
    assert result["subtasks"]["artwork"]["score"] == approx(50)
    assert result["subtasks"]["code_reasoning"]["score"] == approx(200)
    assert result["perception"] == approx(175) and result["cognition"] == approx(200)
    assert result["total"] == approx(375)
    assert "OCR" in result["missing_subtasks"] and "existence" not in result["missing_subtasks"]
    # the eval tool's lines (image, question, gold, reply) in LLaVA's order, scored by calculation.py's rule
    tool_lines = {
        subtask: [
            f"{stem}.jpg\t{q}\t{gold}\t{reply}" for stem, rows in images.items() for q, gold, reply in rows
        ]
        for subtask, images in MME_CASES.items()
    }
    for subtask, expected in official_mme_scores(tool_lines).items():
        assert result["subtasks"][subtask]["score"] == approx(expected)


def test_mme_eval_tool_layout_and_missing_answers(tmp_path):
    _, answers = _mme_release(tmp_path)
    tool = tmp_path / "Your_Results"
    tool.mkdir()
    for subtask, images in MME_CASES.items():
        lines = [
            f"{stem}.jpg\t{q} Please answer yes or no.\t{gold}"
            for stem, rows in images.items()
            for q, gold, _ in rows
        ]
        (tool / f"{subtask}.txt").write_text("\n".join(lines) + "\n")
    assert score("mme", answers, tool)["total"] == approx(375)
    # a missing answer counts as "other" (wrong): code_reasoning's first question -> acc 50, acc+ 0
    fewer = [
        a for a in answers if not (a["question_id"].startswith("code_reasoning") and "3?" in a["prompt"])
    ]
    result = score("mme", fewer, tool)
    assert result["cognition"] == approx(50) and result["coverage"]["missing"] == 1


# ---------------------------------------------------------------- GQA


def test_gqa_exact_match(tmp_path):
    def q(answer, structural, balanced=True):
        return {"answer": answer, "isBalanced": balanced, "imageId": "n1", "question": "?",
                "types": {"structural": structural, "semantic": "attr", "detailed": "x"},
                "groups": {"global": None, "local": "x"}}  # fmt: skip

    ann = _write_json(
        tmp_path / "testdev_balanced_questions.json",
        {
            "1": q("yes", "verify"),
            "2": q("left", "query"),
            "3": q("table", "query"),
            "4": q("red", "query"),
            "5": q("no", "logical"),
            "6": q("blue", "query", balanced=False),
        },  # fmt: skip
    )
    answers = [
        _answer("1", "Yes."),  # LLaVA's conversion: trailing periods stripped, lowercased
        _answer("2", "Left"),  # lowercased
        _answer("3", "the table"),  # exact match: no article removal
        _answer(4, "red..."),  # every trailing period goes; an int id matches the string key
        # 5 has no answer: wrong
        _answer("6", "green"),  # unbalanced questions are not scored (nor unknown)
    ]
    result = score("gqa", answers, ann)
    assert result["accuracy"] == approx(60.0) and result["n"] == 5
    assert result["binary"] == approx(50.0) and result["open"] == approx(200 / 3)  # open = structural 'query'
    assert result["coverage"].get("unknown", 0) == 0 and result["coverage"]["missing"] == 1


# ---------------------------------------------------------------- MMBench


@pytest.mark.parametrize(
    ("reply", "letter", "rule"),
    [
        ("B", "B", "a bare letter"),
        ("A. dog", "A", "the form 'A.'"),
        ("The answer is D", "D", "exactly one bare letter among the words"),
        ("(C)", "C", "the form '(C)'"),
        ("A picture of two apples", "B", "a bare 'A' in > 3 words is an article; then the option text"),
        ("It is yes", "A", "no letter: the one option whose text the reply contains"),
        ("one apple or two apples", None, "two option texts: unresolved"),
        ("Maybe", None, "nothing: unresolved (the official tool asks ChatGPT)"),
        ("E", "E", "letters A-E are read whatever the options (E is then wrong)"),
    ],
)
def test_mmbench_letter_inference(reply, letter, rule):
    choices = {"A": "yes" if "yes" in reply else "one apple", "B": "two apples"}
    assert infer_letter(reply, choices) == letter, rule


MMBENCH_COLUMNS = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "l2-category",
    "image",
]


def _mmbench(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "mmbench_dev_20230712.tsv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, MMBENCH_COLUMNS, delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({"hint": "nan", "image": "aGVsbG8=", "D": "", **row})
    return path


def _mm(index, options, answer, category="attribute", l2="FP-S"):
    return {"index": index, "question": "Which?", **dict(zip("ABCD", options)), "answer": answer,
            "category": category, "l2-category": l2}  # fmt: skip


def test_mmbench_circular_copies_in_the_tsv(tmp_path):
    """The TSV holds each question at index i and its rotations at i + k * 1e6 (the official layout)."""
    tsv = _mmbench(
        tmp_path,
        [
            _mm(0, ["cat", "dog", "bird", "fish"], "B"), _mm(1_000_000, ["dog", "bird", "fish", "cat"], "A"),
            _mm(2_000_000, ["bird", "fish", "cat", "dog"], "D"), _mm(3_000_000, ["fish", "cat", "dog", "bird"], "C"),
            _mm(1, ["red", "green", "blue", "nan"], "C"), _mm(1_000_001, ["green", "blue", "red", "NaN"], "B"),
            _mm(2_000_001, ["blue", "red", "green", ""], "A"),
            _mm(2, ["yes", "no"], "A", "logic", "LR"), _mm(1_000_002, ["no", "yes"], "B", "logic", "LR"),
            _mm(3, ["one apple", "two apples"], "B", "logic", "LR"),
            _mm(1_000_003, ["two apples", "one apple"], "A", "logic", "LR"),
        ],
    )  # fmt: skip
    answers = [
        _answer(0, "B"), _answer(1_000_000, "A. dog"), _answer(2_000_000, "The answer is D"),
        _answer(3_000_000, "(C)"),  # question 0: all four rotations right -> hit
        # question 1 (3 options: "nan" / "NaN" / empty D is no option): right, right, then wrong -> miss
        _answer(1, "C"), _answer(1_000_001, "B"), _answer(2_000_001, "B"),
        _answer(2, "It is yes"), _answer(1_000_002, "Maybe"),  # unresolved rotation -> circular mismatch
        _answer(3, "A picture of two apples"), _answer(1_000_003, "A"),  # article rule, then bare A -> hit
    ]  # fmt: skip
    result = score("mmbench", answers, tsv)
    assert result["circular"] and result["n"] == 4
    assert result["accuracy"] == approx(50.0)  # questions 0 and 3
    assert result["single_pass_accuracy"] == approx(100.0)  # every index < 1e6 row is right
    assert result["per_category"] == {"attribute": {"accuracy": approx(50.0), "n": 2},
                                      "logic": {"accuracy": approx(50.0), "n": 2}}  # fmt: skip
    assert result["unresolved"]["count"] == 1
    # a missing rotation is a miss
    assert score("mmbench", answers[1:], tsv)["accuracy"] == approx(25.0)


def test_mmbench_llava_all_rounds(tmp_path):
    """LLaVA's model_vqa_mmbench.py --all-rounds: round r shows the options shifted left by r with the
    letters A.. kept, so the right letter moves: B (round 0) -> A (round 1) -> C (round 2)."""
    tsv = _mmbench(tmp_path, [_mm(10, ["cat", "dog", "bird"], "B"), _mm(11, ["cat", "dog", "bird"], "B")])
    answers = [_answer(10, "B", round_id=0), _answer(10, "A", round_id=1), _answer(10, "C", round_id=2),
               _answer(11, "B", round_id=0), _answer(11, "B", round_id=1), _answer(11, "C", round_id=2)]  # fmt: skip
    result = score("mmbench", answers, tsv)
    assert result["accuracy"] == approx(50.0) and result["single_pass_accuracy"] == approx(100.0)
    assert result["coverage"]["scored"] == 6 and result["coverage"].get("unknown", 0) == 0


def test_mmbench_test_split_without_answers_is_refused(tmp_path):
    tsv = _mmbench(tmp_path, [_mm(0, ["a", "b"], "")])
    with pytest.raises(ScoringError, match="no answer"):
        score("mmbench", [], tsv)


# ---------------------------------------------------------------- SEED-Bench


def test_seed_letter_accuracy(tmp_path):
    def q(qid, answer, type_id, data_type="image"):
        return {"question_id": qid, "question": "?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
                "choice_d": "d", "answer": answer, "question_type_id": type_id, "data_type": data_type,
                "data_id": f"{qid}.jpg"}  # fmt: skip

    ann = _write_json(
        tmp_path / "SEED-Bench.json",
        {
            "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10},
            "questions": [
                q("101", "A", 1),
                q("102", "B", 1),
                q("103", "C", 2),
                q("104", "D", 2),
                q("105", "D", 10, "video"),
            ],
        },  # fmt: skip
    )
    answers = [
        _answer(101, "A"),  # exact letter; an int id matches the string id (LLaVA tries int and str)
        _answer("102", "B."),  # exact match only: "B." is wrong
        # 103 has no answer: wrong
        _answer("104", "D"),
        _answer("105", "D"),
    ]
    result = score("seed", answers, ann)
    assert result["accuracy"] == approx(60.0) and result["n"] == 5
    assert result["image_accuracy"] == approx(50.0) and result["video_accuracy"] == approx(100.0)
    assert result["per_question_type"] == {
        "Scene Understanding": {"accuracy": approx(50.0), "n": 2},
        "Instance Identity": {"accuracy": approx(50.0), "n": 2},
        "Action Recognition": {"accuracy": approx(100.0), "n": 1},
    }


# ---------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize(
    ("reply", "letter", "rule"),
    [
        ("B", "B", "exactly an option letter"),
        ("A. foo", "A", "a letter followed by '. '"),
        ("The answer is C.", "C", "exactly one 'The answer is X.'"),
        ("The answer is B. The answer is B.", None, "two 'The answer is' matches: FAILED"),
        ("(B)", None, "no rule reads '(B)': FAILED"),
        ("b", None, "lowercase is not a letter: FAILED"),
    ],
)
def test_scienceqa_letter_parsing(reply, letter, rule):
    assert parse_scienceqa_letter(reply) == letter, rule


def test_scienceqa_accuracy_and_img(tmp_path):
    def p(answer, image, n_choices=3):
        return {"question": "?", "choices": [f"c{i}" for i in range(n_choices)], "answer": answer,
                "image": "image.png" if image else None, "hint": "", "split": "test"}  # fmt: skip

    problems = {"1": p(1, True), "2": p(0, True), "3": p(2, False), "4": p(1, True), "5": p(0, False),
                "6": p(2, True), "7": p(0, True), "8": p(0, True)}  # fmt: skip
    _write_json(tmp_path / "problems.json", problems)
    _write_json(
        tmp_path / "pid_splits.json", {"train": ["8"], "val": [], "test": [str(i) for i in range(1, 8)]}
    )
    answers = [
        _answer("1", "B"),  # right
        _answer("2", "A. c0"),  # right: letter then ". "
        _answer("3", "The answer is C."),  # right
        _answer("4", "The answer is B. The answer is B."),  # FAILED: two matches
        _answer("5", "(A)"),  # FAILED
        _answer("6", "D"),  # a letter beyond the 3 choices: wrong
        # 7 has no answer: wrong
        _answer("8", "A"),  # a train problem: not scored, counted unknown to the test split
    ]
    result = score("scienceqa", answers, tmp_path / "problems.json")
    assert result["accuracy"] == approx(300 / 7) and result["n"] == 7
    assert result["img_accuracy"] == approx(40.0) and result["n_img"] == 5  # 1, 2 right of 1, 2, 4, 6, 7
    assert result["coverage"]["unknown"] == 1 and result["coverage"]["missing"] == 1
    assert score("scienceqa", answers, tmp_path, split="train")["accuracy"] == approx(100.0)


# ---------------------------------------------------------------- coverage and options


def test_bad_records_duplicates_and_unknown_ids_are_counted_and_named(tmp_path):
    ann = _textvqa(tmp_path)
    answers = [_answer(4, "no"), _answer(4, "yes"), {"question_id": 5}, _answer(99, "x")]
    result = score("textvqa", answers, ann, subset=True)
    cov = result["coverage"]
    assert (cov["answers"], cov["duplicates"], cov["invalid"], cov["unknown"]) == (4, 1, 1, 1)
    assert result["accuracy"] == approx(100.0)  # the last answer to question 4 is scored
    assert "99" in cov["examples"]["unknown"][0] and "answer #2" in cov["examples"]["invalid"][0]
    with pytest.raises(ScoringError, match="duplicates"):
        score("textvqa", answers, ann, strict=True)


def test_unknown_task_refused_option_and_missing_file():
    with pytest.raises(ScoringError, match="unknown task"):
        score("nope", [], "x")
    with pytest.raises(ScoringError, match="takes no questions"):
        score("gqa", [], "x", questions="q.jsonl")
    with pytest.raises(ScoringError, match="does not exist"):
        score("gqa", [], "/nonexistent/testdev_balanced_questions.json")
