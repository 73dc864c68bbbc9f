"""`python -m llava_lightning evaluate`: a model's answers to a benchmark's questions, and its metric.

Questions come in LLaVA's evaluation format (`model_vqa_loader.py`): JSON lines of
`{"question_id", "text", "image" (relative to --image_root; optional), "category" (optional)}`, where
`text` already holds the benchmark's instruction suffix ("Answer the question using a single word or
phrase.", as `data_recipes/benchmarks/to_eval.py` writes it). A JSON list of LLaVA conversation records
(ScienceQA's `llava_test_CQM-A.json`, `scienceqa_to_llava.py`'s output, the synthetic shapes eval set) is
read too: the record's `id` is the question id and its first human turn, without `<image>` lines, the
text. Questions are told apart by id, MMBench's `round_id` and text (an MME image's two questions share
their id).

Each question becomes `<image>\\n{text}` in the model's conversation template (`generate`: batched, left
padded, greedy unless `--temperature`); the answers file is LLaVA's: JSON lines of `{"question_id",
"prompt", "text", "answer_id", "model_id", "metadata"}` (plus `round_id`, `options`, `option_char`,
`category` when the question has them, as MMBench's answers do). With `--annotations`, the task's
official metric (`eval/tasks.py`: `score(task, answers, annotations, **options)`, given the options the
task takes: the question file as `questions` (POPE, VizWiz), `subset` for a `--limit` or chunked run,
`--split`) goes into `results.json` with the task, model, counts, date and settings. Task
`multiple_choice` scores a file whose records carry `answer_letter` (the demo's held-out set, ScienceQA
as converted) without any annotation file. `evaluate_model` is the whole run on a loaded model: the demo
calls it too. `evaluate table RESULTS.json ...` prints the paper-style table of several runs (`table.py`).

A question whose image is missing, unreadable or outside `--image_root` is skipped and counted by
reason (`--strict` stops at the first instead). `--resume` keeps the answers already in the file and
answers only the rest. Several GPUs: run one process per GPU with `--num_chunks N --chunk_idx k` (LLaVA's
split), concatenate the answer files and score them with `python -m llava_lightning score`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.image import decode_image
from ..data.image_paths import ImagePathError, ImageRoot, record_image_paths
from ..data.prompts import prompt_of

log = logging.getLogger(__name__)

BENCHMARKS = ("vqav2", "gqa", "vizwiz", "scienceqa", "textvqa", "pope", "mme", "mmbench", "seed")
# Scored here, not by eval/tasks.py: letter accuracy on records that carry their answer.
LOCAL_TASKS = ("multiple_choice",)
# Question fields an answer carries along (LLaVA's MMBench answers; POPE's per-category scores).
CARRIED = ("round_id", "options", "option_char", "category")


class QuestionFileError(ValueError):
    """A question file that cannot be read as questions (the message names the file and record)."""


# ------------------------------------------------------------------------------------------ questions
def question_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """A LLaVA conversation record -> a question (`id` -> `question_id`, first human turn -> `text`)."""
    question = {k: v for k, v in record.items() if k not in ("id", "conversations")}
    question["question_id"] = record.get("id")
    question["text"] = prompt_of(record)
    return question


def question_key(question: dict[str, Any], text: str = "text") -> str:
    """What tells questions apart: the id, MMBench's `round_id` and the text (LLaVA's MME questions share
    their image's path as id, two questions to an image). An answer's key takes its `prompt` as text."""
    return json.dumps([question["question_id"], question.get("round_id"), question.get(text)])


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """The questions of `path`: JSON lines of questions, or a JSON list of questions or conversation
    records. Every question needs a `question_id` (unique) and a string `text`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"question file {path} does not exist (convert the benchmark first: docs/evaluation.md)"
        )
    raw = path.read_text(encoding="utf-8")
    if raw.lstrip().startswith("["):
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as e:
            raise QuestionFileError(f"{path}: not valid JSON ({e})") from None
    else:
        records = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise QuestionFileError(f"{path}:{n}: not a JSON line ({e})") from None
    questions, seen = [], set()
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise QuestionFileError(f"{path}: record {n} is a {type(record).__name__}, not an object")
        q = question_from_record(record) if "conversations" in record else record
        if q.get("question_id") is None or not isinstance(q.get("text"), str):
            raise QuestionFileError(
                f"{path}: record {n} needs a 'question_id' and a string 'text' (LLaVA's question format; "
                "or 'id' and 'conversations' for a conversation record)"
            )
        key = question_key(q)
        if key in seen:
            raise QuestionFileError(
                f"{path}: question_id {q['question_id']!r} appears twice with the same text"
            )
        seen.add(key)
        questions.append(q)
    return questions


def chunk(questions: Sequence[Any], num_chunks: int, chunk_idx: int) -> list[Any]:
    """LLaVA's `get_chunk`: the `chunk_idx`-th of `num_chunks` contiguous chunks of ceil(n / num_chunks)."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(
            f"chunk_idx must be in [0, num_chunks) with num_chunks >= 1, got {chunk_idx} of {num_chunks}"
        )
    size = max(1, math.ceil(len(questions) / num_chunks))
    return list(questions[chunk_idx * size : (chunk_idx + 1) * size])


# -------------------------------------------------------------------------------------------- answers
def _images_of(question: dict[str, Any], root: ImageRoot) -> list[Any]:
    return [decode_image(root.resolve(p)) for p in record_image_paths(question)]


def answer_questions(
    model: Any,
    questions: Sequence[dict[str, Any]],
    image_root: str | Path,
    *,
    template: str = "vicuna_v1",
    aspect: str = "pad",
    batch_size: int = 16,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    model_id: str = "model",
    strict: bool = False,
    generator: torch.Generator | None = None,
    generate_fn: Callable[..., list[str]] | None = None,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """LLaVA-format answers to `questions` (in order) and the skipped questions counted by reason.

    A question whose image cannot be had (missing, unreadable, outside `image_root`) is skipped with a
    warning naming it, or, with `strict`, raises. `on_batch` gets each batch's answers as they come
    (the CLI appends them to the answers file). `generate_fn` defaults to `inference.generate.generate`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if generate_fn is None:
        from ..inference.generate import generate as generate_fn
    root = ImageRoot(image_root)
    answers: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    for start in range(0, len(questions), batch_size):
        batch, images = [], []
        for q in questions[start : start + batch_size]:
            try:
                imgs = _images_of(q, root)
            except (FileNotFoundError, ImagePathError, OSError, ValueError) as e:
                if strict:
                    e.add_note(
                        f"(question {q['question_id']!r}; without --strict it would be skipped and counted)"
                    )
                    raise
                reason = (
                    "image missing" if isinstance(e, FileNotFoundError) else "image unreadable or refused"
                )
                skipped[reason] = skipped.get(reason, 0) + 1
                log.warning("skipping question %r: %s", q["question_id"], e)
                continue
            batch.append(q)
            images.append(imgs or None)
        if not batch:
            continue
        kwargs: dict[str, Any] = {"template": template, "max_new_tokens": max_new_tokens, "aspect": aspect}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, generator=generator)
        replies = generate_fn(model, images, [q["text"] for q in batch], **kwargs)
        if len(replies) != len(batch):
            raise RuntimeError(f"generate returned {len(replies)} replies for {len(batch)} prompts")
        new = [
            {
                "question_id": q["question_id"],
                "prompt": q["text"],
                "text": reply,
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "metadata": {},
                **{k: q[k] for k in CARRIED if k in q},
            }
            for q, reply in zip(batch, replies)
        ]
        answers += new
        if on_batch is not None:
            on_batch(new)
        log.info("evaluate: %d / %d questions", start + len(batch), len(questions))
    return answers, skipped


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """The answers of a LLaVA answers file (JSON lines); a torn last line (an interrupted run) is dropped."""
    answers = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            answers.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                log.warning("%s: dropping its torn last line (an interrupted run)", path)
                continue
            raise QuestionFileError(f"{path}:{n}: not a JSON line") from None
    return answers


# ---------------------------------------------------------------------------------------------- model
def load_model(
    ckpt_path: str | None = None,
    pretrained: str | None = None,
    preset: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, str, str, str]:
    """`(LlavaModel in eval mode, template, image aspect, model id)` from exactly one of a Lightning
    checkpoint (a .ckpt file or a sharded checkpoint folder, consolidated as `export` does), a llava-hf
    folder or hub name, or a preset (random init: smoke tests); `inference/load.py` does the loading."""
    from ..inference.load import load_for_inference, model_id_of

    model, template, aspect = load_for_inference(
        ckpt_path, pretrained, preset, trust_remote_code=trust_remote_code
    )
    return model, template, aspect, model_id_of(ckpt_path, pretrained, preset)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# ------------------------------------------------------------------------------------------- scoring
def score(
    task: str,
    answers: list[dict[str, Any]],
    annotations: str | Path | None,
    questions: list[dict[str, Any]] | None = None,
    *,
    questions_file: str | Path | None = None,
    partial: bool = False,
    group_by: str | None = None,
    split: str | None = None,
) -> dict:
    """The task's metrics: `multiple_choice` here (letter accuracy against the `answer_letter` of the
    annotations' records, else of `questions`; `group_by` a field to break it down by), any other task by
    `eval/tasks.py`'s `score` (imported only now). That one gets the options its task takes
    (`TASKS[task].options`): the question file (`questions`: POPE's splits and VizWiz's images come from
    it), `subset` when `partial` (a `--limit` or chunked run: score the questions answered, not the
    others as wrong), and `split` (ScienceQA)."""
    if task == "multiple_choice":
        from .multiple_choice import score_letters

        records = questions if annotations is None else load_questions(annotations)
        result = score_letters(answers, records or [], group_by)
        result.pop("predictions")
        return result
    if annotations is None:
        raise ValueError(f"task {task!r} needs --annotations to be scored")
    from . import tasks

    spec = getattr(tasks, "TASKS", {}).get(task)
    takes = set(getattr(spec, "options", ()))
    if split is not None and "split" not in takes:
        raise ValueError(f"task {task!r} takes no --split")
    if partial and "subset" not in takes:
        log.warning("%s: scoring a partial run; the questions not asked count as wrong", task)
    wanted = {"questions": questions_file, "subset": True if partial else None, "split": split}
    options = {k: v for k, v in wanted.items() if v is not None and k in takes}
    return tasks.score(task, answers, annotations, **options)


def evaluate_model(
    model: Any,
    questions: Sequence[dict[str, Any]],
    image_root: str | Path,
    out: str | Path,
    *,
    task: str,
    model_id: str,
    template: str,
    aspect: str,
    annotations: str | Path | None = None,
    questions_file: str | Path | None = None,
    partial: bool = False,
    group_by: str | None = None,
    split: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    strict: bool = False,
    resume: bool = False,
    suffix: str = "",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Answer `questions` with a loaded `model` into `out/answers{suffix}.jsonl` (appended batch by batch;
    with `resume`, the answers already there are kept and their questions not asked again), score them
    when there are annotations (or the task is local) and write `out/results{suffix}.json`: `task`,
    `model`, `metrics`, `counts` (questions, answered, skipped by reason), `date`, `answers_file` and
    `settings`. The `evaluate` command and the demo's held-out evaluation both run this."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    answers_file = out / f"answers{suffix}.jsonl"
    previous: list[dict[str, Any]] = []
    if resume and answers_file.exists():
        previous = read_answers(answers_file)
        done = {question_key(a, "prompt") for a in previous}
        questions_left = [q for q in questions if question_key(q) not in done]
        log.info(
            "resume: %d answers in %s, %d questions left", len(previous), answers_file, len(questions_left)
        )
    else:
        questions_left = list(questions)
    # Rewritten whole (a torn last line from an interrupted run is gone), then appended batch by batch.
    answers_file.write_text("".join(json.dumps(a) + "\n" for a in previous), encoding="utf-8")
    with answers_file.open("a", encoding="utf-8") as f:

        def write(batch: list[dict[str, Any]]) -> None:
            f.writelines(json.dumps(a) + "\n" for a in batch)
            f.flush()

        new, skipped = answer_questions(
            model,
            questions_left,
            image_root,
            template=template,
            aspect=aspect,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            model_id=model_id,
            strict=strict,
            generator=generator,
            on_batch=write,
        )
    answers = previous + new
    results: dict[str, Any] = {
        "task": task,
        "model": model_id,
        "metrics": None,
        "counts": {"questions": len(questions), "answered": len(answers), "skipped": skipped},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "answers_file": str(answers_file),
        "settings": {
            "questions": None if questions_file is None else str(questions_file),
            "image_root": str(image_root),
            "annotations": None if annotations is None else str(annotations),
            "template": template,
            "image_aspect": aspect,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            **(settings or {}),
        },
    }
    if annotations is not None or task in LOCAL_TASKS:
        results["metrics"] = score(
            task,
            answers,
            annotations,
            list(questions),
            questions_file=questions_file,
            partial=partial,
            group_by=group_by,
            split=split,
        )
    (out / f"results{suffix}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


# ------------------------------------------------------------------------------------------------ CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llava_lightning evaluate",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="python -m llava_lightning evaluate table RESULTS.json ...: the markdown table of several runs",
    )
    p.add_argument("--task", required=True, help=f"benchmark ({', '.join(BENCHMARKS)}) or multiple_choice")
    p.add_argument(
        "--questions", required=True, help="question file: LLaVA eval JSON lines, or a JSON list of records"
    )
    p.add_argument(
        "--image_root",
        default=None,
        help="folder the questions' `image` paths are relative to (default: the question file's folder)",
    )
    p.add_argument(
        "--annotations",
        default=None,
        help="the benchmark's answers (file or folder) to score against; none: answers only",
    )
    model = p.add_argument_group("model (exactly one)")
    model.add_argument(
        "--ckpt_path", help="Lightning checkpoint: .ckpt file or sharded checkpoint folder (any strategy)"
    )
    model.add_argument("--pretrained", help="llava-hf folder (our `export`, or a released model's)")
    model.add_argument("--preset", help="random-init preset (tiny: smoke tests only)")
    model.add_argument(
        "--trust_remote_code", action="store_true", help="let transformers run code the model's files name"
    )
    model.add_argument("--template", help="conversation template (default: the model's)")
    model.add_argument(
        "--image_aspect", choices=["square", "pad"], help="image handling (default: the model's)"
    )
    model.add_argument(
        "--model_id", help="name in the answers and results (default: from the checkpoint or folder)"
    )
    gen = p.add_argument_group("generation")
    gen.add_argument("--batch_size", type=int, default=16)
    gen.add_argument("--max_new_tokens", type=int, default=128, help="LLaVA's default 128")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (LLaVA-1.5's evaluation)")
    gen.add_argument("--top_p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    gen.add_argument("--device", default="auto", help="cuda, cuda:1, cpu; auto: cuda when there is one")
    gen.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="auto: bf16 on a GPU, fp32 on a CPU",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--out",
        default=None,
        help="folder for answers.jsonl and results.json (default outputs/eval/TASK/MODEL_ID)",
    )
    run.add_argument("--limit", type=int, default=None, help="only the first N questions (a quick look)")
    run.add_argument(
        "--num_chunks", type=int, default=1, help="split the questions into N chunks (one process per GPU)"
    )
    run.add_argument("--chunk_idx", type=int, default=0, help="the chunk this process answers")
    run.add_argument(
        "--resume", action="store_true", help="keep the answers already in the answers file; answer the rest"
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="stop at a question whose image is missing instead of skipping it",
    )
    scoring = p.add_argument_group("scoring")
    scoring.add_argument("--split", help="scienceqa: the pid_splits.json split to score (default test)")
    scoring.add_argument("--group_by", help="multiple_choice: a question field to break the accuracy down by")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Answer, write, score; returns the results (also written to `results.json`)."""
    if args.task not in BENCHMARKS + LOCAL_TASKS:
        raise ValueError(f"unknown task {args.task!r}; one of {', '.join(BENCHMARKS + LOCAL_TASKS)}")
    questions_path = Path(args.questions)
    questions = load_questions(questions_path)
    questions = chunk(questions, args.num_chunks, args.chunk_idx)
    if args.limit is not None:
        questions = questions[: args.limit]
    image_root = Path(args.image_root) if args.image_root else questions_path.parent
    if not image_root.is_dir():
        raise FileNotFoundError(f"image root {image_root} is not a folder (--image_root)")
    if args.annotations and not Path(args.annotations).exists():
        raise FileNotFoundError(f"annotations {args.annotations} do not exist (--annotations)")

    model, template, aspect, model_id = load_model(
        args.ckpt_path, args.pretrained, args.preset, args.trust_remote_code
    )
    template, aspect = args.template or template, args.image_aspect or aspect
    model_id = args.model_id or model_id
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = _dtype(args.dtype, device)
    model.to(device=device, dtype=dtype)

    out = Path(args.out) if args.out else Path("outputs/eval") / args.task / model_id
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if device.type == "cuda" and dtype != torch.float32
        else contextlib.nullcontext()
    )
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.temperature > 0 else None
    with torch.inference_mode(), autocast:
        results = evaluate_model(
            model,
            questions,
            image_root,
            out,
            task=args.task,
            model_id=model_id,
            template=template,
            aspect=aspect,
            annotations=args.annotations,
            questions_file=questions_path,
            partial=args.limit is not None or args.num_chunks > 1,
            group_by=args.group_by,
            split=args.split,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            generator=generator,
            strict=args.strict,
            resume=args.resume,
            suffix=f".{args.chunk_idx}_of_{args.num_chunks}" if args.num_chunks > 1 else "",
            settings={
                "ckpt_path": args.ckpt_path,
                "pretrained": args.pretrained,
                "preset": args.preset,
                "dtype": str(dtype).removeprefix("torch."),
                "device": str(device),
                "seed": args.seed,
                "limit": args.limit,
                "num_chunks": args.num_chunks,
                "chunk_idx": args.chunk_idx,
            },
        )
    return results


def main(argv: list[str] | None = None) -> None:
    """`python -m llava_lightning evaluate ...` (see the module docstring and docs/evaluation.md);
    `evaluate table RESULTS.json ...` prints the markdown table of several results (`table.py`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        from . import table

        table.main(argv[1:])
        return
    args = parser().parse_args(argv)
    results = run(args)
    counts = results["counts"]
    print(  # noqa: T201 (CLI output)
        f"{results['task']}: {counts['answered']} answers of {counts['questions']} questions "
        f"({sum(counts['skipped'].values())} skipped) -> {results['answers_file']}"
    )
    if results["metrics"] is not None:
        print(json.dumps(results["metrics"], indent=2))  # noqa: T201
