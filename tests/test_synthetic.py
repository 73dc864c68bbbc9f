"""Tests for the synthetic shapes generator (`llava_lightning.data.synthetic`): determinism, counts,
the caption shards, the instruction mix and the multiple-choice sets. CPU only, offline, small sizes."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_recipes import scienceqa_to_llava
from llava_lightning.data import synthetic
from llava_lightning.data.synthetic.multiple_choice import _mc_item
from llava_lightning.data.synthetic.questions import DESCRIBE_ONLY

SMALL = ["--n-captions", "45", "--n-instruct", "120", "--n-eval", "150", "--shard-size", "20"]


def _make(out: Path, seed: int) -> Path:
    assert synthetic.main(["--out", str(out), "--seed", str(seed), *SMALL]) == 0
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make(tmp_path_factory.mktemp("shapes") / "seed0", 0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_deterministic(shapes: Path, tmp_path: Path) -> None:
    again = _files(_make(tmp_path / "again", 0))
    first = _files(shapes)
    assert sorted(again) == sorted(first)
    assert again == first  # byte-identical: shards, JSON, images
    other = _files(_make(tmp_path / "other", 1))
    for name in ("captions/shard-00000.tar", "instruct/llava_instruct.json", "eval/scienceqa_style.json"):
        assert other[name] != first[name], name
    with tarfile.open(shapes / "captions" / "shard-00000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_synthetic_counts_and_manifest(shapes: Path) -> None:
    manifest = json.loads((shapes / "MANIFEST.json").read_text())
    assert manifest["seed"] == 0
    assert manifest["captions"]["samples"] == 45 and manifest["captions"]["shards"] == 3
    assert sorted(p.name for p in (shapes / "captions").iterdir()) == [
        "shard-00000.tar",
        "shard-00001.tar",
        "shard-00002.tar",
        "sizes.json",
    ]
    sizes = json.loads((shapes / "captions" / "sizes.json").read_text())
    counts = {
        p.name: len(list(wds.WebDataset(str(p), shardshuffle=False)))
        for p in (shapes / "captions").glob("*.tar")
    }
    assert sizes == counts == {"shard-00000.tar": 20, "shard-00001.tar": 20, "shard-00002.tar": 5}
    assert len(json.loads((shapes / "instruct" / "llava_instruct.json").read_text())) == 120
    assert len(json.loads((shapes / "eval" / "scienceqa_style.json").read_text())) == 150
    assert manifest["instruct"]["samples"] == 120 and manifest["eval"]["samples"] == 150


def test_synthetic_shards_read_with_webdataset(shapes: Path) -> None:
    urls = [str(p) for p in sorted((shapes / "captions").glob("shard-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 45
    keys = [s["__key__"] for s in samples]
    assert keys == [f"{i:09d}" for i in range(45)]
    for s in samples[:10]:
        assert {"jpg", "txt", "json"} <= set(s)
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.mode == "RGB" and img.size == (96, 96)
        caption = s["txt"].decode()
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["caption"] == caption
        assert (meta["width"], meta["height"]) == (96, 96)
        assert 1 <= len(meta["shapes"]) <= 3
        assert caption.startswith("a ") and caption.endswith(".")
        for sh in meta["shapes"]:
            assert f"{sh['colour']} {sh['shape']} in the {sh['position']}" in caption


def test_synthetic_instruct_mix(shapes: Path) -> None:
    root = shapes / "instruct"
    records = json.loads((root / "llava_instruct.json").read_text())
    kinds = Counter()
    for r in records:
        conv = r["conversations"]
        assert 2 <= len(conv) <= 6 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        images = [] if "image" not in r else [r["image"]] if isinstance(r["image"], str) else r["image"]
        kinds[len(images)] += 1
        first = conv[0]["value"]
        assert first.count("<image>") == len(images)
        assert first.startswith("<image>\n" * len(images))
        assert all("<image>" not in t["value"] for t in conv[1:])
        assert all(t["value"].strip() for t in conv)
        for path in images:
            assert (root / path).is_file()
        if len(images) == 2:
            assert first == "<image>\n<image>\nWhich image has more shapes?"
            assert conv[1]["value"] in ("The first image.", "The second image.", "Both have the same number.")
    assert set(kinds) == {0, 1, 2}
    assert kinds[2] == 12 and kinds[0] == 12  # 10% each of 120
    # Description-only conversations (LLaVA-Instruct's detail-description part) in the 96 one-image
    # records: DESCRIBE_ONLY, plus one-turn conversations (1 in 3) drawing it (1 of 7 questions).
    alone = sum(
        len(r["conversations"]) == 2
        and r["conversations"][0]["value"] == "<image>\nDescribe the image briefly."
        for r in records
    )
    p = DESCRIBE_ONLY + (1 - DESCRIBE_ONLY) / 3 / 7
    assert abs(alone - 96 * p) <= 4 * (96 * p * (1 - p)) ** 0.5  # binomial, 4 standard deviations


def test_synthetic_eval_set(shapes: Path) -> None:
    root = shapes / "eval"
    records = json.loads((root / "scienceqa_style.json").read_text())
    letters = Counter()
    for r in records:
        assert set(r) == {
            "id",
            "image",
            "conversations",
            "answer_letter",
            "options",
            "question_type",
            "scene",
        }
        assert (root / r["image"]).is_file()
        # The scene the image shows: what the question's answer and the description check read.
        scene = r["scene"]
        answer = r["options"][ord(r["answer_letter"]) - 65]
        if r["question_type"] == "count":
            assert answer == str(len(scene))
        else:
            assert len(scene) == 1 and scene[0][r["question_type"]] == answer
        options = r["options"]
        assert 3 <= len(options) <= 4 and len(set(options)) == len(options)
        letter = r["answer_letter"]
        assert letter in "ABCD"[: len(options)]
        assert r["conversations"][1] == {"from": "gpt", "value": letter}
        human = r["conversations"][0]["value"]
        question = human.split("\n")[1]
        # Same prompt layout as scienceqa_to_llava.py.
        assert human == scienceqa_to_llava.build_prompt(question, options, "", True)
        letters[letter] += 1
    assert max(letters.values()) / len(records) <= 0.6
    assert len(letters) >= 3
    # Held out: eval images are drawn from another stream than the training images.
    train = {p.read_bytes() for p in (shapes / "instruct" / "images").glob("*.jpg")}
    assert not train & {p.read_bytes() for p in (root / "images").glob("*.jpg")}


def _answer(record: dict) -> str:
    return record["options"][ord(record["answer_letter"]) - ord("A")]


def test_synthetic_eval_fixed_order_pairs_the_shuffled_set(shapes: Path) -> None:
    root = shapes / "eval"
    shuffled = json.loads((root / "scienceqa_style.json").read_text())
    fixed = json.loads((root / "scienceqa_style_fixed.json").read_text())
    assert [(r["id"], r["image"]) for r in fixed] == [(r["id"], r["image"]) for r in shuffled]
    answer_sets = set(synthetic.MC_ANSWER_SETS.values())
    kinds = Counter()
    for f, s in zip(fixed, shuffled):
        question = f["conversations"][0]["value"].split("\n")[1]
        assert question == s["conversations"][0]["value"].split("\n")[1]
        # The whole answer set of the question's type, in its canonical order; the same answer.
        assert f["question_type"] == s["question_type"]
        assert tuple(f["options"]) == tuple(synthetic.MC_ANSWER_SETS[f["question_type"]])
        assert set(s["options"]) <= set(f["options"])
        assert _answer(f) == _answer(s)
        assert f["conversations"][1] == {"from": "gpt", "value": f["answer_letter"]}
        kinds[tuple(f["options"])] += 1
    assert len(kinds) == len(answer_sets)  # every question type occurs in 150 questions
    # Training questions use the fixed order too, from their own images.
    train = json.loads((shapes / "instruct" / "mc_train.json").read_text())
    assert train and all(tuple(r["options"]) in answer_sets for r in train)
    # The questions name no attribute: the image is the only source of the answer.
    words = set(synthetic.COLOURS) | set(synthetic.SHAPES)
    for r in fixed + train:
        question = r["conversations"][0]["value"].split("\n")[1]
        assert not words & set(question.rstrip("?").split()), question
    manifest = json.loads((shapes / "MANIFEST.json").read_text())
    assert manifest["eval"]["json"] == {
        "shuffled": "eval/scienceqa_style.json",
        "fixed": "eval/scienceqa_style_fixed.json",
    }


def test_synthetic_eval_one_shape_scenes_except_counts(tmp_path: Path) -> None:
    rng = synthetic.rng_for(0, synthetic.STREAM_EVAL)
    seen = Counter()
    for _ in range(200):
        scene, kind, question, correct = _mc_item(rng)
        seen[kind] += 1
        if kind == "count":
            assert correct == str(len(scene)) and 1 <= len(scene) <= 3
        else:
            assert len(scene) == 1 and correct in (scene[0].colour, scene[0].shape, scene[0].position)
    assert set(seen) == set(synthetic.MC_ANSWER_SETS)
    with pytest.raises(ValueError, match="files must map"):
        synthetic.write_eval(tmp_path, 0, 1, 48, files={"sorted": "x.json"})


def test_synthetic_mc_training_mix_follows_the_type_weights(tmp_path: Path) -> None:
    rng = synthetic.rng_for(0, synthetic.STREAM_MC_TRAIN)
    only_colour = {"colour": 1.0, "shape": 0.0, "count": 0.0, "position": 0.0}
    assert {_mc_item(rng, only_colour)[1] for _ in range(50)} == {"colour"}
    skewed = {"colour": 3.0, "shape": 1.0, "count": 0.0, "position": 0.0}
    seen = Counter(_mc_item(rng, skewed)[1] for _ in range(2000))
    assert set(seen) == {"colour", "shape"} and 0.70 < seen["colour"] / 2000 < 0.80  # 0.75 expected
    # The default mix is the recipe's constant, written to the manifest; the eval set stays uniform.
    m = synthetic.generate(tmp_path / "d", 0, n_captions=2, n_instruct=2, n_eval=2, n_mc_train=40, n_val=2)
    assert m["mc_train"]["type_weights"] == synthetic.MC_TRAIN_TYPE_WEIGHTS
    with pytest.raises(ValueError, match="needs a weight >= 0 for each of"):
        synthetic.generate(tmp_path / "e", 0, mc_train_type_weights={"colour": 1.0})
    args = synthetic.parse_args(
        ["--out", "x", "--seed", "0", "--mc-train-type-weights", "colour=2,shape=1,count=0,position=1"]
    )
    assert args.mc_train_type_weights == {"colour": 2.0, "shape": 1.0, "count": 0.0, "position": 1.0}
    with pytest.raises(SystemExit):
        synthetic.parse_args(["--out", "x", "--seed", "0", "--mc-train-type-weights", "colour:2"])
