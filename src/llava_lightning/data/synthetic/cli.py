"""The generator's command line: `python -m llava_lightning.data.synthetic --out data/shapes --seed 0`."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from .dataset import generate


def _type_weights(text: str) -> dict[str, float]:
    """`colour=0.35,shape=0.35,...` -> {"colour": 0.35, ...} (checked against the types in `generate`)."""
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TYPE=WEIGHT,... got {text!r}") from None


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llava_lightning.data.synthetic",
        description='Synthetic "shapes" dataset: the small embedded default used by the demo and the tests.',
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--n-captions", type=int, default=2000)
    p.add_argument("--n-instruct", type=int, default=3000)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument(
        "--n-mc-train", type=int, default=6000, help="multiple-choice training questions (eval format)"
    )
    p.add_argument("--n-val", type=int, default=100, help="instruction validation samples")
    p.add_argument(
        "--mc-train-type-weights",
        type=_type_weights,
        default=None,
        help="question-type mix of the multiple-choice training split, e.g. "
        "colour=1,shape=1,count=1,position=1 (default: MC_TRAIN_TYPE_WEIGHTS)",
    )
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--shard-size", type=int, default=200, help="caption samples per tar shard")
    args = p.parse_args(None if argv is None else list(argv))
    for name in ("n_captions", "n_instruct", "n_eval", "n_mc_train", "n_val"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def main(argv: Iterable[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    m = generate(
        args.out,
        args.seed,
        args.n_captions,
        args.n_instruct,
        args.n_eval,
        args.image_size,
        args.shard_size,
        args.n_mc_train,
        args.n_val,
        args.mc_train_type_weights,
    )
    elapsed = time.perf_counter() - start
    print(
        f"synthetic shapes: seed {args.seed}: {m['captions']['samples']} captions in {m['captions']['shards']} shards, "
        f"{m['instruct']['samples']} instruct ({m['instruct']['two_image']} two-image, {m['instruct']['text_only']} text-only), "
        f"{m['eval']['samples']} eval -> {args.out} in {elapsed:.1f}s"
    )
    return 0
