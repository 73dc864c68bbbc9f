"""Synthetic "shapes" dataset: the small embedded default used by the demo and the tests.

Every image is a plain light background with 1-3 coloured shapes, each in its own cell of a
3x3 grid. Because every shape in an image has a distinct type *and* a distinct colour, every
question asked about an image has exactly one short, deterministic answer that a tiny model
can learn. `generate` writes four datasets plus a manifest:

- ``DIR/captions/shard-00000.tar ...``: img2dataset-style webdataset shards (stage 1), per
  sample ``{key}.jpg``, ``{key}.txt`` (caption) and ``{key}.json`` (metadata), and
  ``DIR/captions/sizes.json`` (``{"shard-00000.tar": 200, ...}``, samples per shard).
- ``DIR/instruct/llava_instruct.json`` + ``DIR/instruct/images/``: LLaVA instruction data
  (stage 2): single-image, two-image (about 10%) and text-only (about 10%) conversations.
- ``DIR/instruct/val.json`` (images ``instruct/images/val-*.jpg``): a validation split of the
  instruction data from its own stream (validation loss / perplexity, and sweeps' metric).
- ``DIR/instruct/mc_train.json`` (images ``instruct/images/mc-*.jpg``): multiple-choice
  questions in the eval format with fixed-order options, for training (LLaVA-1.5's mix has such
  "answer with the option's letter" data too), from a stream of their own: no image is shared with
  the eval set.
- ``DIR/eval/scienceqa_style.json`` + ``DIR/eval/images/``: a held-out multiple-choice set in
  the record format of ``data_recipes/scienceqa_to_llava.py`` (``id``, ``image``, ``conversations``,
  ``answer_letter``, ``options``), drawn from its own random stream, with 3-4 shuffled options;
  ``DIR/eval/scienceqa_style_fixed.json``: the same images and questions with each question
  type's whole answer set as options, in one fixed order (`write_eval` says why).
- ``DIR/MANIFEST.json``: the seed, the arguments and the counts.

Output is byte-identical for the same arguments: fixed JPEG settings, sorted JSON keys, tar
members with mtime 0 and no owner names.

    python -m llava_lightning.data.synthetic --out data/shapes --seed 0

Modules: `scenes` (random scenes and their JPEGs), `questions` (captions, instruction
conversations), `multiple_choice` (question types, answer sets, records), `writers` (tar, JSON and
the splits on disk), `dataset` (`generate`, the manifest), `cli` (the command line).
"""

from .cli import main, parse_args
from .dataset import FORMAT_VERSION, generate
from .multiple_choice import EVAL_FILES, MC_ANSWER_SETS, MC_TRAIN_TYPE_WEIGHTS, multiple_choice_prompt
from .scenes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    STREAM_CAPTIONS,
    STREAM_EVAL,
    STREAM_INSTRUCT,
    STREAM_MC_TRAIN,
    STREAM_VAL,
    Scene,
    Shape,
    random_scene,
    render,
    rng_for,
)
from .writers import write_captions, write_eval, write_instruct

__all__ = [
    "COLOURS",
    "EVAL_FILES",
    "FORMAT_VERSION",
    "MC_ANSWER_SETS",
    "MC_TRAIN_TYPE_WEIGHTS",
    "POSITIONS",
    "SHAPES",
    "STREAM_CAPTIONS",
    "STREAM_EVAL",
    "STREAM_INSTRUCT",
    "STREAM_MC_TRAIN",
    "STREAM_VAL",
    "Scene",
    "Shape",
    "generate",
    "main",
    "multiple_choice_prompt",
    "parse_args",
    "random_scene",
    "render",
    "rng_for",
    "write_captions",
    "write_eval",
    "write_instruct",
]
