"""What the synthetic shapes data says about a scene: captions and the instruction question bank
(single-image, two-image and text-only conversations)."""

from __future__ import annotations

import numpy as np

from .scenes import POSITIONS, SHAPES, Scene, Shape

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


def describe(sh: Shape) -> str:
    return f"a {sh.colour} {sh.shape} in the {sh.position}"


def caption(scene: Scene) -> str:
    """E.g. "a red circle in the top left and a blue square in the center."."""
    parts = [describe(sh) for sh in scene]
    if len(parts) == 1:
        text = parts[0]
    else:
        text = ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def sentence(text: str) -> str:
    """Capitalise the first letter and end with a full stop."""
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _question_colour(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    sh = scene[int(rng.integers(len(scene)))]
    return f"What colour is the {sh.shape}?", sentence(sh.colour)


def _question_shape(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    sh = scene[int(rng.integers(len(scene)))]
    return f"What shape is the {sh.colour} object?", sentence(f"a {sh.shape}")


def _question_count(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    return "How many shapes are in the image?", sentence(number_word(len(scene)))


def _question_position(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    sh = scene[int(rng.integers(len(scene)))]
    return f"Where is the {sh.colour} {sh.shape}?", sentence(f"in the {sh.position}")


def _question_exists(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    present = {sh.shape for sh in scene}
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return f"Is there a {shape} in the image?", "Yes." if shape in present else "No."


def _question_cell(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    by_cell = {sh.position: sh for sh in scene}
    # Half of the time ask about an occupied cell, so "Nothing." does not dominate.
    if rng.random() < 0.5:
        position = scene[int(rng.integers(len(scene)))].position
    else:
        position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    sh = by_cell.get(position)
    answer = sentence(f"a {sh.colour} {sh.shape}") if sh else "Nothing."
    return f"What is in the {position}?", answer


def _question_describe(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    return "Describe the image briefly.", sentence(caption(scene))


SINGLE_IMAGE_QUESTIONS = (
    _question_colour,
    _question_shape,
    _question_count,
    _question_position,
    _question_exists,
    _question_cell,
    _question_describe,
)

TEXT_ONLY_QA: tuple[tuple[str, str], ...] = (
    ("How many sides does a triangle have?", "Three."),
    ("How many sides does a square have?", "Four."),
    ("How many corners does a square have?", "Four."),
    ("How many corners does a triangle have?", "Three."),
    ("How many points does a star have?", "Five."),
    ("Does a circle have corners?", "No."),
    ("Which shape is round?", "The circle."),
    ("Which shape has three sides?", "The triangle."),
    ("Which shape has four equal sides?", "The square."),
    ("What colour do you get by mixing red and yellow?", "Orange."),
    ("What colour do you get by mixing blue and yellow?", "Green."),
    ("What colour do you get by mixing red and blue?", "Purple."),
    ("How many cells does a three by three grid have?", "Nine."),
    ("What is the colour of the sky on a clear day?", "Blue."),
    ("What colour is grass?", "Green."),
    *(
        (f"What is the opposite of {p}?", sentence(POSITIONS[len(POSITIONS) - 1 - i]))
        for i, p in enumerate(POSITIONS)
        if p != "center"
    ),
)


def _human(text: str, n_images: int, first: bool) -> dict[str, str]:
    prefix = "<image>\n" * n_images if first else ""
    return {"from": "human", "value": prefix + text}


def _gpt(text: str) -> dict[str, str]:
    return {"from": "gpt", "value": text}


# The share of one-image conversations that are a description alone, as LLaVA-Instruct-158K's
# detail-description part (23K of 158K) is: without it a description mostly follows turns that
# already named the colours and shapes, and the demo's free-form descriptions were at chance.
DESCRIBE_ONLY = 0.3


def single_image_conversation(rng: np.random.Generator, scene: Scene) -> list[dict[str, str]]:
    if rng.random() < DESCRIBE_ONLY:
        question, answer = _question_describe(rng, scene)
        return [_human(question, 1, True), _gpt(answer)]
    n_turns = int(rng.integers(1, 4))
    kinds = rng.choice(len(SINGLE_IMAGE_QUESTIONS), size=n_turns, replace=False)
    conv: list[dict[str, str]] = []
    for t, k in enumerate(kinds):
        question, answer = SINGLE_IMAGE_QUESTIONS[int(k)](rng, scene)
        conv += [_human(question, 1, t == 0), _gpt(answer)]
    return conv


def compare_answer(a: int, b: int) -> str:
    if a > b:
        return "The first image."
    if b > a:
        return "The second image."
    return "Both have the same number."


def two_image_conversation(rng: np.random.Generator, first: Scene, second: Scene) -> list[dict[str, str]]:
    conv = [
        _human("Which image has more shapes?", 2, True),
        _gpt(compare_answer(len(first), len(second))),
    ]
    if rng.random() < 0.5:
        which, scene = ("first", first) if rng.random() < 0.5 else ("second", second)
        conv += [
            _human(f"How many shapes are in the {which} image?", 2, False),
            _gpt(sentence(number_word(len(scene)))),
        ]
    return conv


def text_only_conversation(rng: np.random.Generator) -> list[dict[str, str]]:
    n_turns = int(rng.integers(1, 4))
    picks = rng.choice(len(TEXT_ONLY_QA), size=n_turns, replace=False)
    conv: list[dict[str, str]] = []
    for p in picks:
        question, answer = TEXT_ONLY_QA[int(p)]
        conv += [_human(question, 0, False), _gpt(answer)]
    return conv


def sample_kinds(rng: np.random.Generator, n: int, fraction: float = 0.1) -> list[str]:
    """Exactly round(fraction * n) two-image and text-only samples (at least one each once n >= 3)."""
    n_special = max(1, round(fraction * n)) if n >= 3 else 0
    kinds = ["two_image"] * n_special + ["text_only"] * n_special
    kinds += ["single"] * (n - len(kinds))
    order = rng.permutation(n)
    return [kinds[int(j)] for j in order]
