"""Tests for data_recipes/: the ScienceQA and LCS-558K converters, the CC3M 595K filter and the
instruction-data validator. CPU only, offline, small sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_recipes import lcs558k_to_shards, scienceqa_to_llava
from data_recipes.cc3m import filter_595k
from data_recipes.llava_instruct import validate

# --------------------------------------------------------------------------------------------
# scienceqa_to_llava

PROBLEMS = {
    "1": {
        "question": "Which organism is a producer?",
        "choices": ["grass", "hawk", "rabbit"],
        "answer": 0,
        "hint": "The diagram shows a food web.",
        "image": "image.png",
        "split": "train",
    },
    "2": {
        "question": "Which word would you find on a dictionary page with the guide words cave - cube?",
        "choices": ["cozy", "dress"],
        "answer": 0,
        "hint": "",
        "image": None,
        "split": "train",
    },
    "3": {
        "question": "What is the capital of Utah?",
        "choices": ["Provo", "Salt Lake City", "Ogden", "Boise"],
        "answer": 1,
        "hint": "",
        "image": "image.png",
        "split": "val",
    },
    "4": {
        "question": "Which is a compound?",
        "choices": ["water", "oxygen"],
        "answer": 0,
        "hint": "Water is made of hydrogen and oxygen.",
        "image": None,
        "split": "test",
    },
}
PID_SPLITS = {"train": ["1", "2"], "val": ["3"], "test": ["4"], "minival": ["3"]}


def _sqa_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps(PROBLEMS))
    splits = tmp_path / "pid_splits.json"
    splits.write_text(json.dumps(PID_SPLITS))
    images = tmp_path / "images"
    for split, pid in (("train", "1"), ("val", "3")):
        (images / split / pid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(images / split / pid / "image.png")
    return problems, splits, images


def _sqa(tmp_path: Path, *extra: str) -> Path:
    problems, splits, images = _sqa_inputs(tmp_path)
    out = tmp_path / "out"
    args = [
        "--problems",
        str(problems),
        "--pid-splits",
        str(splits),
        "--image-root",
        str(images),
        "--out",
        str(out),
    ]
    assert scienceqa_to_llava.main([*args, *extra]) == 0
    return out


def test_scienceqa_prompts(tmp_path: Path) -> None:
    out = _sqa(tmp_path, "--splits", "train", "val", "test", "minival")
    train = json.loads((out / "scienceqa_train.json").read_text())
    assert train == [
        {
            "id": "1",
            "image": "train/1/image.png",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nContext: The diagram shows a food web.\nWhich organism is a producer?\n"
                    "A. grass\nB. hawk\nC. rabbit\n"
                    "Answer with the option's letter from the given choices directly.",
                },
                {"from": "gpt", "value": "A"},
            ],
            "answer_letter": "A",
            "options": ["grass", "hawk", "rabbit"],
        },
        {
            "id": "2",
            "conversations": [
                {
                    "from": "human",
                    "value": "Which word would you find on a dictionary page with the guide words cave - cube?\n"
                    "A. cozy\nB. dress\n"
                    "Answer with the option's letter from the given choices directly.",
                },
                {"from": "gpt", "value": "A"},
            ],
            "answer_letter": "A",
            "options": ["cozy", "dress"],
        },
    ]
    val = json.loads((out / "scienceqa_val.json").read_text())
    assert val[0]["image"] == "val/3/image.png"
    assert val[0]["conversations"][0]["value"] == (
        "<image>\nWhat is the capital of Utah?\nA. Provo\nB. Salt Lake City\nC. Ogden\nD. Boise\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert val[0]["answer_letter"] == "B" and val[0]["conversations"][1]["value"] == "B"
    test = json.loads((out / "scienceqa_test.json").read_text())
    assert "image" not in test[0]
    assert test[0]["conversations"][0]["value"] == (
        "Context: Water is made of hydrogen and oxygen.\nWhich is a compound?\nA. water\nB. oxygen\n"
        "Answer with the option's letter from the given choices directly."
    )
    # minival problems live in val/: the image path follows the problem's own split.
    minival = json.loads((out / "scienceqa_minival.json").read_text())
    assert minival[0]["image"] == "val/3/image.png"


def test_scienceqa_missing_image(tmp_path: Path) -> None:
    problems, splits, images = _sqa_inputs(tmp_path)
    (images / "val" / "3" / "image.png").unlink()
    base = ["--problems", str(problems), "--pid-splits", str(splits), "--image-root", str(images)]
    assert scienceqa_to_llava.main([*base, "--out", str(tmp_path / "keep"), "--splits", "val"]) == 0
    assert len(json.loads((tmp_path / "keep" / "scienceqa_val.json").read_text())) == 1
    out = tmp_path / "drop"
    assert (
        scienceqa_to_llava.main([*base, "--out", str(out), "--splits", "val", "--drop-missing-images"]) == 0
    )
    assert json.loads((out / "scienceqa_val.json").read_text()) == []


# --------------------------------------------------------------------------------------------
# lcs558k_to_shards


def test_lcs558k_to_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    (images / "00000").mkdir(parents=True)
    records = []
    for i in range(6):
        name = f"00000/{i:09d}.jpg"
        if i != 3:  # image 3 is missing
            Image.new("RGB", (20 + i, 10), (i * 40, 0, 0)).save(images / name, quality=80)
        records.append(
            {
                "id": f"{i:09d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
                    {"from": "gpt", "value": f"caption number {i}"},
                ],
            }
        )
    Image.new("RGB", (5, 5)).save(images / "extra.png")
    records.append({"id": "png", "image": "extra.png", "conversations": [{"from": "gpt", "value": "a png"}]})
    src = tmp_path / "blip_laion_cc_sbu_558k.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "shards"
    assert (
        lcs558k_to_shards.main(
            ["--json", str(src), "--image-root", str(images), "--out", str(out), "--shard-size", "4"]
        )
        == 0
    )
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "written 6" in summary and "skipped 1" in summary and "missing 1" in summary

    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    assert len(urls) == 2
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 6  # 7 records - 1 missing
    sizes = json.loads((out / "sizes.json").read_text())  # what CaptionShards reads
    assert sizes == {"shard-00000.tar": 4, "shard-00001.tar": 2}
    ids = [json.loads(s["json"])["id"] for s in samples]
    assert ids == ["000000000", "000000001", "000000002", "000000004", "000000005", "png"]
    first = samples[0]
    assert first["jpg"] == (images / "00000/000000000.jpg").read_bytes()  # copied as-is
    assert first["txt"] == b"caption number 0"
    meta = json.loads(first["json"])
    assert meta["image"] == "00000/000000000.jpg" and (meta["width"], meta["height"]) == (20, 10)
    assert "png" in samples[-1] and "jpg" not in samples[-1]  # non-JPEG keeps its extension
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 6 and stats["skipped_by_reason"]["missing"] == 1
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["reason"]) for s in skipped] == [("000000003", "missing")]


def test_lcs558k_unreadable_image(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "bad.jpg").write_bytes(b"not a jpeg at all")
    Image.new("RGB", (4, 4)).save(images / "good.jpg")
    records = [
        {"id": name, "image": f"{name}.jpg", "conversations": [{"from": "gpt", "value": name}]}
        for name in ("bad", "good")
    ]
    src = tmp_path / "lcs.json"
    src.write_text(json.dumps(records))
    stats = lcs558k_to_shards.convert(records, images, tmp_path / "out", shard_size=10)
    assert stats["written"] == 1 and stats["skipped_by_reason"]["unreadable"] == 1


# --------------------------------------------------------------------------------------------
# cc3m/filter_595k

TSV_ROWS = [f"caption {i} with a 'quote\"\thttps://example.com/{i}.jpg" for i in range(10)]


def _tsv(tmp_path: Path, header: bool = False) -> Path:
    tsv = tmp_path / ("with_header.tsv" if header else "cc3m.tsv")
    tsv.write_text(("caption\turl\n" if header else "") + "\n".join(TSV_ROWS) + "\n")
    return tsv


@pytest.mark.parametrize("form", ["chat.json", "ids.txt"])
def test_filter_595k(tmp_path: Path, form: str) -> None:
    wanted = [7, 0, 3, 12]  # 12 is beyond the TSV
    ids = tmp_path / form
    if form == "chat.json":
        ids.write_text(
            json.dumps(
                [
                    {
                        "id": f"GCC_train_{i:09d}",
                        "image": f"GCC_train_{i:09d}.jpg",
                        "conversations": [
                            {"from": "human", "value": "Describe the image concisely.\n<image>"},
                            {"from": "gpt", "value": "x"},
                        ],
                    }
                    for i in wanted
                ]
            )
        )
    else:
        ids.write_text("7\n\n0\nGCC_train_000000003.jpg\n12\n")
    out = tmp_path / "filtered.tsv"
    assert filter_595k.main(["--tsv", str(_tsv(tmp_path)), "--ids", str(ids), "--out", str(out)]) == 0
    assert out.read_text().splitlines() == ["caption\turl", TSV_ROWS[0], TSV_ROWS[3], TSV_ROWS[7]]
    # A TSV that already has the header gives the same rows.
    out2 = tmp_path / "filtered2.tsv"
    assert (
        filter_595k.main(["--tsv", str(_tsv(tmp_path, header=True)), "--ids", str(ids), "--out", str(out2)])
        == 0
    )
    assert out2.read_text() == out.read_text()


def test_filter_595k_bad_id(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("1\nnot-an-id\n")
    with pytest.raises(ValueError, match="ids.txt:2"):
        filter_595k.load_ids(ids)


# --------------------------------------------------------------------------------------------
# llava_instruct/validate


def _instruct_folder(tmp_path: Path) -> tuple[Path, list[dict]]:
    root = tmp_path / "data"
    (root / "coco" / "train2017").mkdir(parents=True)
    (root / "vg" / "VG_100K").mkdir(parents=True)
    for name in ("coco/train2017/a.jpg", "coco/train2017/b.jpg", "vg/VG_100K/c.jpg"):
        Image.new("RGB", (16, 16), (0, 128, 0)).save(root / name)
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Green."}]
    records = [
        {"id": "a", "image": "coco/train2017/a.jpg", "conversations": conv},
        {"id": "a2", "image": "coco/train2017/a.jpg", "conversations": conv},
        {"id": "pair", "image": ["coco/train2017/b.jpg", "vg/VG_100K/c.jpg"], "conversations": conv},
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        },
    ]
    return root, records


def _validate(tmp_path: Path, root: Path, records: list[dict], *extra: str) -> tuple[int, Path]:
    src = tmp_path / "instruct.json"
    src.write_text(json.dumps(records))
    report = tmp_path / "bad.jsonl"
    rc = validate.main(
        ["--json", str(src), "--image-root", str(root), "--report", str(report), "--workers", "2", *extra]
    )
    return rc, report


def test_validate_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, records = _instruct_folder(tmp_path)
    rc, report = _validate(tmp_path, root, records, "--check-decode")
    assert rc == 0
    assert report.read_text() == ""
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        "total 4 samples" in line and "text-only 1" in line and "missing 0" in line and "unreadable 0" in line
    )


def test_validate_finds_missing_and_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, records = _instruct_folder(tmp_path)
    (root / "vg" / "VG_100K" / "c.jpg").unlink()  # missing, inside a two-image sample
    good = (root / "coco" / "train2017" / "b.jpg").read_bytes()
    (root / "coco" / "train2017" / "b.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "coco" / "train2017" / "junk.jpg").write_bytes(b"\x00" * 100)
    records.append(
        {"id": "junk", "image": "coco/train2017/junk.jpg", "conversations": records[0]["conversations"]}
    )
    records.append({"id": "weird", "image": 5, "conversations": records[0]["conversations"]})

    rc, report = _validate(tmp_path, root, records, "--check-decode")
    assert rc == 1
    bad = [json.loads(line) for line in report.read_text().splitlines()]
    assert [b["id"] for b in bad] == ["pair", "junk", "weird"]
    pair_errors = {p["path"]: p["error"] for p in bad[0]["problems"]}
    assert pair_errors["vg/VG_100K/c.jpg"] == "missing"
    assert pair_errors["coco/train2017/b.jpg"].startswith("unreadable")
    assert bad[1]["problems"][0]["error"].startswith("unreadable")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "missing 1" in line and "unreadable 2" in line and "bad samples 3" in line

    # Without --check-decode only the missing file (and the invalid field) count.
    rc, report = _validate(tmp_path, root, records)
    assert rc == 1
    assert [json.loads(line)["id"] for line in report.read_text().splitlines()] == ["pair", "weird"]
