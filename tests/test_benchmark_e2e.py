"""Benchmark path end to end: an official release (tiny, generated in its format) -> `to_eval.py` question
file -> answers -> `evaluate`'s scoring through the real `eval/tasks.py` scorers. Gold answers score
full marks on every task and one wrong answer costs what the metric's definition says; a real
`evaluate` run's `results.json` equals `score` run afterwards on its answer file."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_recipes.benchmarks import to_eval
from llava_lightning.eval import evaluate
from llava_lightning.eval.evaluate import CARRIED, load_questions
from llava_lightning.eval.score import main as score_main


def _png(path: Path | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _answers(question_file: Path, reply) -> list[dict]:
    """LLaVA answer records (as `evaluate` writes them) with `reply(question)` as the text."""
    return [
        {
            "question_id": q["question_id"],
            "prompt": q["text"],
            "text": reply(q),
            **{k: q[k] for k in CARRIED if k in q},
        }
        for q in load_questions(question_file)
    ]


def _convert(root: Path, *argv: str) -> Path:
    out = root / f"{argv[0]}.jsonl"
    to_eval.main([*argv, "--out", str(out)])
    return out


def test_pope_gold_scores_full_and_always_yes_scores_half(tmp_path):
    labels = {
        "random": [("a.jpg", "Is there a dog in the image?", "yes"), ("b.jpg", "Is there a cat in the image?", "no")],
        "adversarial": [("a.jpg", "Is there a cat in the image?", "no"), ("b.jpg", "Is there a dog in the image?", "yes")],
    }  # fmt: skip
    gold, folder = {}, tmp_path / "pope"
    folder.mkdir()
    for split, rows in labels.items():  # ids restart per split, as in the release
        lines = [json.dumps({"question_id": i + 1, "image": im, "text": t, "label": lab}) for i, (im, t, lab) in enumerate(rows)]  # fmt: skip
        (folder / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
        gold.update({(split, im, t): lab for im, t, lab in rows})
    q = _convert(tmp_path, "pope", "--labels", str(folder), "--splits", "adversarial", "random")
    right = evaluate.score("pope", _answers(q, lambda q: gold[(q["category"], q["image"], q["text"].split("\n")[0])].capitalize()), folder, questions_file=q)  # fmt: skip
    assert right["f1"] == 100.0 and right["accuracy"] == 100.0 and right["coverage"]["scored"] == 4
    # Always "Yes": half right; precision 50, recall 100, F1 = 2*0.5*1/1.5 = 66.67 (POPE's definitions).
    yes = evaluate.score("pope", _answers(q, lambda q: "Yes"), folder, questions_file=q)
    assert yes["accuracy"] == 50.0 and yes["f1"] == pytest.approx(200 / 3, abs=0.01)


def test_mme_pairs_score_acc_plus(tmp_path):
    root = tmp_path / "MME"
    _png(root / "artwork" / "images" / "1.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "1.txt").write_text(
        "Is it Bosch? Please answer yes or no.\tYes\nIs it Dali? Please answer yes or no.\tNo\n"
    )
    _png(root / "count" / "2.png")
    (root / "count" / "2.txt").write_text(
        "Two dogs? Please answer yes or no.\tNo\nOne dog? Please answer yes or no.\tYes\n"
    )
    gold = {"Is it Bosch?": "Yes", "Is it Dali?": "No", "Two dogs?": "No", "One dog?": "Yes"}
    q = _convert(tmp_path, "mme", "--release", str(root))
    right = evaluate.score(
        "mme", _answers(q, lambda q: gold[q["text"].split(" Please")[0]]), root, questions_file=q
    )
    assert (
        right["perception"] == 400.0 and right["coverage"]["scored"] == 4
    )  # 2 subtasks x (acc 100 + acc+ 100)
    # One wrong answer in `count`: acc 50, acc+ 0 (its image pair is broken) -> 200 + 50.
    wrong = evaluate.score("mme", _answers(q, lambda q: "No" if q["text"].startswith("One dog") else gold[q["text"].split(" Please")[0]]), root, questions_file=q)  # fmt: skip
    assert wrong["perception"] == 250.0


def test_mmbench_circular_over_all_rounds(tmp_path):
    img = base64.b64encode(_png()).decode()
    (tmp_path / "mmb.tsv").write_text(
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\tl2-category\timage\n"
        f"0\tColour?\tnan\tred\tblue\tgreen\tnan\tB\tattr\tp\t{img}\n"
        f"1\tShape?\tnan\tcircle\tsquare\tnan\tnan\tA\tshape\tp\t{img}\n"
    )
    gold = {0: "blue", 1: "circle"}
    q = _convert(tmp_path, "mmbench", "--tsv", str(tmp_path / "mmb.tsv"), "--image_dir", str(tmp_path / "img"), "--all_rounds")  # fmt: skip
    answers = _answers(q, lambda q: "ABCD"[q["options"].index(gold[q["question_id"]])])
    assert len(answers) == 5  # 3 rotations of the 3-option question, 2 of the 2-option one
    assert evaluate.score("mmbench", answers, tmp_path / "mmb.tsv", questions_file=q)["accuracy"] == 100.0
    wrong = next(a for a in answers if a["question_id"] == 0 and a["round_id"] == 1)
    wrong["text"] = "C" if wrong["text"] != "C" else "A"  # one rotation wrong fails its whole question
    assert evaluate.score("mmbench", answers, tmp_path / "mmb.tsv")["accuracy"] == 50.0


def test_single_file_tasks_gold_full_marks(tmp_path):
    (tmp_path / "seed.json").write_text(json.dumps({"question_type": {"Scene": 1}, "questions": [{"question_id": "101", "data_id": "x.jpg", "data_type": "image", "question": "Q?", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "answer": "C", "question_type_id": 1}]}))  # fmt: skip
    q = _convert(tmp_path, "seed", "--questions", str(tmp_path / "seed.json"))
    assert evaluate.score("seed", _answers(q, lambda q: "C"), tmp_path / "seed.json")["accuracy"] == 100.0
    assert evaluate.score("seed", _answers(q, lambda q: "B"), tmp_path / "seed.json")["accuracy"] == 0.0

    (tmp_path / "gqa.json").write_text(json.dumps({"201": {"imageId": "n1", "question": "Color?", "answer": "red", "isBalanced": True, "types": {"structural": "query", "semantic": "attr"}}}))  # fmt: skip
    q = _convert(tmp_path, "gqa", "--questions", str(tmp_path / "gqa.json"))
    # "Red." matches "red": LLaVA's GQA conversion strips the period and lowercases.
    assert evaluate.score("gqa", _answers(q, lambda q: "Red."), tmp_path / "gqa.json")["accuracy"] == 100.0

    vizwiz = [{"image": "VizWiz_val_1.jpg", "question": "What?", "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10, "answer_type": "unanswerable", "answerable": 0}]  # fmt: skip
    (tmp_path / "vizwiz.json").write_text(json.dumps(vizwiz))
    q = _convert(tmp_path, "vizwiz", "--questions", str(tmp_path / "vizwiz.json"))
    assert evaluate.score("vizwiz", _answers(q, lambda q: "Unanswerable"), tmp_path / "vizwiz.json", questions_file=q)["accuracy"] == 100.0  # fmt: skip

    # TextVQA: 2 of 10 humans said "canon": min(#matches/3, 1) averaged over the 10 leave-one-out sets.
    (tmp_path / "textvqa.json").write_text(json.dumps({"data": [{"question": "brand?", "image_id": "abc", "question_id": 7, "answers": ["nikon"] * 8 + ["canon"] * 2}]}))  # fmt: skip
    q = _convert(tmp_path, "textvqa", "--questions", str(tmp_path / "textvqa.json"))
    assert evaluate.score("textvqa", _answers(q, lambda q: "Nikon"), tmp_path / "textvqa.json", questions_file=q)["accuracy"] == 100.0  # fmt: skip
    canon = evaluate.score(
        "textvqa", _answers(q, lambda q: "canon"), tmp_path / "textvqa.json", questions_file=q
    )
    assert canon["accuracy"] == pytest.approx(100 * (8 * 2 / 3 + 2 * 1 / 3) / 10, abs=1e-6)

    (tmp_path / "sqa").mkdir()
    (tmp_path / "sqa" / "problems.json").write_text(json.dumps({"5": {"question": "Mammal?", "choices": ["frog", "cat"], "answer": 1, "hint": "", "image": "image.png", "split": "test"}, "6": {"question": "Wet?", "choices": ["water", "sand"], "answer": 0, "hint": "", "image": None, "split": "test"}}))  # fmt: skip
    (tmp_path / "sqa" / "pid_splits.json").write_text(json.dumps({"test": ["5", "6"]}))
    q = _convert(tmp_path, "scienceqa", "--problems", str(tmp_path / "sqa/problems.json"), "--pid_splits", str(tmp_path / "sqa/pid_splits.json"))  # fmt: skip
    m = evaluate.score("scienceqa", _answers(q, lambda q: q["answer_letter"]), tmp_path / "sqa" / "problems.json", questions_file=q)  # fmt: skip
    assert m["accuracy"] == 100.0 and m["img_accuracy"] == 100.0


def test_evaluate_results_equal_score_on_its_answer_file(tmp_path, capsys):
    """The real path: `evaluate --task pope` on the tiny model writes answers and results; `score` on that
    answer file afterwards gives the same metrics."""
    folder = tmp_path / "pope"
    folder.mkdir()
    rows = [(f"{i}.png", f"Is there a {o} in the image?", "yes" if i % 2 else "no") for i, o in enumerate(["dog", "cat", "car", "cup"])]  # fmt: skip
    (folder / "coco_pope_random.json").write_text("".join(json.dumps({"question_id": i + 1, "image": im, "text": t, "label": lab}) + "\n" for i, (im, t, lab) in enumerate(rows)))  # fmt: skip
    for im, _, _ in rows:
        _png(tmp_path / "images" / im)
    q = _convert(tmp_path, "pope", "--labels", str(folder), "--splits", "random")
    out = tmp_path / "out"
    evaluate.main(["--task", "pope", "--questions", str(q), "--image_root", str(tmp_path / "images"), "--annotations", str(folder),
                   "--preset", "tiny", "--out", str(out), "--max_new_tokens", "3", "--device", "cpu"])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["counts"]["answered"] == 4
    capsys.readouterr()
    score_main(["--task", "pope", "--answers", str(out / "answers.jsonl"), "--annotations", str(folder), "--questions", str(q)])  # fmt: skip
    scored = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in scored.items() if k != "coverage"} == {
        k: v for k, v in results["metrics"].items() if k != "coverage"
    }
