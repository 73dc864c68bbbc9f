"""Benchmark releases -> LLaVA's evaluation question files, which `python -m llava_lightning evaluate` reads.

One subcommand per benchmark; each reads the official release (annotation files, image folders) and
writes JSON lines `{"question_id", "image", "text", ...}`, `image` relative to the image folder given
to `evaluate --image_root`, `text` the question with LLaVA-1.5's answer-format prompt (`common.py`), as
LLaVA's own question files (`llava_textvqa_val_v051_ocr.jsonl`, `llava_pope_test.jsonl`, ...) have it.
A record that cannot be converted (a field missing, an image path leaving the root, a line that is not
JSON) is skipped, counted by reason and named in a warning; the summary line gives the counts. Layouts
and the matching `evaluate` lines: docs/evaluation.md, "Benchmarks: layout and conversion".

    python data_recipes/benchmarks/to_eval.py textvqa --questions TextVQA_0.5.1_val.json \\
        [--ocr TextVQA_Rosetta_OCR_v0.2_val.json] --image_root train_images --out textvqa/questions.jsonl
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `data_recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_recipes.benchmarks.common import (
    OPTION_LETTER,
    SHORT_ANSWER,
    UNANSWERABLE,
    Skips,
    check_images,
    each,
    read_json,
    read_json_lines,
    relative_image,
    with_options,
    write_questions,
)

log = logging.getLogger("data_recipes.benchmarks")

MMBENCH_LETTERS = "ABCD"  # LLaVA's model_vqa_mmbench.py `all_options`


def _records(data: Any, key: str, path: Any, what: str) -> list[Any]:
    records = data.get(key) if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"{what} {path}: expected an object with a {key!r} list")
    return records


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field!r} is not a non-empty string")
    return value


def scienceqa(
    problems: str | Path, pid_splits: str | Path, split: str = "test", skips: Skips | None = None
) -> list[dict[str, Any]]:
    """ScienceQA `problems.json` + `pid_splits.json` -> the `split`'s questions in LLaVA-1.5's layout
    (`scienceqa_to_llava.py`'s prompt: [Context: hint\\n]question\\nA. ..\\n + the letter prompt), with
    `answer_letter` and `options` kept (the `multiple_choice` task scores them without annotations).
    Images: `{split}/{pid}/image.png` under ScienceQA's `images/`. The id is the pid."""
    from data_recipes.scienceqa_to_llava import convert_split

    skips = skips if skips is not None else Skips()
    data = read_json(problems, "ScienceQA problems file")
    splits = read_json(pid_splits, "ScienceQA split file")
    if not isinstance(data, dict) or not isinstance(splits, dict) or split not in splits:
        raise ValueError(
            f"{problems} / {pid_splits}: expected {{pid: problem}} and {{split: [pid, ...]}} with a {split!r} split"
        )
    records, counts = convert_split(data, splits[split], split)
    for reason in ("unknown_pid", "malformed"):  # named by convert_split's own warnings
        for _ in range(counts[reason]):
            skips.add(f"{problems}: split {split}", f"bad record: {reason}")
    out = []
    for r in records:
        q = {"question_id": r["id"], "text": r["conversations"][0]["value"].removeprefix("<image>\n")}
        if "image" in r:
            q["image"] = r["image"]
        out.append({**q, "answer_letter": r["answer_letter"], "options": r["options"]})
    return out


def textvqa(
    questions: str | Path, ocr: str | Path | None = None, skips: Skips | None = None
) -> list[dict[str, Any]]:
    """TextVQA_0.5.1_val.json (+ the Rosetta OCR file: LLaVA-1.5's `llava_textvqa_val_v051_ocr.jsonl`
    puts "Reference OCR token: ..." after the question). Images: `train_images/{image_id}.jpg`."""
    skips = skips if skips is not None else Skips()
    data = _records(read_json(questions, "TextVQA questions"), "data", questions, "TextVQA questions")
    tokens: dict[str, list[str]] = {}
    if ocr is not None:
        ocr_records = _records(read_json(ocr, "TextVQA OCR file"), "data", ocr, "TextVQA OCR file")
        for r in each(ocr_records, str(ocr), skips, lambda r: r):
            tokens[str(r.get("image_id"))] = [str(t) for t in r.get("ocr_tokens") or []]

    def build(r: dict[str, Any]) -> dict[str, Any]:
        lines = [_text(r["question"], "question")]
        if tokens.get(str(r["image_id"])):
            lines.append("Reference OCR token: " + ", ".join(tokens[str(r["image_id"])]))
        image = relative_image(f"{r['image_id']}.jpg")
        return {"question_id": r["question_id"], "image": image, "text": "\n".join([*lines, SHORT_ANSWER])}

    return list(each(data, str(questions), skips, build))


def vqav2(questions: str | Path, image_folder: str = "", skips: Skips | None = None) -> list[dict[str, Any]]:
    """v2_OpenEnded_mscoco_{val2014,test-dev2015,test2015}_questions.json. Images: COCO's
    `COCO_{folder}_{image_id:012d}.jpg`, `image_folder` (val2014 / test2015) read from the file's
    `data_subtype` unless given (test-dev images live in test2015)."""
    skips = skips if skips is not None else Skips()
    data = read_json(questions, "VQAv2 questions")
    records = _records(data, "questions", questions, "VQAv2 questions")
    folder = image_folder or str(data.get("data_subtype", "")).replace("test-dev", "test")
    if not folder:
        raise ValueError(f"{questions}: no data_subtype; pass --image_folder (val2014 or test2015)")

    def build(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "question_id": r["question_id"],
            "image": f"COCO_{folder}_{int(r['image_id']):012d}.jpg",
            "text": f"{_text(r['question'], 'question')}\n{SHORT_ANSWER}",
        }

    return list(each(records, str(questions), skips, build))


def vizwiz(questions: str | Path, skips: Skips | None = None) -> list[dict[str, Any]]:
    """VizWiz val.json / test.json (a list of `{"image", "question", ...}`); the image name is the id
    (VizWiz has no question ids; the scorer matches by image name). Images: `val/` or `test/`."""
    skips = skips if skips is not None else Skips()
    records = read_json(questions, "VizWiz annotations")
    if not isinstance(records, list):
        raise ValueError(f"VizWiz annotations {questions}: expected a JSON list")

    def build(r: dict[str, Any]) -> dict[str, Any]:
        image = relative_image(r["image"])
        return {
            "question_id": image,
            "image": image,
            "text": f"{_text(r['question'], 'question')}\n{UNANSWERABLE}\n{SHORT_ANSWER}",
        }

    return list(each(records, str(questions), skips, build))


def pope(
    label_dir: str | Path,
    splits: tuple[str, ...] = ("adversarial", "popular", "random"),
    skips: Skips | None = None,
) -> list[dict[str, Any]]:
    """POPE's `coco_pope_{split}.json` label files (JSON lines `{"question_id", "image", "text", "label"}`,
    numbered from 1 per split) -> one question file, numbered 1.. over the splits, each question with its
    split as `category` (LLaVA's `llava_pope_test.jsonl`; the scorer, given this file as `questions`,
    finds each answer's label by split, image and question). Images: COCO `val2014/`."""
    skips = skips if skips is not None else Skips()
    out: list[dict[str, Any]] = []
    for split in splits:
        path = Path(label_dir) / f"coco_pope_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"POPE label file {path} does not exist (--splits names the ones to convert)"
            )

        def build(r: dict[str, Any], split: str = split) -> dict[str, Any]:
            text = _text(r["text"], "text")
            return {
                "question_id": len(out) + 1,
                "image": relative_image(r["image"]),
                "text": f"{text}\n{SHORT_ANSWER}",
                "category": split,
            }

        for q in each(read_json_lines(path, "POPE label file", skips), str(path), skips, build):
            out.append(q)
    return out


def _inside(path: Path, real_root: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def mme(release: str | Path, skips: Skips | None = None) -> list[dict[str, Any]]:
    """MME_Benchmark_release_version: per subtask either `images/` + `questions_answers_YN/IMAGE.txt` or
    `IMAGE.txt` beside the images; lines `question\\tanswer`. The id is the image's path in the release
    (LLaVA's `llava_mme.jsonl`: an image's two questions share it), `category` the subtask. A question
    file without an image, a line without a tab, or a file that links out of the release is skipped."""
    skips = skips if skips is not None else Skips()
    root = Path(release)
    if not root.is_dir():
        raise FileNotFoundError(f"MME release folder {root} does not exist")
    real_root = os.path.realpath(root)
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not _inside(sub, real_root):
            skips.add(str(sub), "outside the root: a link out of the release folder")
            continue
        qa_dir, img_dir = (
            (sub / "questions_answers_YN", sub / "images")
            if (sub / "questions_answers_YN").is_dir()
            else (sub, sub)
        )
        for txt in sorted(qa_dir.glob("*.txt")):
            if not _inside(txt, real_root):
                skips.add(str(txt), "outside the root: a link out of the release folder")
                continue
            images = [
                p
                for p in sorted(img_dir.glob(txt.stem + ".*"))
                if p.suffix.lower() in (".jpg", ".jpeg", ".png") and _inside(p, real_root)
            ]
            if not images:
                skips.add(str(txt), "no image: no IMAGE.jpg/png beside its questions")
                continue
            rel = images[0].relative_to(root).as_posix()
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                if "\t" not in line or not line.split("\t")[0].strip():
                    skips.add(f"{txt}:{n}", "bad record: expected question<TAB>answer")
                    continue
                question = line.split("\t")[0].strip()
                out.append(
                    {
                        "question_id": rel,
                        "image": rel,
                        "text": f"{question}\n{SHORT_ANSWER}",
                        "category": sub.name,
                    }
                )
    if not out:
        raise ValueError(f"{root}: no MME subtask folders with question files found")
    return out


def gqa(questions: str | Path, skips: Skips | None = None) -> list[dict[str, Any]]:
    """GQA testdev_balanced_questions.json (`{qid: {"imageId", "question", ...}}`). Images: `images/{imageId}.jpg`."""
    skips = skips if skips is not None else Skips()
    data = read_json(questions, "GQA questions")
    if not isinstance(data, dict):
        raise ValueError(f"GQA questions {questions}: expected an object keyed by question id")

    def build(item: dict[str, Any]) -> dict[str, Any]:
        qid, r = item["qid"], item["record"]
        return {
            "question_id": qid,
            "image": relative_image(f"{r['imageId']}.jpg"),
            "text": f"{_text(r['question'], 'question')}\n{SHORT_ANSWER}",
        }

    return list(each([{"qid": k, "record": v} for k, v in data.items()], str(questions), skips, build))


def _none(value: Any) -> bool:
    """LLaVA's `is_none`: empty, NaN, 'nan' and 'none' are no value (pandas reads empty cells as NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def mmbench(
    tsv: str | Path, image_dir: str | Path, all_rounds: bool = False, skips: Skips | None = None
) -> list[dict[str, Any]]:
    """MMBench TSV (`index, question, hint, A..D, answer, category, image` (base64), ...) -> questions, the
    images decoded into `image_dir/{index}.{ext}` (give `evaluate --image_root` the folder above it). The
    prompt is `model_vqa_mmbench.py`'s: [hint\\n]question\\nA. ..\\n... + the letter prompt; `options` and
    `option_char` ride along. Every row is a question, the TSV's circular copies (index + k * 1e6, the
    options already rotated) included. `all_rounds`: LLaVA's `--all-rounds`, one question per left
    rotation of the options (`round_id` 0..n-1), as the h-score MMBench scorer's circular check reads
    them; without it every question is round 0."""
    from PIL import Image

    skips = skips if skips is not None else Skips()
    path, image_dir = Path(tsv), Path(image_dir)
    if not path.is_file():
        raise FileNotFoundError(f"MMBench TSV {path} does not exist")
    image_dir.mkdir(parents=True, exist_ok=True)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and not {"index", "question", "image", "A"} <= set(rows[0]):
        raise ValueError(f"{path}: expected MMBench's columns index, question, hint, A..D, image")
    out: list[dict[str, Any]] = []

    def build(row: dict[str, Any]) -> None:
        try:
            index = int(row["index"])  # also the image's file name: an integer, nothing else
        except (TypeError, ValueError):
            raise ValueError(f"index {row['index']!r} is not an integer") from None
        options = []
        for c in MMBENCH_LETTERS:
            if _none(row.get(c)):
                break
            options.append(row[c])
        if not options:
            raise ValueError("no options")
        try:
            raw = base64.b64decode(row["image"] or "", validate=True)
            fmt = (Image.open(io.BytesIO(raw)).format or "png").lower()
        except (binascii.Error, OSError) as e:
            raise ValueError(f"image is not a base64 image ({e})") from None
        image = image_dir / f"{index}.{'jpg' if fmt == 'jpeg' else fmt}"
        image.write_bytes(raw)
        question = _text(row["question"], "question")
        question = question if _none(row.get("hint")) else f"{row['hint']}\n{question}"
        for round_id in range(len(options) if all_rounds else 1):
            rotated = options[round_id:] + options[:round_id]
            out.append(
                {
                    "question_id": index,
                    "round_id": round_id,
                    "image": f"{image_dir.name}/{image.name}",
                    "text": f"{with_options(question, rotated)}\n{OPTION_LETTER}",
                    "options": rotated,
                    "option_char": list(MMBENCH_LETTERS[: len(rotated)]),
                    "category": row.get("category") or "",
                }
            )
        return None

    list(each(rows, f"{path} (data rows from 0)", skips, build))
    return out


def seed(questions: str | Path, skips: Skips | None = None) -> list[dict[str, Any]]:
    """SEED-Bench.json, image questions only (`data_type` image; the video ones are left out, counted
    in a log line). Images: `SEED-Bench-image/{data_id}` (give `evaluate --image_root` the folder above
    it). `category`: the question type's name."""
    skips = skips if skips is not None else Skips()
    data = read_json(questions, "SEED-Bench questions")
    records = _records(data, "questions", questions, "SEED-Bench questions")
    names = {v: k for k, v in (data.get("question_type") or {}).items()}

    def build(r: dict[str, Any]) -> dict[str, Any] | None:
        if r.get("data_type", "image") != "image":
            return None
        options = [_text(r[f"choice_{c}"], f"choice_{c}") for c in "abcd"]
        return {
            "question_id": r["question_id"],
            "image": relative_image(f"SEED-Bench-image/{r['data_id']}"),
            "text": f"{with_options(_text(r['question'], 'question'), options)}\n{OPTION_LETTER}",
            "category": names.get(r.get("question_type_id"), str(r.get("question_type_id"))),
        }

    out = list(each(records, str(questions), skips, build))
    video = sum(isinstance(r, dict) and r.get("data_type", "image") != "image" for r in records)
    if video:
        log.info("SEED-Bench: %d video questions left out (image questions only)", video)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="benchmark", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--out", required=True, help="question file to write (JSON lines)")
        c.add_argument(
            "--image_root",
            help="check that each question's image is there (the folder for evaluate --image_root)",
        )
        return c

    c = command("scienceqa", "ScienceQA problems.json + pid_splits.json -> questions (SQA-IMG: test)")
    c.add_argument("--problems", required=True)
    c.add_argument("--pid_splits", required=True)
    c.add_argument("--split", default="test")
    c = command("textvqa", "TextVQA_0.5.1_val.json [+ Rosetta OCR] -> questions")
    c.add_argument("--questions", required=True)
    c.add_argument("--ocr", help="TextVQA_Rosetta_OCR_v0.2_val.json (LLaVA-1.5's reported setting)")
    c = command("vqav2", "v2_OpenEnded_mscoco_*_questions.json -> questions")
    c.add_argument("--questions", required=True)
    c.add_argument(
        "--image_folder", default="", help="val2014 or test2015 (default: from the file's data_subtype)"
    )
    c = command("vizwiz", "VizWiz val.json / test.json -> questions")
    c.add_argument("--questions", required=True)
    c = command("pope", "POPE coco_pope_{adversarial,popular,random}.json -> questions")
    c.add_argument("--labels", required=True, help="folder of the coco_pope_*.json label files")
    c.add_argument("--splits", nargs="+", default=["adversarial", "popular", "random"])
    c = command("mme", "MME_Benchmark_release_version -> questions")
    c.add_argument("--release", required=True)
    c = command("gqa", "GQA testdev_balanced_questions.json -> questions")
    c.add_argument("--questions", required=True)
    c = command("mmbench", "MMBench TSV (base64 images) -> questions + image folder")
    c.add_argument("--tsv", required=True)
    c.add_argument("--image_dir", required=True, help="folder to decode the images into")
    c.add_argument("--all_rounds", action="store_true", help="one question per rotation of the options")
    c = command("seed", "SEED-Bench.json (image questions) -> questions")
    c.add_argument("--questions", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    b, skips = args.benchmark, Skips()
    if b == "scienceqa":
        questions = scienceqa(args.problems, args.pid_splits, args.split, skips)
    elif b == "textvqa":
        questions = textvqa(args.questions, args.ocr, skips)
    elif b == "vqav2":
        questions = vqav2(args.questions, args.image_folder, skips)
    elif b == "pope":
        questions = pope(args.labels, tuple(args.splits), skips)
    elif b == "mme":
        questions = mme(args.release, skips)
    elif b == "mmbench":
        questions = mmbench(args.tsv, args.image_dir, args.all_rounds, skips)
    else:
        questions = {"vizwiz": vizwiz, "gqa": gqa, "seed": seed}[b](args.questions, skips)
    n = write_questions(questions, args.out)
    unreadable = check_images(questions, args.image_root)
    print(  # noqa: T201 (CLI output)
        f"{b}: {n} questions -> {args.out}; skipped records: {skips.summary()}"
        + (f"; images not readable: {unreadable}" if unreadable else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
