"""Records that name images: paths confined to image_root, malformed records counted, never a crash."""

import io
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

import llava_lightning.data.sample as sample_module
from llava_lightning import LlavaModel
from llava_lightning.data.image import ImageTransform
from llava_lightning.data.image_paths import ImagePathError, ImageRoot, record_image_paths
from llava_lightning.data.instruct import InstructionDataset, InstructionIndex
from llava_lightning.data.prompts import PromptDataset
from llava_lightning.data.sample import SKIP, SampleEncoder, StrictModeError


@pytest.fixture(scope="module")
def model():
    return LlavaModel.from_preset("tiny")


def _encoder(model, strict=False):
    return SampleEncoder(
        template="vicuna_v1",
        tokenizer=model.tokenizer,
        transform=ImageTransform.from_tower(model.vision_tower),
        num_image_tokens=model.vision_tower.num_tokens,
        max_length=256,
        strict=strict,
    )


def _jpeg(seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (24, 32, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def _conv(question="<image>\nColour?"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "Red."}]


@pytest.fixture
def layout(tmp_path):
    """root/ with a good image, a link to it, a link out, a FIFO and a folder; outside/ with a readable image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (root / "images" / "ok.jpg").write_bytes(_jpeg(0))
    (outside / "secret.jpg").write_bytes(_jpeg(1))
    os.symlink(root / "images" / "ok.jpg", root / "images" / "link_in.jpg")
    os.symlink(outside / "secret.jpg", root / "images" / "link_out.jpg")
    os.mkfifo(root / "images" / "fifo.jpg")
    (root / "images" / "folder.jpg").mkdir()
    return root, outside


def _dataset(tmp_path, root, images, model, strict=False, follow_links=False):
    records = [{"id": f"r{i}", "image": image, "conversations": _conv()} for i, image in enumerate(images)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return InstructionDataset(path, root, _encoder(model, strict), follow_links=follow_links)


@pytest.fixture
def no_hang():
    """A read that blocks (a FIFO) fails the test after 20 s instead of hanging the suite."""

    def alarm(*_):
        raise TimeoutError("reading an image path blocked")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_image_paths_leaving_the_root_are_counted_skips_and_never_opened(
    tmp_path, layout, model, monkeypatch, no_hang
):
    root, outside = layout
    opened = []
    decode = sample_module.decode_image
    monkeypatch.setattr(
        sample_module, "decode_image", lambda src, **kw: opened.append(str(src)) or decode(src, **kw)
    )
    images = [
        "images/ok.jpg",
        "images/link_in.jpg",  # a link that stays inside the root
        "../outside/secret.jpg",
        str(outside / "secret.jpg"),  # absolute
        "images/link_out.jpg",
        "images/../../outside/secret.jpg",
        "images/fifo.jpg",
        "images/folder.jpg",
        "/etc/passwd",
    ]
    ds = _dataset(tmp_path, root, images, model)
    got = [ds[i].get(SKIP) for i in range(len(images))]
    assert got == [None, None] + ["path_outside_root"] * 4 + ["not_a_file", "not_a_file", "path_outside_root"]
    assert all(os.path.realpath(p).startswith(os.path.realpath(root)) for p in opened) and len(opened) == 2
    assert "r2" in ds[2]["where"]


def test_strict_mode_names_the_record_that_leaves_the_root(tmp_path, layout, model):
    root, _ = layout
    ds = _dataset(tmp_path, root, ["images/ok.jpg", "../outside/secret.jpg"], model, strict=True)
    assert SKIP not in ds[0]
    with pytest.raises(StrictModeError, match=r"data.json\[1\] id=r1.*outside image_root"):
        ds[1]


def test_follow_links_admits_links_out_but_never_dot_dot_or_absolute_paths(tmp_path, layout, model):
    root, outside = layout
    images = ["images/link_out.jpg", "../outside/secret.jpg", str(outside / "secret.jpg")]
    ds = _dataset(tmp_path, root, images, model, follow_links=True)
    assert [ds[i].get(SKIP) for i in range(3)] == [None, "path_outside_root", "path_outside_root"]


def test_a_root_that_is_itself_a_link_is_followed(tmp_path, layout, model):
    root, _ = layout
    os.symlink(root, tmp_path / "alias")
    ds = _dataset(tmp_path, tmp_path / "alias", ["images/ok.jpg", "images/link_out.jpg"], model)
    assert [ds[i].get(SKIP) for i in range(2)] == [None, "path_outside_root"]


def test_predict_refuses_a_path_outside_the_root_naming_the_record(tmp_path, layout):
    root, _ = layout
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"id": "p0", "image": "../outside/secret.jpg", "conversations": _conv()}]))
    with pytest.raises(ValueError, match=r"record 0 \(id 'p0'\).*outside image_root"):
        PromptDataset(path, root)[0]


@pytest.mark.parametrize("image", [5, True, 1.5, [1], ["ok.jpg", None], {"a": 1}, ""])
def test_an_image_field_that_is_not_a_path_is_a_malformed_record(tmp_path, model, image):
    (tmp_path / "ok.jpg").write_bytes(_jpeg())
    records = [
        {"id": "bad", "image": image, "conversations": _conv()},
        {"id": "good", "image": "ok.jpg", "conversations": _conv()},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ImagePathError, match="'image' must be a path"):
        record_image_paths(records[0])
    ds = InstructionDataset(InstructionIndex(path), tmp_path, _encoder(model))  # indexing does not fail
    assert ds[0][SKIP] == "malformed_record" and SKIP not in ds[1]


@pytest.mark.parametrize(
    "conversations", [["<image>\nhi", "there"], [None, None], [{"from": "human", "value": "<image>\nhi"}, 3]]
)
def test_turns_that_are_not_objects_are_a_malformed_record(tmp_path, model, conversations):
    (tmp_path / "ok.jpg").write_bytes(_jpeg())
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": "t", "image": "ok.jpg", "conversations": conversations}]))
    assert InstructionDataset(path, tmp_path, _encoder(model))[0][SKIP] == "malformed_record"
    with pytest.raises(StrictModeError, match=r"id=t.*turn"):
        InstructionDataset(path, tmp_path, _encoder(model, strict=True))[0]


def test_any_other_error_of_one_sample_is_a_counted_skip_outside_strict_mode(tmp_path, model, monkeypatch):
    (tmp_path / "ok.jpg").write_bytes(_jpeg())
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": "x", "image": "ok.jpg", "conversations": _conv()}]))

    def broken(*args, **kwargs):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(sample_module, "decode_image", broken)
    assert InstructionDataset(path, tmp_path, _encoder(model))[0][SKIP] == "encode_error"
    with pytest.raises(StrictModeError, match="MemoryError"):
        InstructionDataset(path, tmp_path, _encoder(model, strict=True))[0]


def test_image_root_resolve_reports_missing_files_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        ImageRoot(tmp_path).resolve("nope.jpg")
