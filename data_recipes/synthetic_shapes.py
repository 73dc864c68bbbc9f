"""Synthetic "shapes" dataset: the small embedded default used by the demo and the tests.

Every image is a plain light background with 1-3 coloured shapes, each in its own cell of a
3x3 grid. Because every shape in an image has a distinct type *and* a distinct colour, every
question asked about an image has exactly one short, deterministic answer that a tiny model
can learn. The recipe writes four datasets plus a manifest:

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
  the record format of ``scienceqa_to_llava.py`` (``id``, ``image``, ``conversations``,
  ``answer_letter``, ``options``), drawn from its own random stream, with 3-4 shuffled options;
  ``DIR/eval/scienceqa_style_fixed.json``: the same images and questions with each question
  type's whole answer set as options, in one fixed order (`write_eval` says why).
- ``DIR/MANIFEST.json``: the seed, the arguments and the counts.

Output is byte-identical for the same arguments: fixed JPEG settings, sorted JSON keys, tar
members with mtime 0 and no owner names.

    python data_recipes/synthetic_shapes.py --out data/shapes --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("data_recipes.synthetic_shapes")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
# 3x3 grid, row-major; the index is (row * 3 + col).
POSITIONS: tuple[str, ...] = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)
BACKGROUND = (238, 236, 230)
JPEG_QUALITY = 90
SUPERSAMPLE = 2
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."

# Bumped whenever the layout or content changes: the demo regenerates data whose manifest differs.
# 3: captions/sizes.json; 4: one-shape MC scenes, neutral questions, fixed and shuffled option orders;
# 5: MC records name their question type (`question_type`); 6: MC training split weighted by type.
FORMAT_VERSION = 6

# Independent random streams: changing how many captions are drawn never changes the eval set.
STREAM_CAPTIONS, STREAM_INSTRUCT, STREAM_EVAL, STREAM_MC_TRAIN, STREAM_VAL = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Shape:
    """One shape in a scene: its type, colour name, grid cell, size and offset (in pixels)."""

    shape: str
    colour: str
    position: str
    size: float
    dx: float
    dy: float


Scene = list[Shape]


def rng_for(seed: int, stream: int) -> np.random.Generator:
    """A generator for one named stream of a seed (streams do not overlap)."""
    return np.random.default_rng([seed, stream])


def random_scene(rng: np.random.Generator, n_shapes: int | None = None) -> Scene:
    """1-3 shapes with distinct types, colours and cells, sorted in reading order."""
    n = int(rng.integers(1, 4)) if n_shapes is None else n_shapes
    shapes = rng.permutation(len(SHAPES))[:n]
    colours = rng.permutation(len(COLOURS))[:n]
    cells = rng.permutation(len(POSITIONS))[:n]
    colour_names = list(COLOURS)
    scene = [
        Shape(
            shape=SHAPES[int(s)],
            colour=colour_names[int(c)],
            position=POSITIONS[int(p)],
            size=round(float(rng.uniform(0.30, 0.40)), 4),
            dx=round(float(rng.uniform(-0.08, 0.08)), 4),
            dy=round(float(rng.uniform(-0.08, 0.08)), 4),
        )
        for s, c, p in zip(shapes, colours, cells)
    ]
    return sorted(scene, key=lambda sh: POSITIONS.index(sh.position))


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -np.pi / 2 + i * np.pi / 5
        points.append((cx + radius * float(np.cos(angle)), cy + radius * float(np.sin(angle))))
    return points


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw a scene (supersampled, then downscaled for smooth edges)."""
    big = image_size * SUPERSAMPLE
    cell = big / 3
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for sh in scene:
        idx = POSITIONS.index(sh.position)
        row, col = divmod(idx, 3)
        cx = (col + 0.5 + sh.dx) * cell
        cy = (row + 0.5 + sh.dy) * cell
        r = sh.size * cell
        fill = COLOURS[sh.colour]
        if sh.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif sh.shape == "square":
            s = r * 0.85
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif sh.shape == "triangle":
            draw.polygon(
                [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill
            )
        elif sh.shape == "star":
            draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(f"unknown shape {sh.shape!r}")
    return img.reduce(SUPERSAMPLE)


def jpeg_bytes(img: Image.Image) -> bytes:
    """Encode with fixed settings so the bytes are reproducible."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=0)
    return buf.getvalue()


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


# --------------------------------------------------------------------------------------------
# tar writing (deterministic)


class DeterministicTarWriter:
    """A minimal webdataset shard writer: fixed member order, mtime 0, no owner names."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> DeterministicTarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# captions


def write_captions(out: Path, seed: int, n: int, image_size: int, shard_size: int) -> int:
    """Write ``n`` caption samples into shards of ``shard_size``; returns the shard count."""
    if shard_size < 1:
        raise ValueError("--shard-size must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    rng = rng_for(seed, STREAM_CAPTIONS)
    n_shards = 0
    writer: DeterministicTarWriter | None = None
    try:
        for i in range(n):
            if i % shard_size == 0:
                if writer is not None:
                    writer.close()
                writer = DeterministicTarWriter(out / f"shard-{n_shards:05d}.tar")
                n_shards += 1
            assert writer is not None
            scene = random_scene(rng)
            key = f"{i:09d}"
            text = caption(scene)
            meta = {
                "key": key,
                "caption": text,
                "width": image_size,
                "height": image_size,
                "shapes": [asdict(sh) for sh in scene],
                "status": "success",
            }
            writer.add(f"{key}.jpg", jpeg_bytes(render(scene, image_size)))
            writer.add(f"{key}.txt", text.encode("utf-8"))
            writer.add(f"{key}.json", dumps(meta).encode("utf-8"))
    finally:
        if writer is not None:
            writer.close()
    # Samples per shard, read by CaptionShards to deal samples out over ranks exactly once.
    sizes = {f"shard-{k:05d}.tar": min(shard_size, n - k * shard_size) for k in range(n_shards)}
    write_json(out / "sizes.json", sizes)
    return n_shards


# --------------------------------------------------------------------------------------------
# single-image questions


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


def single_image_conversation(rng: np.random.Generator, scene: Scene) -> list[dict[str, str]]:
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


def write_instruct(
    out: Path,
    seed: int,
    n: int,
    image_size: int,
    stream: int = STREAM_INSTRUCT,
    json_name: str = "llava_instruct.json",
    prefix: str = "",
) -> dict[str, int]:
    """Write a LLaVA instruction JSON and its images (the training set, or with another stream the
    validation split); returns counts per kind."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = rng_for(seed, stream)
    records: list[dict[str, Any]] = []
    counts = {"single": 0, "two_image": 0, "text_only": 0, "images": 0}
    for i, kind in enumerate(sample_kinds(rng, n)):
        counts[kind] += 1
        if kind == "text_only":
            records.append({"id": f"shapes-text-{i:06d}", "conversations": text_only_conversation(rng)})
        elif kind == "single":
            scene = random_scene(rng)
            name = f"{prefix}{i:06d}.jpg"
            (images_dir / name).write_bytes(jpeg_bytes(render(scene, image_size)))
            counts["images"] += 1
            records.append(
                {
                    "id": f"shapes-{prefix}instruct-{i:06d}",
                    "image": f"images/{name}",
                    "conversations": single_image_conversation(rng, scene),
                }
            )
        else:
            # Counts drawn independently, so the three answers are roughly balanced.
            scenes = [random_scene(rng), random_scene(rng)]
            names = [f"{prefix}{i:06d}_a.jpg", f"{prefix}{i:06d}_b.jpg"]
            for scene, name in zip(scenes, names):
                (images_dir / name).write_bytes(jpeg_bytes(render(scene, image_size)))
            counts["images"] += 2
            records.append(
                {
                    "id": f"shapes-{prefix}pair-{i:06d}",
                    "image": [f"images/{name}" for name in names],
                    "conversations": two_image_conversation(rng, scenes[0], scenes[1]),
                }
            )
    write_json(out / json_name, records)
    return counts


# --------------------------------------------------------------------------------------------
# multiple-choice eval


def multiple_choice_prompt(question: str, options: Sequence[str], context: str = "") -> str:
    """The LLaVA-1.5 ScienceQA layout (same as scienceqa_to_llava.py, without the image token)."""
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
    if type_weights is None:  # one `integers` draw, as before weights existed: the eval set's bytes stay
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
    record_id: str, image: str, question: str, options: list[str], correct: str, kind: str
) -> dict[str, Any]:
    letter = chr(ord("A") + options.index(correct))
    return {
        "id": record_id,
        "image": image,
        "conversations": [_human(multiple_choice_prompt(question, options), 1, True), _gpt(letter)],
        "answer_letter": letter,
        "options": options,
        "question_type": kind,  # colour / shape / count / position: the eval's per-type breakdown
    }


def write_eval(
    out: Path,
    seed: int,
    n: int,
    image_size: int,
    stream: int = STREAM_EVAL,
    files: dict[str, str] | None = None,
    prefix: str = "",
    type_weights: dict[str, float] | None = None,
) -> dict[str, dict[str, int]]:
    """Write a multiple-choice set (the held-out eval, or with another stream a training split in
    the same format): ``files`` maps an option order to its JSON name (default: both orders, over
    the same images and questions, as ``EVAL_FILES``):

    - ``shuffled``: 3-4 options, the answer and random distractors in random order, as in
      ScienceQA. Answering needs option matching: finding the seen attribute among the options.
    - ``fixed``: the question type's whole answer set in its canonical order (`MC_ANSWER_SETS`),
      so a letter always names the same answer, as with yes/no or ascending-count options in real
      benchmarks. It measures seeing through the letter interface without option matching, a
      skill a pretrained LLM brings and a tiny LLM trained from scratch for minutes does not
      acquire (docs/experiments.md).

    ``type_weights`` (question type -> weight) skews the mix of question types (see
    `MC_TRAIN_TYPE_WEIGHTS`); None draws them uniformly, as the held-out set does.

    Returns the answer-letter histogram per order.
    """
    files = dict(EVAL_FILES if files is None else files)
    if type_weights is not None:
        type_weights = checked_type_weights(type_weights)
    orders = list(files)
    if not orders or set(orders) - set(EVAL_FILES):
        raise ValueError(f"files must map a non-empty subset of {tuple(EVAL_FILES)} to names, got {files!r}")
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = rng_for(seed, stream)
    records: dict[str, list[dict[str, Any]]] = {order: [] for order in orders}
    for i in range(n):
        scene, kind, question, correct = _mc_item(rng, type_weights)
        # Drawn whatever the orders, so both files of one stream hold the same images and questions.
        pool = [x for x in MC_ANSWER_SETS[kind] if x != correct]
        n_options = int(rng.integers(3, 5))
        distractors = [pool[int(j)] for j in rng.choice(len(pool), size=n_options - 1, replace=False)]
        shuffled = [correct, *distractors]
        shuffled = [shuffled[int(j)] for j in rng.permutation(n_options)]
        name = f"{prefix}{i:06d}.jpg"
        (images_dir / name).write_bytes(jpeg_bytes(render(scene, image_size)))
        for order in orders:
            options = shuffled if order == "shuffled" else list(MC_ANSWER_SETS[kind])
            records[order].append(
                _mc_record(
                    f"shapes-{prefix or 'eval-'}{i:06d}", f"images/{name}", question, options, correct, kind
                )
            )
    for order, name in files.items():
        write_json(out / name, records[order])
    return {
        order: dict(sorted(Counter(r["answer_letter"] for r in recs).items()))
        for order, recs in records.items()
    }


# --------------------------------------------------------------------------------------------


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
    # Training questions in the fixed order only: see write_eval and README "The demo".
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
    letters = write_eval(out / "eval", seed, n_eval, image_size)
    log.info("eval: %d questions, answer letters %s", n_eval, letters)
    manifest = {
        "recipe": "data_recipes/synthetic_shapes.py",
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


def _type_weights(text: str) -> dict[str, float]:
    """`colour=0.35,shape=0.35,...` -> {"colour": 0.35, ...} (checked against the types in `generate`)."""
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TYPE=WEIGHT,... got {text!r}") from None


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        f"synthetic_shapes: seed {args.seed}: {m['captions']['samples']} captions in {m['captions']['shards']} shards, "
        f"{m['instruct']['samples']} instruct ({m['instruct']['two_image']} two-image, {m['instruct']['text_only']} text-only), "
        f"{m['eval']['samples']} eval -> {args.out} in {elapsed:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
