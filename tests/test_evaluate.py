"""`python -m llava_lightning evaluate` (eval/evaluate.py): question files, LLaVA-format answers, skips,
resume, chunks, scoring through `eval/tasks.py` (a fake here) and the built-in multiple_choice task."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from llava_lightning.eval import evaluate
from llava_lightning.eval.evaluate import (
    QuestionFileError,
    answer_questions,
    chunk,
    load_model,
    load_questions,
    main,
)
from llava_lightning.module import LlavaLitModule


def _fake_tasks(monkeypatch, fake) -> None:
    """`eval/tasks.py` replaced by `fake` for `evaluate`'s `from . import tasks` (module and attribute:
    once imported, the package attribute is what the import finds)."""
    import llava_lightning.eval as package

    monkeypatch.setitem(sys.modules, "llava_lightning.eval.tasks", fake)
    monkeypatch.setattr(package, "tasks", fake, raising=False)


def _images(root: Path, n: int) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + i, 36), (30 * i, 100, 200)).save(root / "images" / f"{i}.png")


def _question_file(root: Path, n: int = 4, missing: int | None = None) -> Path:
    _images(root, n)
    lines = []
    for i in range(n):
        q = {
            "question_id": i,
            "text": f"What colour is it {i}?\nAnswer the question using a single word or phrase.",
        }
        q["image"] = f"images/{i}.png" if i != missing else "images/nowhere.png"
        if i == 1:
            q["category"] = "adversarial"
        lines.append(json.dumps(q))
    lines.append(json.dumps({"question_id": "text-only", "text": "Say hi."}))
    path = root / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple[Path, LlavaLitModule]:
    root = tmp_path_factory.mktemp("ckpt")
    lit = LlavaLitModule(preset="tiny", stage="finetune", template="vicuna_v1", image_aspect="square")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=root)
    trainer.strategy.connect(lit)
    path = root / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, lit


def test_load_questions_reads_jsonl_and_conversation_records(tmp_path):
    path = _question_file(tmp_path)
    questions = load_questions(path)
    assert [q["question_id"] for q in questions] == [0, 1, 2, 3, "text-only"]
    assert questions[1]["category"] == "adversarial" and "image" not in questions[4]
    records = [
        {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nQ?\nA. x\nB. y"}, {"from": "gpt", "value": "B"}], "answer_letter": "B"},
    ]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(records))
    (q,) = load_questions(tmp_path / "r.json")
    assert q == {"question_id": "a", "text": "Q?\nA. x\nB. y", "image": "x.png", "answer_letter": "B"}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            '{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "a"}\n',
            r"question_id 1 appears twice",
        ),
        ('{"question_id": 1}\n', r"record 1 needs a 'question_id' and a string 'text'"),
        ('{"question_id": 1, "text": "a"}\nnot json\n', r"q\.jsonl:2: not a JSON line"),
    ],
)
def test_bad_question_files_are_named(tmp_path, content, match):
    (tmp_path / "q.jsonl").write_text(content)
    with pytest.raises(QuestionFileError, match=match):
        load_questions(tmp_path / "q.jsonl")
    with pytest.raises(FileNotFoundError, match="convert the benchmark first"):
        load_questions(tmp_path / "none.jsonl")


def test_chunks_are_llava_get_chunk():
    items = list(range(10))
    assert [chunk(items, 3, k) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sum((chunk(items, 4, k) for k in range(4)), []) == items
    with pytest.raises(ValueError, match="chunk_idx"):
        chunk(items, 2, 2)


def test_answers_are_llava_format_and_missing_images_are_counted(tmp_path, monkeypatch):
    questions = load_questions(_question_file(tmp_path, missing=2))
    calls = []

    def fake(model, images, prompts, **kwargs):
        calls.append((images, prompts, kwargs))
        return [f"reply {p[:20]}" for p in prompts]

    answers, skipped = answer_questions(
        None, questions, tmp_path, batch_size=2, model_id="m", generate_fn=fake, template="chatml"
    )
    assert skipped == {"image missing": 1}
    assert [a["question_id"] for a in answers] == [0, 1, 3, "text-only"]
    assert [len(p) for _, p, _ in calls] == [2, 1, 1]  # batch 2 lost its missing-image question
    assert calls[0][2] == {
        "template": "chatml",
        "max_new_tokens": 128,
        "aspect": "pad",
    }  # greedy: no sampling args
    assert calls[0][0][0][0].size == (40, 36) and calls[-1][0] == [None]
    a = answers[1]
    assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata", "category"}
    assert a["prompt"] == questions[1]["text"] and a["text"] == "reply " + questions[1]["text"][:20]
    assert a["model_id"] == "m" and a["metadata"] == {} and a["category"] == "adversarial"
    assert len({x["answer_id"] for x in answers}) == 4
    with pytest.raises(FileNotFoundError) as info:
        answer_questions(None, questions, tmp_path, generate_fn=fake, strict=True)
    assert "question 2" in "".join(info.value.__notes__)


def test_evaluate_cli_with_a_checkpoint_matches_generate_and_scores(tmp_path, tiny_ckpt, monkeypatch, capsys):
    ckpt, lit = tiny_ckpt
    path = _question_file(tmp_path, missing=3)
    annotations = tmp_path / "annotations.json"
    annotations.write_text("{}")
    seen = {}

    def fake_score(task, answers, annotations, **options):
        seen.update(task=task, n=len(answers), annotations=str(annotations), options=options)
        return {"accuracy": 0.25}

    # eval/tasks.py's interface (h-score): POPE takes the question file, as its scorer's `questions`.
    tasks = {"pope": types.SimpleNamespace(options=("questions", "subset", "strict"))}
    _fake_tasks(monkeypatch, types.SimpleNamespace(score=fake_score, TASKS=tasks))
    out = tmp_path / "out"
    argv = ["--task", "pope", "--questions", str(path), "--ckpt_path", str(ckpt), "--out", str(out)]
    main([*argv, "--annotations", str(annotations), "--batch_size", "3", "--max_new_tokens", "4"])
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    assert [a["question_id"] for a in answers] == [0, 1, 2, "text-only"]
    assert {a["model_id"] for a in answers} == {"run-last"}
    assert seen == {"task": "pope", "n": 4, "annotations": str(annotations), "options": {"questions": path}}
    assert (
        results["metrics"] == {"accuracy": 0.25}
        and results["task"] == "pope"
        and results["model"] == "run-last"
    )
    assert results["counts"] == {"questions": 5, "answered": 4, "skipped": {"image missing": 1}}
    # The checkpoint's template and aspect, and the replies `generate` gives that model one by one.
    assert results["settings"]["template"] == "vicuna_v1" and results["settings"]["image_aspect"] == "square"
    from llava_lightning.inference.generate import generate

    model = lit.model.eval()
    with torch.inference_mode():
        one = generate(model, [Image.open(tmp_path / "images/1.png").convert("RGB")], [answers[1]["prompt"]],
                       template="vicuna_v1", aspect="square", max_new_tokens=4)  # fmt: skip
    assert answers[1]["text"] == one[0]
    assert "4 answers of 5 questions (1 skipped)" in capsys.readouterr().out


def test_resume_answers_only_the_rest(tmp_path, monkeypatch):
    path = _question_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    kept = {
        "question_id": 0,
        "prompt": load_questions(path)[0]["text"],  # an answer is its question's by id and prompt
        "text": "kept",
        "answer_id": "x",
        "model_id": "m",
        "metadata": {},
    }
    (out / "answers.jsonl").write_text(json.dumps(kept) + "\n" + '{"question_id": 1, "te')  # torn last line
    asked = []

    def fake(model, images, prompts, **kwargs):
        asked.extend(prompts)
        return ["new"] * len(prompts)

    monkeypatch.setattr(evaluate, "load_model", lambda *a: (torch.nn.Linear(1, 1), "vicuna_v1", "pad", "m"))
    monkeypatch.setattr("llava_lightning.inference.generate.generate", fake)
    main(
        [
            "--task",
            "vqav2",
            "--questions",
            str(path),
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--resume",
            "--device",
            "cpu",
        ]
    )
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [0, 1, 2, 3, "text-only"]
    assert answers[0]["text"] == "kept" and {a["text"] for a in answers[1:]} == {"new"}
    assert len(asked) == 4
    assert json.loads((out / "results.json").read_text())["metrics"] is None  # no annotations: answers only


def test_multiple_choice_task_scores_the_records_own_letters(tmp_path, monkeypatch):
    _images(tmp_path, 3)
    records = [
        {"id": f"q{i}", "image": f"images/{i}.png", "question_type": "colour" if i else "shape",
         "conversations": [{"from": "human", "value": "<image>\nWhich?\nA. red\nB. blue\nC. green\nAnswer with the option's letter from the given choices directly."},
                           {"from": "gpt", "value": "ABC"[i]}],
         "answer_letter": "ABC"[i], "options": ["red", "blue", "green"]}
        for i in range(3)
    ]  # fmt: skip
    (tmp_path / "mc.json").write_text(json.dumps(records))
    monkeypatch.setattr(evaluate, "load_model", lambda *a: (torch.nn.Linear(1, 1), "vicuna_v1", "pad", "m"))
    replies = iter(["A", "The answer is C.", "C"])
    monkeypatch.setattr(
        "llava_lightning.inference.generate.generate",
        lambda m, i, prompts, **k: [next(replies) for _ in prompts],
    )
    out = tmp_path / "out"
    main(["--task", "multiple_choice", "--questions", str(tmp_path / "mc.json"), "--preset", "tiny", "--out", str(out), "--device", "cpu"])  # fmt: skip
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["correct"] == 2 and metrics["n"] == 3 and metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["chance"] == pytest.approx(1 / 3) and metrics["unparsed"] == 0


def test_model_sources_are_exclusive_and_checked(tmp_path):
    with pytest.raises(
        ValueError, match="exactly one model source: --ckpt_path CKPT .*; got --ckpt_path, --preset"
    ):
        load_model(ckpt_path="a.ckpt", preset="tiny")
    with pytest.raises(FileNotFoundError, match="checkpoint .*nothing.ckpt does not exist"):
        load_model(ckpt_path=str(tmp_path / "nothing.ckpt"))
    with pytest.raises(ValueError, match="unknown task 'vqa3'"):
        main(["--task", "vqa3", "--questions", "q.jsonl", "--preset", "tiny"])


def test_scoring_passes_only_the_options_a_task_takes(monkeypatch):
    calls = []
    tasks = {
        "pope": types.SimpleNamespace(options=("questions", "subset", "strict")),
        "scienceqa": types.SimpleNamespace(options=("split", "subset", "strict")),
        "textvqa": types.SimpleNamespace(options=("strict",)),
    }
    fake = types.SimpleNamespace(TASKS=tasks, score=lambda task, a, ann, **o: calls.append((task, o)) or {})
    _fake_tasks(monkeypatch, fake)
    evaluate.score("pope", [], "labels", questions_file="q.jsonl", partial=True)
    evaluate.score("scienceqa", [], "problems.json", questions_file="q.jsonl", split="val")
    evaluate.score("textvqa", [], "val.json", questions_file="q.jsonl", partial=True)  # warns: no subset
    assert calls == [
        ("pope", {"questions": "q.jsonl", "subset": True}),
        ("scienceqa", {"split": "val"}),
        ("textvqa", {}),
    ]
    with pytest.raises(ValueError, match="task 'textvqa' takes no --split"):
        evaluate.score("textvqa", [], "val.json", split="val")
    with pytest.raises(ValueError, match="task 'gqa' needs --annotations"):
        evaluate.score("gqa", [], None)


def test_limited_run_is_scored_as_a_subset(tmp_path, monkeypatch):
    path = _question_file(tmp_path)
    seen = {}
    tasks = {"gqa": types.SimpleNamespace(options=("subset", "strict"))}
    fake = types.SimpleNamespace(TASKS=tasks, score=lambda task, a, ann, **o: seen.update(o, n=len(a)) or {})
    _fake_tasks(monkeypatch, fake)
    monkeypatch.setattr(evaluate, "load_model", lambda *a: (torch.nn.Linear(1, 1), "vicuna_v1", "pad", "m"))
    monkeypatch.setattr("llava_lightning.inference.generate.generate", lambda m, i, p, **k: ["x"] * len(p))
    (tmp_path / "gqa.json").write_text("{}")
    argv = ["--task", "gqa", "--questions", str(path), "--preset", "tiny", "--device", "cpu"]
    main([*argv, "--out", str(tmp_path / "o"), "--annotations", str(tmp_path / "gqa.json"), "--limit", "2"])
    assert seen == {"subset": True, "n": 2}
