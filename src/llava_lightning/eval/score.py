"""`python -m llava_lightning score --task TASK --answers ANSWERS.jsonl --annotations FILE`: score an answer
file against a benchmark's official annotations and print the metrics as JSON (`tasks.py` lists the
tasks). Unparsable lines and answers that match no question are counted in the result's `coverage` and
named in its `examples` (and in a warning); `--strict` makes any of them an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .answers import ScoringError, load_answers
from .tasks import TASKS, score

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    tasks = "\n".join(
        f"  {t.name:<10} {t.description}\n  {'':<10} --annotations {t.annotations}" for t in TASKS.values()
    )
    parser = argparse.ArgumentParser(
        prog="python -m llava_lightning score",
        description="Score a LLaVA answer file (JSON lines: question_id, prompt, text) against a benchmark's "
        "official annotations; prints the metrics as JSON.",
        epilog="tasks:\n" + tasks,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", required=True, choices=list(TASKS), help="benchmark to score")
    parser.add_argument("--answers", required=True, help="answer file (JSON lines, LLaVA's answer format)")
    parser.add_argument(
        "--annotations", required=True, help="the benchmark's official annotation file or folder"
    )
    parser.add_argument(
        "--questions",
        help="pope: LLaVA's question file (llava_pope_test.jsonl) giving each answer's split, image and question; "
        "vizwiz: a question file mapping question_id to image",
    )
    parser.add_argument("--split", help="scienceqa: the pid_splits.json split to score (default test)")
    parser.add_argument(
        "--subset",
        action="store_true",
        help="score only the questions the answer file answers (a partial run); by default every annotated "
        "question counts and a missing answer is wrong",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on any bad line, unknown, duplicate or missing answer"
    )
    parser.add_argument("--out", help="also write the metrics JSON to this file")
    return parser


def main(argv: list[str]) -> None:
    """Parse `argv`, score, print the metrics JSON on stdout; a `ScoringError` exits with its message."""
    args = build_parser().parse_args(argv)
    options = {"questions": args.questions, "split": args.split, "strict": args.strict or None}
    if args.subset:
        options["subset"] = True
    try:
        answers, bad_lines = load_answers(args.answers, strict=args.strict)
        result = score(args.task, answers, args.annotations, **options)
    except ScoringError as e:
        sys.stderr.write(f"score: {e}\n")
        raise SystemExit(2) from e
    coverage = result["coverage"]
    if bad_lines:
        coverage["bad_lines"] = len(bad_lines)
        coverage["examples"]["bad_lines"] = bad_lines[:5]
    problems = {k: v for k, v in coverage.items() if k not in ("answers", "scored", "examples") and v}
    if problems:
        log.warning(
            "%s: %s; first: %s",
            args.answers,
            ", ".join(f"{v} {k}" for k, v in problems.items()),
            "; ".join(m for ms in coverage["examples"].values() for m in ms[:1]),
        )
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
