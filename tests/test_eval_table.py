"""`python -m llava_lightning evaluate table` (eval/table.py): the paper-style markdown table of several
results files, each task's headline metric (LLaVA-1.5's table) in the paper's column order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_lightning.eval.evaluate import main as evaluate_main
from llava_lightning.eval.table import PAPER, ResultsFileError, build_table, headline, read_result


def _results(path: Path, task: str, model: str | None, metrics: dict | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"task": task, "model": model, "metrics": metrics} if model else {"task": task, **metrics}
    path.write_text(json.dumps(data))
    return path


def test_headline_metrics_are_the_papers():
    assert headline("pope", {"f1": 85.93, "accuracy": 86.9}) == 85.93  # mean F1 over the splits
    assert headline("mme", {"perception": 1510.7, "cognition": 300.0}) == 1510.7  # perception total
    assert headline("scienceqa", {"accuracy": 70.0, "img_accuracy": 66.8}) == 66.8  # SQA-IMG
    assert headline("seed", {"accuracy": 58.6, "image_accuracy": 66.1}) == 66.1
    assert headline("multiple_choice", {"accuracy": 0.25}) == 25.0  # score_letters: a fraction
    assert headline("gqa", {"n": 3}) is None


def test_table_rows_are_models_columns_benchmarks_in_paper_order(tmp_path, capsys):
    files = [
        _results(tmp_path / "a/mme/results.json", "mme", "ours-7b", {"perception": 1400.04, "cognition": 250.0}),
        _results(tmp_path / "a/gqa/results.json", "gqa", "ours-7b", {"accuracy": 61.25}),
        _results(tmp_path / "b/gqa/results.json", "gqa", "ours-13b", {"accuracy": 63.0}),
        _results(tmp_path / "b/pope/metrics.json", "pope", None, {"f1": 86.0, "splits": {}}),  # score --out
        _results(tmp_path / "c/vqav2/results.json", "vqav2", "ours-7b", None),  # answers only: no metrics
    ]  # fmt: skip
    out = tmp_path / "table.md"
    evaluate_main(["table", *map(str, files), "--out", str(out)])
    table = out.read_text()
    assert capsys.readouterr().out == table
    assert table.splitlines() == [
        "| Model | VQAv2 | GQA | POPE | MME |",
        "|---|---:|---:|---:|---:|",
        "| ours-7b | – | 61.2 | – | 1400.0 |",
        "| ours-13b | – | 63.0 | – | – |",
        "| pope | – | – | 86.0 | – |",  # score --out: no model, the folder names the row
    ]


def test_paper_row_and_bad_files(tmp_path):
    row = [read_result(_results(tmp_path / "r.json", "textvqa", "m", {"accuracy": 50.0}))]
    lines = build_table(row, paper=True).splitlines()
    assert lines[0] == "| Model | VQAv2 | GQA | VizWiz | SQA-IMG | TextVQA | POPE | MME | MMBench |"
    assert lines[2] == f"| {PAPER['model']} | 78.5 | 62.0 | 50.0 | 66.8 | 58.2 | 85.9 | 1510.7 | 64.3 |"
    assert lines[3] == "| m | – | – | – | – | 50.0 | – | – | – |"
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ResultsFileError, match="bad.json is not JSON"):
        read_result(tmp_path / "bad.json")
    (tmp_path / "notask.json").write_text("{}")
    with pytest.raises(ResultsFileError, match="notask.json has no 'task'"):
        read_result(tmp_path / "notask.json")
    with pytest.raises(ResultsFileError, match="none.json does not exist"):
        read_result(tmp_path / "none.json")
