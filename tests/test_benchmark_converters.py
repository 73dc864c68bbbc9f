"""data_recipes/benchmarks/to_eval.py: tiny fake releases of each benchmark (no downloads) -> LLaVA's
question files, in LLaVA-1.5's prompt layout, that `evaluate` reads."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_recipes.benchmarks import to_eval
from data_recipes.benchmarks.common import OPTION_LETTER, SHORT_ANSWER, UNANSWERABLE, Skips, check_images
from llava_lightning.eval.evaluate import load_questions


def _png(path: Path | None = None) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), "red").save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _convert(tmp_path: Path, *argv: str) -> list[dict]:
    out = tmp_path / "questions.jsonl"
    assert to_eval.main([*argv, "--out", str(out)]) == 0
    return load_questions(out)  # what evaluate reads


def test_textvqa_with_and_without_ocr(tmp_path):
    data = {"data": [{"question": "what brand is it?", "image_id": "abc", "question_id": 7, "answers": ["x"] * 10},
                     {"question": "what year?", "image_id": "def", "question_id": 8, "answers": ["y"] * 10}]}  # fmt: skip
    (tmp_path / "val.json").write_text(json.dumps(data))
    (tmp_path / "ocr.json").write_text(
        json.dumps({"data": [{"image_id": "abc", "ocr_tokens": ["nikon", "d90"]}]})
    )
    plain = _convert(tmp_path, "textvqa", "--questions", str(tmp_path / "val.json"))
    assert plain[0] == {"question_id": 7, "image": "abc.jpg", "text": f"what brand is it?\n{SHORT_ANSWER}"}
    ocr = _convert(
        tmp_path, "textvqa", "--questions", str(tmp_path / "val.json"), "--ocr", str(tmp_path / "ocr.json")
    )
    assert ocr[0]["text"] == f"what brand is it?\nReference OCR token: nikon, d90\n{SHORT_ANSWER}"
    assert ocr[1]["text"] == f"what year?\n{SHORT_ANSWER}"  # no tokens: no OCR line


def test_vqav2_image_names_follow_the_split(tmp_path):
    data = {
        "data_subtype": "test-dev2015",
        "questions": [{"image_id": 262144, "question": "Is it?", "question_id": 262144000}],
    }
    (tmp_path / "q.json").write_text(json.dumps(data))
    (q,) = _convert(tmp_path, "vqav2", "--questions", str(tmp_path / "q.json"))
    assert q == {
        "question_id": 262144000,
        "image": "COCO_test2015_000000262144.jpg",
        "text": f"Is it?\n{SHORT_ANSWER}",
    }


def test_vizwiz_and_gqa(tmp_path):
    (tmp_path / "val.json").write_text(
        json.dumps([{"image": "VizWiz_val_00000001.jpg", "question": "What is this?"}])
    )
    (q,) = _convert(tmp_path, "vizwiz", "--questions", str(tmp_path / "val.json"))
    assert q["question_id"] == q["image"] == "VizWiz_val_00000001.jpg"
    assert q["text"] == f"What is this?\n{UNANSWERABLE}\n{SHORT_ANSWER}"
    (tmp_path / "gqa.json").write_text(
        json.dumps({"20968153": {"imageId": "n1", "question": "Is the cup red?", "answer": "yes"}})
    )
    (q,) = _convert(tmp_path, "gqa", "--questions", str(tmp_path / "gqa.json"))
    assert q == {"question_id": "20968153", "image": "n1.jpg", "text": f"Is the cup red?\n{SHORT_ANSWER}"}


def test_pope_numbers_over_splits_and_keeps_the_split(tmp_path):
    for split in ("adversarial", "random"):
        lines = [
            {
                "question_id": i,
                "image": f"COCO_val2014_{i:012d}.jpg",
                "text": "Is there a dog in the image?",
                "label": "yes",
            }
            for i in (1, 2)
        ]
        (tmp_path / f"coco_pope_{split}.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    questions = _convert(tmp_path, "pope", "--labels", str(tmp_path), "--splits", "adversarial", "random")
    assert [q["question_id"] for q in questions] == [1, 2, 3, 4]
    assert [q["category"] for q in questions] == ["adversarial"] * 2 + ["random"] * 2
    assert questions[2]["text"] == f"Is there a dog in the image?\n{SHORT_ANSWER}"
    with pytest.raises(FileNotFoundError, match="coco_pope_popular.json does not exist"):
        to_eval.pope(tmp_path)


def test_mme_both_release_layouts(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    _png(root / "artwork" / "images" / "10002.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Bosch? Please answer yes or no.\tYes\nIs this artwork created by Dali? Please answer yes or no.\tNo\n"
    )
    _png(root / "count" / "0001.png")
    (root / "count" / "0001.txt").write_text("Are there two dogs? Please answer yes or no.\tYes\n")
    questions = _convert(tmp_path, "mme", "--release", str(root), "--image_root", str(root))
    assert [(q["question_id"], q["category"]) for q in questions] == [
        ("artwork/images/10002.jpg", "artwork"), ("artwork/images/10002.jpg", "artwork"), ("count/0001.png", "count"),
    ]  # fmt: skip
    assert (
        questions[1]["text"] == f"Is this artwork created by Dali? Please answer yes or no.\n{SHORT_ANSWER}"
    )
    assert all((root / q["image"]).is_file() for q in questions)


def test_mmbench_decodes_images_and_rotates_options(tmp_path):
    image = base64.b64encode(_png()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage"
    rows = [f"3\tWhat colour?\tLook closely.\tred\tblue\tgreen\t\tA\tattribute\t{image}",
            f"4\tWhich shape?\tnan\tcircle\tsquare\tnan\tnan\tB\tshape\t{image}"]  # fmt: skip
    (tmp_path / "dev.tsv").write_text("\n".join([header, *rows]) + "\n")
    images = tmp_path / "mmbench" / "images"
    one = _convert(tmp_path, "mmbench", "--tsv", str(tmp_path / "dev.tsv"), "--image_dir", str(images))
    assert [q["question_id"] for q in one] == [3, 4]
    assert one[0]["text"] == f"Look closely.\nWhat colour?\nA. red\nB. blue\nC. green\n{OPTION_LETTER}"
    assert one[1]["text"] == f"Which shape?\nA. circle\nB. square\n{OPTION_LETTER}"
    assert one[0]["image"] == "images/3.png" and Image.open(images / "3.png").size == (8, 6)
    assert one[0]["options"] == ["red", "blue", "green"] and one[0]["option_char"] == ["A", "B", "C"]
    rounds = _convert(
        tmp_path, "mmbench", "--tsv", str(tmp_path / "dev.tsv"), "--image_dir", str(images), "--all_rounds"
    )
    assert [(q["question_id"], q["round_id"]) for q in rounds] == [(3, 0), (3, 1), (3, 2), (4, 0), (4, 1)]
    assert rounds[1]["options"] == ["blue", "green", "red"]


def test_seed_keeps_image_questions(tmp_path):
    data = {
        "question_type": {"Scene Understanding": 1, "Action Recognition": 10},
        "questions": [
            {"question_id": "101", "data_id": "1454426_2591111986", "data_type": "image", "question": "What is it?",
             "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "answer": "B", "question_type_id": 1},
            {"question_id": "v1", "data_id": "x.mp4", "data_type": "video", "question": "Q", "choice_a": "a",
             "choice_b": "b", "choice_c": "c", "choice_d": "d", "answer": "A", "question_type_id": 10},
        ],
    }  # fmt: skip
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(data))
    (q,) = _convert(tmp_path, "seed", "--questions", str(tmp_path / "SEED-Bench.json"))
    assert q["image"] == "SEED-Bench-image/1454426_2591111986" and q["category"] == "Scene Understanding"
    assert q["text"] == f"What is it?\nA. a\nB. b\nC. c\nD. d\n{OPTION_LETTER}"


def test_bad_release_files_are_named(tmp_path):
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"TextVQA questions .*broken.json is not valid JSON"):
        to_eval.textvqa(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="expected an object with a 'questions' list"):
        to_eval.seed(tmp_path / "list.json")


def test_scienceqa_questions_in_the_llava_layout(tmp_path):
    problems = {
        "5": {"question": "Which is a mammal?", "choices": ["frog", "cat"], "answer": 1, "hint": "Look.",
              "image": "image.png", "split": "test"},
        "6": {"question": "Which is wet?", "choices": ["water", "sand", "dust"], "answer": 0, "hint": "", "image": None,
              "split": "test"},
        "7": {"question": "Broken", "choices": [], "answer": 0, "split": "test"},
    }  # fmt: skip
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["5", "6", "7", "99"]}))
    argv = ["scienceqa", "--problems", str(tmp_path / "problems.json"), "--pid_splits"]
    img, text_only = _convert(tmp_path, *argv, str(tmp_path / "pid_splits.json"))
    assert img["question_id"] == "5" and img["image"] == "test/5/image.png"
    assert img["text"] == f"Context: Look.\nWhich is a mammal?\nA. frog\nB. cat\n{OPTION_LETTER}"
    assert img["answer_letter"] == "B" and "image" not in text_only and text_only["answer_letter"] == "A"
    skips = Skips()
    to_eval.scienceqa(tmp_path / "problems.json", tmp_path / "pid_splits.json", skips=skips)
    assert skips.total == 2  # pid 7 has no choices, pid 99 is not in problems.json


def test_bad_records_are_skipped_counted_and_named(tmp_path, caplog):
    records = [
        {"image": "VizWiz_val_00000001.jpg", "question": "What is this?"},
        {"image": "../../etc/passwd", "question": "Outside?"},  # leaves the image root
        {"image": "/abs/x.jpg", "question": "Absolute?"},
        {"question": "No image?"},
        "not an object",
        {"image": "ok.jpg", "question": ""},
    ]
    (tmp_path / "val.json").write_text(json.dumps(records))
    skips = Skips()
    with caplog.at_level("WARNING"):
        (q,) = to_eval.vizwiz(tmp_path / "val.json", skips)
    assert q["image"] == "VizWiz_val_00000001.jpg"
    assert skips.counts == {"bad record": 4, "missing field": 1} and skips.total == 5
    assert (
        f"{tmp_path / 'val.json'}: record 1: bad record: image path '../../etc/passwd' leaves the image root"
        in caplog.text
    )
    assert "record 3: missing field: 'image'" in caplog.text
    # The CLI prints the counts.
    out = tmp_path / "q.jsonl"
    to_eval.main(["vizwiz", "--questions", str(tmp_path / "val.json"), "--out", str(out)])
    assert len(out.read_text().splitlines()) == 1


def test_pope_bad_lines_are_counted(tmp_path):
    good = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"}
    (tmp_path / "coco_pope_random.json").write_text(
        json.dumps(good) + "\nnot json\n" + json.dumps({"image": "b.jpg"}) + "\n"
    )
    skips = Skips()
    (q,) = to_eval.pope(tmp_path, ("random",), skips)
    assert q == {
        "question_id": 1,
        "image": "a.jpg",
        "text": f"Is there a cat in the image?\n{SHORT_ANSWER}",
        "category": "random",
    }
    assert skips.counts == {"bad record": 1, "missing field": 1}


def test_mmbench_bad_rows_never_write_outside_the_image_dir(tmp_path):
    image = base64.b64encode(_png()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage"
    rows = [
        f"../../evil\tQ?\tnan\tx\ty\tnan\tnan\tA\tc\t{image}",  # index names the file: refused
        "5\tQ?\tnan\tx\ty\tnan\tnan\tA\tc\tnot-base64!",
        f"1000006\tQ?\tnan\tx\ty\tnan\tnan\tB\tc\t{image}",
    ]  # a circular copy: a question of its own
    (tmp_path / "dev.tsv").write_text("\n".join([header, *rows]) + "\n")  # fmt: skip
    skips = Skips()
    (q,) = to_eval.mmbench(tmp_path / "dev.tsv", tmp_path / "root" / "images", skips=skips)
    assert q["question_id"] == 1000006 and q["round_id"] == 0
    assert skips.counts == {"bad record": 2}
    assert sorted(p.name for p in (tmp_path / "root" / "images").iterdir()) == ["1000006.png"]
    assert not (tmp_path / "evil.png").exists()


def test_mme_skips_links_out_of_the_release_and_questions_without_images(tmp_path):
    root = tmp_path / "MME"
    _png(root / "count" / "0001.png")
    (root / "count" / "0001.txt").write_text("Two dogs? Please answer yes or no.\tYes\nno tab here\n")
    (root / "count" / "0002.txt").write_text("No image? Please answer yes or no.\tNo\n")
    outside = tmp_path / "elsewhere"
    _png(outside / "0003.png")
    (outside / "0003.txt").write_text("Outside? Please answer yes or no.\tNo\n")
    (root / "existence").symlink_to(outside, target_is_directory=True)
    skips = Skips()
    (q,) = to_eval.mme(root, skips)
    assert q["question_id"] == "count/0001.png" and q["category"] == "count"
    assert skips.counts == {"bad record": 1, "no image": 1, "outside the root": 1}


def test_check_images_counts_missing_and_refused(tmp_path):
    _png(tmp_path / "root" / "a.png")
    _png(tmp_path / "secret.png")
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "secret.png")  # inside the root, leads out
    questions = [{"question_id": i, "image": name} for i, name in enumerate(["a.png", "b.png", "link.png"])]
    assert check_images(questions, tmp_path / "root") == {"image missing": 1, "image refused": 1}
