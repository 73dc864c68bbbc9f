"""A markdown table like the LLaVA-1.5 paper's (benchmark columns, model rows) from results JSON files.

    python -m llava_lightning evaluate table outputs/eval/*/*/results.json [--paper] [--out table.md]

A results file is `evaluate`'s `results.json` (`task`, `model`, `metrics`) or `score --out`'s metrics
(`task` and the metrics at the top level; the model is then the file's folder name, or `--model`).
Each task shows its headline metric, the one LLaVA-1.5's table reports (`HEADLINE`): VQAv2, GQA,
VizWiz, TextVQA, MMBench accuracy, SQA-IMG the accuracy on the questions with an image, POPE the F1
averaged over its splits, MME the perception total (points, of 2000), SEED-Bench the image accuracy;
`multiple_choice` (the demo's held-out set) its letter accuracy. Scores are percentages with one
decimal. Columns come in the paper's order, those of other tasks after them; a model without a result
for a task gets "–". `--paper` adds LLaVA-1.5 7B's published row.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# task -> (column title, metric keys tried in order, factor to a percentage)
HEADLINE: dict[str, tuple[str, tuple[str, ...], float]] = {
    "vqav2": ("VQAv2", ("accuracy",), 1.0),
    "gqa": ("GQA", ("accuracy",), 1.0),
    "vizwiz": ("VizWiz", ("accuracy",), 1.0),
    "scienceqa": ("SQA-IMG", ("img_accuracy",), 1.0),
    "textvqa": ("TextVQA", ("accuracy",), 1.0),
    "pope": ("POPE", ("f1",), 1.0),
    "mme": ("MME", ("perception",), 1.0),
    "mmbench": ("MMBench", ("accuracy",), 1.0),
    "seed": ("SEED-IMG", ("image_accuracy",), 1.0),
    "multiple_choice": ("held-out MC", ("accuracy",), 100.0),  # score_letters gives a fraction
}
# LLaVA-1.5 7B as published (paper, Table 4), the benchmarks this project scores; SEED-IMG left out.
PAPER = {
    "model": "LLaVA-1.5 7B (paper)",
    "scores": {"vqav2": 78.5, "gqa": 62.0, "vizwiz": 50.0, "scienceqa": 66.8, "textvqa": 58.2,
               "pope": 85.9, "mme": 1510.7, "mmbench": 64.3},
}  # fmt: skip


class ResultsFileError(ValueError):
    """A results file the table cannot use (the message names it)."""


def headline(task: str, metrics: dict[str, Any]) -> float | None:
    """The task's headline score as a percentage (MME in points), or None when the metrics lack it."""
    _, keys, factor = HEADLINE.get(task, (task, ("accuracy",), 1.0))
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) * factor
    return None


def read_result(path: str | Path, model: str | None = None) -> tuple[str, str, float | None]:
    """(model, task, headline score or None) of one results file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsFileError(f"results file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsFileError(f"results file {path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("task"), str):
        raise ResultsFileError(f"results file {path} has no 'task' (evaluate's results.json or score --out)")
    if "metrics" in data:  # evaluate's results.json
        metrics, name = data["metrics"], data.get("model")
    else:  # score --out: the metrics themselves
        metrics, name = data, None
    name = model or name or path.parent.name
    if metrics is None:
        log.warning("%s: no metrics (answers only: run with --annotations); its cell stays empty", path)
        return name, data["task"], None
    score = headline(data["task"], metrics)
    if score is None:
        log.warning("%s: metrics lack %s's headline %s", path, data["task"], HEADLINE.get(data["task"]))
    return name, data["task"], score


def build_table(results: Sequence[tuple[str, str, float | None]], paper: bool = False) -> str:
    """Markdown: one row per model (first-seen order), one column per task (the paper's order first)."""
    rows: dict[str, dict[str, float | None]] = {}
    if paper:
        rows[PAPER["model"]] = dict(PAPER["scores"])
    for model, task, score in results:
        cells = rows.setdefault(model, {})
        if cells.get(task) is not None and score is not None:
            log.warning("%s / %s given twice: the later result (%.1f) is shown", model, task, score)
        if score is not None or task not in cells:
            cells[task] = score
    given = {task for _, task, _ in results}
    tasks = [t for t in HEADLINE if t in given] + sorted(given - set(HEADLINE))
    if paper:
        tasks = [t for t in HEADLINE if t in given or t in PAPER["scores"]] + sorted(given - set(HEADLINE))
    titles = [HEADLINE.get(t, (t,))[0] for t in tasks]
    lines = [
        "| Model | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for model, cells in rows.items():
        values = ["–" if cells.get(t) is None else f"{cells[t]:.1f}" for t in tasks]
        lines.append(f"| {model} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m llava_lightning evaluate table", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("results", nargs="+", help="results files (evaluate's results.json, or score --out)")
    p.add_argument("--model", help="row name for every file (default: each file's model)")
    p.add_argument("--paper", action="store_true", help="add LLaVA-1.5 7B's published scores as a row")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    table = build_table([read_result(f, args.model) for f in args.results], paper=args.paper)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table, encoding="utf-8")
    print(table, end="")  # noqa: T201 (CLI output)
