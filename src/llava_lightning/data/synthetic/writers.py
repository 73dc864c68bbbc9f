"""Writing the synthetic shapes splits to disk, byte-reproducibly: deterministic tar shards and JSON,
the caption shards, the instruction JSON and the multiple-choice sets."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .multiple_choice import EVAL_FILES, MC_ANSWER_SETS, _mc_item, _mc_record, checked_type_weights
from .questions import (
    caption,
    sample_kinds,
    single_image_conversation,
    text_only_conversation,
    two_image_conversation,
)
from .scenes import STREAM_CAPTIONS, STREAM_EVAL, STREAM_INSTRUCT, jpeg_bytes, random_scene, render, rng_for


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


def write_eval(
    out: Path,
    seed: int,
    n: int,
    image_size: int,
    stream: int = STREAM_EVAL,
    files: dict[str, str] | None = None,
    prefix: str = "",
    type_weights: dict[str, float] | None = None,
    exclude: set[bytes] | None = None,
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
    `MC_TRAIN_TYPE_WEIGHTS`); None draws them uniformly, as the held-out set does. An item whose
    image bytes are in ``exclude`` (e.g. the training images) is drawn again.

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
        image = jpeg_bytes(render(scene, image_size))
        while exclude and image in exclude:  # a held-out image never equals a training image
            scene, kind, question, correct = _mc_item(rng, type_weights)
            image = jpeg_bytes(render(scene, image_size))
        # Drawn whatever the orders, so both files of one stream hold the same images and questions.
        pool = [x for x in MC_ANSWER_SETS[kind] if x != correct]
        n_options = int(rng.integers(3, 5))
        distractors = [pool[int(j)] for j in rng.choice(len(pool), size=n_options - 1, replace=False)]
        shuffled = [correct, *distractors]
        shuffled = [shuffled[int(j)] for j in rng.permutation(n_options)]
        name = f"{prefix}{i:06d}.jpg"
        (images_dir / name).write_bytes(image)
        for order in orders:
            options = shuffled if order == "shuffled" else list(MC_ANSWER_SETS[kind])
            records[order].append(
                _mc_record(
                    f"shapes-{prefix or 'eval-'}{i:06d}",
                    f"images/{name}",
                    question,
                    options,
                    correct,
                    kind,
                    scene,
                )
            )
    for order, name in files.items():
        write_json(out / name, records[order])
    return {
        order: dict(sorted(Counter(r["answer_letter"] for r in recs).items()))
        for order, recs in records.items()
    }
