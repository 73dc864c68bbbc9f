"""The synthetic multiple-choice questions: question types, their answer sets and the record layout of
the held-out eval set and the multiple-choice training split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .questions import _gpt, _human
from .scenes import COLOURS, POSITIONS, SHAPES, Scene, random_scene

MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def multiple_choice_prompt(question: str, options: Sequence[str], context: str = "") -> str:
    """The LLaVA-1.5 ScienceQA layout (same as data_recipes/scienceqa_to_llava.py, without the image token)."""
    lines = "\n".join(f"{chr(ord('A') + i)}. {opt}" for i, opt in enumerate(options))
    body = f"Context: {context}\n{question}\n{lines}" if context else f"{question}\n{lines}"
    return body + MC_SUFFIX


# The held-out multiple-choice files under DIR/eval, by option order (see `write_eval`).
EVAL_FILES = {"shuffled": "scienceqa_style.json", "fixed": "scienceqa_style_fixed.json"}
# The answer set of each multiple-choice question type, in its one canonical order: the options of
# a "fixed"-order question (see `write_eval`).
MC_ANSWER_SETS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": ("1", "2", "3", "4"),
    "position": POSITIONS,
}


# The mix of question types in the multiple-choice training split (the held-out set is uniform).
# Colour and shape get more: with one image token per grid cell (the `tiny` tower), count and position
# are learned first and from fewer samples, and colour or shape was the type a run had not learned
# at the end (docs/experiments.md).
MC_TRAIN_TYPE_WEIGHTS: dict[str, float] = {"colour": 0.35, "shape": 0.35, "count": 0.15, "position": 0.15}


def checked_type_weights(weights: dict[str, float]) -> dict[str, float]:
    """A copy of question-type weights, or a ValueError unless every type has one >= 0 (not all 0)."""
    if set(weights) != set(MC_ANSWER_SETS) or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(
            f"type_weights needs a weight >= 0 for each of {tuple(MC_ANSWER_SETS)} (not all 0), got {weights!r}"
        )
    return dict(weights)


def _mc_item(
    rng: np.random.Generator, type_weights: dict[str, float] | None = None
) -> tuple[Scene, str, str, str]:
    """(scene, question type, question, correct option) for one random question.

    The type is uniform over `MC_ANSWER_SETS` unless `type_weights` (type -> weight) says otherwise.

    Colour, shape and position questions are asked about a one-shape scene, count questions about
    1-3 shapes: the set measures seeing an attribute, not binding attributes across shapes. The
    questions name no attribute ("What colour is the shape?"), so the image is the only source of
    the answer; naming the others ("What colour is the square?") slowed learning in our runs.
    """
    kinds = tuple(MC_ANSWER_SETS)
    if type_weights is None:  # exactly one `integers` draw: the held-out set's bytes depend on it
        kind = kinds[int(rng.integers(len(kinds)))]
    else:
        p = np.array([type_weights[k] for k in kinds], dtype=float)
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    scene = random_scene(rng, None if kind == "count" else 1)
    sh = scene[0]
    if kind == "colour":
        return scene, kind, "What colour is the shape?", sh.colour
    if kind == "shape":
        return scene, kind, "What shape is it?", sh.shape
    if kind == "count":
        return scene, kind, "How many shapes are in the image?", str(len(scene))
    return scene, kind, "Where is the shape?", sh.position


def _mc_record(
    record_id: str, image: str, question: str, options: list[str], correct: str, kind: str, scene: Scene
) -> dict[str, Any]:
    letter = chr(ord("A") + options.index(correct))
    return {
        "id": record_id,
        "image": image,
        "conversations": [_human(multiple_choice_prompt(question, options), 1, True), _gpt(letter)],
        "answer_letter": letter,
        "options": options,
        "question_type": kind,  # colour / shape / count / position: the eval's per-type breakdown
        # What the image shows (the free-form description check reads it: eval/descriptions.py).
        "scene": [{"shape": sh.shape, "colour": sh.colour, "position": sh.position} for sh in scene],
    }
