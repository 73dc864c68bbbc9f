"""The whole synthetic shapes dataset under one folder: `generate(out, seed, ...)` and its manifest."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .multiple_choice import EVAL_FILES, MC_TRAIN_TYPE_WEIGHTS, checked_type_weights
from .scenes import COLOURS, POSITIONS, SHAPES, STREAM_MC_TRAIN, STREAM_VAL
from .writers import write_captions, write_eval, write_instruct, write_json

log = logging.getLogger(__name__)

# Bumped whenever the layout or content changes: the demo regenerates data whose manifest differs.
FORMAT_VERSION = 9


def generate(
    out: Path,
    seed: int,
    n_captions: int = 2000,
    n_instruct: int = 3000,
    n_eval: int = 200,
    image_size: int = 96,
    shard_size: int = 200,
    n_mc_train: int = 6000,
    n_val: int = 100,
    mc_train_type_weights: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Write the whole dataset under ``out``; returns the manifest.

    ``mc_train_type_weights`` defaults to `MC_TRAIN_TYPE_WEIGHTS`."""
    if image_size < 24:
        raise ValueError("--image-size must be >= 24")
    # Checked before anything is written (write_eval checks again, for its direct callers).
    weights = checked_type_weights(
        MC_TRAIN_TYPE_WEIGHTS if mc_train_type_weights is None else mc_train_type_weights
    )
    out.mkdir(parents=True, exist_ok=True)
    n_shards = write_captions(out / "captions", seed, n_captions, image_size, shard_size)
    log.info("captions: %d samples in %d shards", n_captions, n_shards)
    instruct = write_instruct(out / "instruct", seed, n_instruct, image_size)
    log.info("instruct: %s", instruct)
    val = write_instruct(out / "instruct", seed, n_val, image_size, STREAM_VAL, "val.json", "val-")
    log.info("instruct validation split: %s", val)
    # Training questions in the fixed order only: see write_eval.
    mc_letters = write_eval(
        out / "instruct",
        seed,
        n_mc_train,
        image_size,
        STREAM_MC_TRAIN,
        {"fixed": "mc_train.json"},
        "mc-",
        weights,
    )["fixed"]
    log.info("multiple-choice training split: %d questions, answer letters %s", n_mc_train, mc_letters)
    # Shapes fill their cells, so two draws can render to the same bytes: the held-out set skips those.
    training = {p.read_bytes() for p in (out / "instruct" / "images").glob("*.jpg")}
    letters = write_eval(out / "eval", seed, n_eval, image_size, exclude=training)
    log.info("eval: %d questions, answer letters %s", n_eval, letters)
    manifest = {
        "recipe": "python -m llava_lightning.data.synthetic",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "image_size": image_size,
        "shard_size": shard_size,
        "captions": {
            "samples": n_captions,
            "shards": n_shards,
            "files": [f"captions/shard-{k:05d}.tar" for k in range(n_shards)],
        },
        "instruct": {
            "samples": n_instruct,
            "single_image": instruct["single"],
            "two_image": instruct["two_image"],
            "text_only": instruct["text_only"],
            "images": instruct["images"],
            "json": "instruct/llava_instruct.json",
            "image_root": "instruct",
        },
        "val": {"samples": n_val, "json": "instruct/val.json", "image_root": "instruct"},
        "mc_train": {
            "samples": n_mc_train,
            "type_weights": weights,
            "answer_letters": mc_letters,
            "json": "instruct/mc_train.json",
            "image_root": "instruct",
        },
        "eval": {
            "samples": n_eval,
            "answer_letters": letters,
            "json": {order: f"eval/{name}" for order, name in EVAL_FILES.items()},
            "image_root": "eval",
        },
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "positions": list(POSITIONS),
    }
    write_json(out / "MANIFEST.json", manifest)
    return manifest
