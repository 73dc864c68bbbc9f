"""The benchmark tasks `score` knows: name -> `Task` (its annotation files, metric and scorer).

`score(task, answers, annotations)` scores a list of LLaVA answer records (`question_id`, `text`, and
`prompt` where the task needs it) against the benchmark's official annotation file(s) and returns the
metrics dict of that task's scorer (percentages; MME in its points), always with a `coverage` entry
counting what did not match (`answers.py`). Keyword options: `questions` (a question file, for POPE
and VizWiz), `split` (ScienceQA), `subset` (score only the questions that have an answer, instead of
counting the others wrong) and `strict` (raise on any unmatched answer or question); a task refuses an
option it does not take.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .answers import ScoringError
from .gqa import score_gqa
from .mmbench import score_mmbench
from .mme import score_mme
from .pope import score_pope
from .scienceqa import score_scienceqa
from .seed import score_seed
from .vqa_accuracy import score_textvqa, score_vizwiz, score_vqav2


@dataclass(frozen=True)
class Task:
    """One benchmark's scoring."""

    name: str  # the `--task` name
    description: str  # one line: benchmark and metric
    annotations: str  # the official annotation file(s) `--annotations` names
    metric: str  # the headline metric key(s) of the result
    scorer: Callable[..., dict[str, Any]]  # (answers, annotations, **options) -> metrics
    options: tuple[str, ...] = ("subset", "strict")  # keyword options the scorer takes


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("scienceqa", "ScienceQA: option-letter accuracy, overall and IMG (LLaVA's eval_science_qa.py)",
             "problems.json with pid_splits.json beside it (or their folder)", "accuracy, img_accuracy",
             score_scienceqa, ("split", "subset", "strict")),
        Task("pope", "POPE: yes/no accuracy, precision, recall, F1, yes-ratio per split (LLaVA's eval_pope.py)",
             "folder of coco_pope_{random,popular,adversarial}.json (or one of them)", "f1 (mean over splits)",
             score_pope, ("questions", "subset", "strict")),
        Task("mme", "MME: acc and acc+ per subtask, perception and cognition totals (MME's calculation.py)",
             "MME_Benchmark_release_version folder (or a folder of SUBTASK.txt)", "perception, cognition",
             score_mme),
        Task("textvqa", "TextVQA: VQA accuracy with EvalAI answer processing (LLaVA's m4c_evaluator.py)",
             "TextVQA_0.5.1_val.json", "accuracy", score_textvqa),
        Task("vqav2", "VQAv2: VQA accuracy (vqaEval.py after LLaVA's EvalAI conversion)",
             "v2_mscoco_val2014_annotations.json", "accuracy", score_vqav2),
        Task("vizwiz", "VizWiz-VQA: VQA accuracy, unanswerable included (VizWiz vqaEval.py)",
             "val.json", "accuracy", score_vizwiz, ("questions", "subset", "strict")),
        Task("gqa", "GQA: exact-match accuracy, binary / open (GQA's eval.py after LLaVA's conversion)",
             "testdev_balanced_questions.json", "accuracy", score_gqa),
        Task("mmbench", "MMBench: circular accuracy over option rotations (MMBench's eval, no ChatGPT step)",
             "mmbench_dev_20230712.tsv", "accuracy", score_mmbench),
        Task("seed", "SEED-Bench: exact option-letter accuracy, overall / image / video / per type",
             "SEED-Bench.json", "accuracy, image_accuracy", score_seed),
    )
}  # fmt: skip


def score(task: str, answers: list[dict], annotations: str | Path, **options: Any) -> dict:
    """Score `answers` (LLaVA answer records) for `task` against its official `annotations` file(s)."""
    if task not in TASKS:
        raise ScoringError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    spec = TASKS[task]
    given = {k: v for k, v in options.items() if v is not None}
    refused = sorted(set(given) - set(spec.options))
    if refused:
        raise ScoringError(f"task {task} takes no {', '.join(refused)} (it takes {', '.join(spec.options)})")
    return {"task": task, **spec.scorer(answers, annotations, **given)}
