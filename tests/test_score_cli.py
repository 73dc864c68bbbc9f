"""`python -m llava_lightning score`: end to end in a subprocess (the real entry point) and in-process
through `eval.score.main(argv)`: metrics JSON on stdout, `--out`, bad lines counted and named,
`--strict` failing with exit code 2, unknown task, missing annotation file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_lightning.eval.score import main

REPO = Path(__file__).resolve().parents[1]


def _gqa(tmp_path: Path) -> tuple[Path, Path]:
    """A GQA question file (official layout) and an answer file with one unparsable line (line 2)."""

    def q(answer: str) -> dict:
        return {"answer": answer, "isBalanced": True, "types": {"structural": "query", "semantic": "obj"}}

    questions = tmp_path / "testdev_balanced_questions.json"
    questions.write_text(json.dumps({"1": q("dog"), "2": q("cat"), "3": q("red"), "4": q("left")}))
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"question_id": "1", "prompt": "What animal?", "text": "Dog."}) + "\n"
        + "{not json\n"
        + json.dumps({"question_id": "2", "prompt": "What animal?", "text": "dog"}) + "\n"
        + json.dumps({"question_id": "3", "prompt": "What colour?", "text": "red"}) + "\n"
    )  # fmt: skip
    return questions, answers


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "llava_lightning", "score", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip


def test_subprocess_prints_metrics_writes_out_and_names_the_bad_line(tmp_path):
    questions, answers = _gqa(tmp_path)
    out = tmp_path / "results" / "gqa.json"
    out.parent.mkdir()
    proc = _run(
        "--task", "gqa", "--answers", str(answers), "--annotations", str(questions), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    # 1 "Dog." -> "dog" right, 2 wrong, 3 right, 4 no answer (wrong): 2 of 4
    assert result["task"] == "gqa" and result["accuracy"] == pytest.approx(50.0)
    assert result["coverage"]["bad_lines"] == 1 and result["coverage"]["missing"] == 1
    assert f"{answers}:2" in result["coverage"]["examples"]["bad_lines"][0]
    assert json.loads(out.read_text()) == result
    assert "1 bad_lines" in proc.stderr  # the warning names the problems


def test_subprocess_strict_fails_with_exit_code_2(tmp_path):
    questions, answers = _gqa(tmp_path)
    proc = _run("--task", "gqa", "--answers", str(answers), "--annotations", str(questions), "--strict")
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{answers}:2: not JSON" in proc.stderr and "--strict" in proc.stderr


def test_in_process_main(tmp_path, capsys):
    questions, answers = _gqa(tmp_path)
    main(["--task", "gqa", "--answers", str(answers), "--annotations", str(questions), "--subset"])
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(200 / 3) and result["n"] == 3  # question 4 left out


def test_strict_with_a_missing_answer_names_it(tmp_path, capsys):
    questions, answers = _gqa(tmp_path)
    answers.write_text("\n".join(line for line in answers.read_text().splitlines() if "not json" not in line))
    with pytest.raises(SystemExit) as e:
        main(["--task", "gqa", "--answers", str(answers), "--annotations", str(questions), "--strict"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "1 missing" in err and "question '4' has no answer" in err


def test_unknown_task(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--task", "nope", "--answers", "a.jsonl", "--annotations", "x.json"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_missing_files_and_refused_options_give_clear_messages(tmp_path, capsys):
    questions, answers = _gqa(tmp_path)
    cases = [
        (["--annotations", str(tmp_path / "absent.json"), "--answers", str(answers)], "GQA question file"),
        (["--annotations", str(questions), "--answers", str(tmp_path / "absent.jsonl")], "answer file"),
        (
            ["--annotations", str(questions), "--answers", str(answers), "--questions", "q.jsonl"],
            "takes no questions",
        ),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["--task", "gqa", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.startswith("score: "), err
    with pytest.raises(SystemExit):
        main(["--task", "gqa", "--annotations", str(tmp_path / "absent.json"), "--answers", str(answers)])
    assert "does not exist" in capsys.readouterr().err


def test_an_answer_file_that_is_not_utf8_is_named(tmp_path, capsys):
    questions, answers = _gqa(tmp_path)
    answers.write_bytes(b'{"question_id": "1", "text": "\xff"}\n')
    with pytest.raises(SystemExit) as e:
        main(["--task", "gqa", "--answers", str(answers), "--annotations", str(questions)])
    assert e.value.code == 2 and f"answer file {answers} is not UTF-8" in capsys.readouterr().err
