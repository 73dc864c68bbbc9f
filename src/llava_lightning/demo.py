"""`make demo`: the embedded default, end to end on a CPU, through the same CLI and configs as a real run.

1. Generate the synthetic shapes data once (`python -m llava_lightning.data.synthetic`).
2. Stage 1: `fit -c conf/stage1.yaml -c conf/tiny.yaml` (plain captions, projector only).
3. Stage 2: `fit -c conf/stage2.yaml -c conf/tiny.yaml --model.init_projector <stage-1 artifact>`
   (vicuna_v1 instructions + multiple-choice questions; projector + LLM).
4. Evaluate the held-out multiple-choice set (ScienceQA-style prompt, greedy decoding, answer letter
   parsed) through the `evaluate` command's path (`eval/evaluate.py`'s `evaluate_model`: LLaVA-format
   answers and a results.json per set and model under `outputs/demo/eval/`, and their `table.md`)
   with the model before stage 2 and after it, next to chance, twice over the same images
   and questions: options in each question type's fixed order (the target), and shuffled (option
   matching, which a tiny LLM trained from scratch for minutes lacks); ask for a free-form description
   of every one-shape held-out image and count those naming its colour and shape
   (`eval/descriptions.py`); save a PNG grid of images with their generated descriptions. Curves go to TensorBoard (`tensorboard --logdir outputs/demo`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("llava_lightning.demo")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)  # noqa: T201 (the demo's own progress lines)


def _fit(args: list[str], threads: int | None) -> None:
    """One training stage through `python -m llava_lightning fit` (a fresh process, as a user runs it)."""
    cmd = [sys.executable, "-m", "llava_lightning", "fit", *args]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    _say("running: " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def _data_is_current(data: Path) -> bool:
    """Data made by this checkout's generator (same format version) is reused; anything else is remade."""
    from .data.synthetic import FORMAT_VERSION

    manifest = data / "MANIFEST.json"
    if not manifest.exists():
        return False
    return json.loads(manifest.read_text()).get("format_version") == FORMAT_VERSION


def _latest(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} under {root}")
    return found[-1]


def _load(ckpt: Path):
    from .module import LlavaLitModule

    return LlavaLitModule.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True).model.eval()


def _grid(model, records: list[dict], image_root: Path, out: Path) -> None:
    """A PNG of a few eval images with the model's description of each."""
    from PIL import Image, ImageDraw

    from .inference.generate import generate

    images = [Image.open(image_root / r["image"]).convert("RGB") for r in records]
    replies = generate(model, images, ["Describe the image briefly."] * len(images), max_new_tokens=24)
    cell, text_h = 192, 56
    grid = Image.new("RGB", (cell * len(images), cell + text_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, reply) in enumerate(zip(images, replies)):
        grid.paste(img.resize((cell, cell)), (i * cell, 0))
        words, lines, line = reply.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > 30:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        draw.multiline_text((i * cell + 4, cell + 4), "\n".join(lines[:3]), fill="black")
    grid.save(out)


def held_out_multiple_choice(models: dict, eval_root: Path, out: Path) -> dict[str, dict[str, dict]]:
    """Each model (`{"before": ..., "after": ...}`) on each held-out multiple-choice file, through the
    `evaluate` command's path (`evaluate_model`, task multiple_choice, its settings as before: greedy,
    8 new tokens, batches of 16, vicuna_v1, pad): answers in LLaVA's format and a results.json under
    `out/{order}-{when}/`, and `out/table.md` (`evaluate table`) of them all. Returns the metrics by
    order (fixed / shuffled) and model."""
    import torch

    from .data.synthetic import EVAL_FILES
    from .eval.evaluate import evaluate_model, load_questions
    from .eval.table import build_table, read_result

    scores: dict[str, dict[str, dict]] = {}
    rows = []
    with torch.inference_mode():
        for order, name in EVAL_FILES.items():
            questions = load_questions(eval_root / name)
            for when, model in models.items():
                run = evaluate_model(
                    model,
                    questions,
                    eval_root,
                    out / f"{order}-{when}",
                    task="multiple_choice",
                    model_id=f"demo-{when}-stage2",
                    template="vicuna_v1",
                    aspect="pad",
                    questions_file=eval_root / name,
                    group_by="question_type",
                    batch_size=16,
                    max_new_tokens=8,
                    strict=True,
                )
                scores.setdefault(order, {})[when] = run["metrics"]
                row = f"{when} stage 2, {order} options"
                rows.append(read_result(out / f"{order}-{when}" / "results.json", model=row))
    (out / "table.md").write_text(build_table(rows), encoding="utf-8")
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes", help="where the synthetic data lives (made once)")
    parser.add_argument("--out", default="outputs/demo", help="run folder (logs, checkpoints, results)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1-epochs", type=int, default=1)
    parser.add_argument("--stage2-epochs", type=int, default=3)
    # Two threads halve a step on an idle 2-core machine, but threaded torch slows down several-fold
    # when another process wants a core: --threads 1 on a busy machine (docs/experiments.md).
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads of every process (OMP_NUM_THREADS; default torch's)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)  # the evaluation here, as in the training processes
    start = time.perf_counter()
    data, out = REPO / args.data, REPO / args.out
    if not _data_is_current(data):
        _say(f"generating the synthetic shapes data into {data}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "llava_lightning.data.synthetic",
                "--out",
                str(data),
                "--seed",
                str(args.seed),
            ],
            check=True,
            cwd=REPO,
        )
    else:
        _say(f"using the synthetic data in {data}")
    common = [
        "-c", "conf/tiny.yaml",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.default_root_dir={out}",
        f"--seed_everything={args.seed}",
    ]  # fmt: skip
    _fit(["-c", "conf/stage1.yaml", *common, "--trainer.logger.init_args.name=stage1",
          f"--trainer.max_epochs={args.stage1_epochs}"], args.threads)  # fmt: skip
    stage1_dir = _latest("stage1/version_*", out)
    projector = stage1_dir / "projector.safetensors"
    _say(f"stage 1 done: projector artifact {projector}")
    _fit(["-c", "conf/stage2.yaml", *common, "--trainer.logger.init_args.name=stage2",
          f"--trainer.max_epochs={args.stage2_epochs}", f"--model.init_projector={projector}"], args.threads)  # fmt: skip
    stage2_dir = _latest("stage2/version_*", out)

    from .data.synthetic import COLOURS, SHAPES
    from .data.synthetic import EVAL_FILES as eval_files
    from .eval.descriptions import evaluate_descriptions

    eval_root = data / "eval"
    _say("evaluating the held-out multiple-choice sets (greedy, answer letter parsed)")
    models = {
        "before": _load(_latest("checkpoints/last*.ckpt", stage1_dir)),
        "after": _load(_latest("checkpoints/last*.ckpt", stage2_dir)),
    }
    scores = held_out_multiple_choice(models, eval_root, out / "eval")
    fixed_records = json.loads((eval_root / eval_files["fixed"]).read_text())
    _say("describing the held-out one-shape images (greedy): right colour and shape named?")
    described = evaluate_descriptions(models["after"], fixed_records, eval_root, tuple(COLOURS), SHAPES)
    grid = out / "samples.png"
    _grid(models["after"], fixed_records[:6], eval_root, grid)
    results = {
        order: {
            "n": s["after"]["n"],
            "chance": s["after"]["chance"],
            "accuracy_before_stage2": s["before"]["accuracy"],
            "accuracy_after_stage2": s["after"]["accuracy"],
            "unparsed_after_stage2": s["after"]["unparsed"],
            "by_question_type_after_stage2": s["after"]["groups"],
        }
        for order, s in scores.items()
    }
    results["descriptions_after_stage2"] = described
    results["minutes"] = (time.perf_counter() - start) / 60
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _say(
        f"multiple-choice accuracy on {results['fixed']['n']} held-out questions (same images and questions):"
    )
    _say(f"  {'options':<34}{'chance':>8}{'after stage 1':>15}{'after stage 2':>15}")
    labels = {"fixed": "fixed order (the demo's target)", "shuffled": "shuffled (needs option matching)"}
    for order, label in labels.items():
        r = results[order]
        _say(
            f"  {label:<34}{r['chance']:>8.1%}{r['accuracy_before_stage2']:>15.1%}{r['accuracy_after_stage2']:>15.1%}"
        )
    for order in labels:
        groups = results[order]["by_question_type_after_stage2"]
        parts = [
            f"{name} {g['accuracy']:.0%} (chance {g['chance']:.0%}, n {g['n']})" for name, g in groups.items()
        ]
        _say(f"  by question type, {order}, after stage 2: " + ", ".join(parts))
    _say(
        f"free-form descriptions of {described['n']} one-shape held-out images naming the right colour and "
        f"shape: {described['accuracy']:.1%} (colour {described['colour']:.1%}, shape {described['shape']:.1%}; "
        f"chance {1 / (len(COLOURS) * len(SHAPES)):.1%})"
    )
    _say(
        f"outputs: results {out / 'results.json'}, answers and results per set {out / 'eval'}/*/ "
        f"(table {out / 'eval' / 'table.md'}), "
        f"sample grid {grid}, checkpoints {stage2_dir / 'checkpoints'},"
    )
    _say(f"         TensorBoard curves: tensorboard --logdir {out}   ({results['minutes']:.1f} min in all)")


if __name__ == "__main__":
    main()
