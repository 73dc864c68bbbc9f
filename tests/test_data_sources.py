"""Data sources: caption shards (cut tars, failing `pipe:` commands, strict mode), instruction JSON,
mixture, collator and the data module, with skips counted."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import Numbers, quiet_trainer
from PIL import Image
from torch.utils.data import DataLoader

from llava_lightning import LlavaModel
from llava_lightning.data.captions import CaptionShards, expand_urls
from llava_lightning.data.collate import LlavaCollator
from llava_lightning.data.datamodule import LlavaDataModule, SourceConfig
from llava_lightning.data.image import ImageTransform
from llava_lightning.data.instruct import InstructionDataset, InstructionIndex
from llava_lightning.data.mixture import WeightedMixture
from llava_lightning.data.sample import SKIP, SampleEncoder, StrictModeError


@pytest.fixture(scope="module")
def model():
    return LlavaModel.from_preset("tiny")


def _encoder(model, template="plain", strict=False, max_length=256):
    return SampleEncoder(
        template=template,
        tokenizer=model.tokenizer,
        transform=ImageTransform.from_tower(model.vision_tower),
        num_image_tokens=model.vision_tower.num_tokens,
        max_length=max_length,
        strict=strict,
    )


def _image_bytes(seed, fmt="JPEG", size=(40, 30)):
    arr = np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _write_shard(path, samples, truncate_at=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:truncate_at] if truncate_at else data)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 good shards of 5 samples (jpg/png/webp) + one shard with a corrupt image and a caption-less sample."""
    root = tmp_path_factory.mktemp("shards")
    fmts = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    n = 0
    for s in range(3):
        samples = []
        for _ in range(5):
            ext, fmt = fmts[n % 3]
            meta = json.dumps({"key": f"{n:09d}"}).encode()
            samples.append(
                (f"{n:09d}", {ext: _image_bytes(n, fmt), "txt": f"caption {n}".encode(), "json": meta})
            )
            n += 1
        _write_shard(root / f"shard-{s:05d}.tar", samples)
    bad = [
        ("900000000", {"jpg": b"not an image", "txt": b"broken"}),
        ("900000001", {"jpg": _image_bytes(1)}),
        ("900000002", {"jpg": _image_bytes(2), "txt": b"fine"}),
    ]
    _write_shard(root / "shard-00003.tar", bad)
    return root


def _drain(dataset, workers=0, batch_size=4, model=None):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=LlavaCollator(0))
    captions, skipped = [], Counter()
    for batch in loader:
        skipped.update(batch["skipped"])
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            captions.append(model.tokenizer.decode(ids[labels != -100]).strip() if model else None)
    return captions, skipped


def test_caption_shards_cover_every_sample_once_and_count_skips(model, shards):
    urls = str(shards / "shard-{00000..00003}.tar")
    assert len(expand_urls(urls)) == 4
    ds = CaptionShards(urls, _encoder(model), shuffle_buffer=4, seed=1)
    captions, skipped = _drain(ds, workers=2, model=model)
    expected = [f"caption {i}" for i in range(15)] + ["fine"]
    assert sorted(captions) == sorted(expected)
    assert skipped == {"bad_image": 1, "malformed_record": 1}


def test_truncated_tar_is_a_counted_skip_and_the_stream_goes_on(model, shards, tmp_path):
    good = (shards / "shard-00000.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(good[: len(good) // 2 + 100])
    (tmp_path / "b.tar").write_bytes((shards / "shard-00001.tar").read_bytes())
    ds = CaptionShards(
        [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")],
        _encoder(model),
        shuffle_shards=False,
        shuffle_buffer=0,
    )
    captions, skipped = _drain(ds, model=model)
    assert skipped["bad_shard"] == 1
    assert {f"caption {i}" for i in range(5, 10)} <= set(captions)


def test_pipe_file_and_fsspec_urls(model, shards):
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/mem/shard.tar", (shards / "shard-00002.tar").read_bytes())
    memory.pipe("/mem/sizes.json", b'{"shard.tar": 5}')  # remote shards need their sizes
    for url, sizes in [
        (f"pipe:cat {shards}/shard-00002.tar", {"shard-00002.tar": 5}),
        (f"file://{shards}/shard-00002.tar", None),
        ("memory:///mem/shard.tar", None),
    ]:
        ds = CaptionShards(url, _encoder(model), shuffle_buffer=0, sizes=sizes)
        captions, _ = _drain(ds, model=model)
        assert sorted(captions) == [f"caption {i}" for i in range(10, 15)], url


def test_resampled_mode_has_a_fixed_epoch_length(model, shards):
    ds = CaptionShards(
        str(shards / "shard-{00000..00002}.tar"), _encoder(model), resampled=True, epoch_length=11
    )
    captions, skipped = _drain(ds, workers=2, model=model)
    assert len(captions) + sum(skipped.values()) == 11
    with pytest.raises(ValueError, match="epoch_length"):
        CaptionShards(str(shards / "shard-00000.tar"), _encoder(model), resampled=True)


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    (root / "images").mkdir()
    for i in range(3):
        (root / "images" / f"{i}.jpg").write_bytes(_image_bytes(i))
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    q = lambda text: {"from": "human", "value": text}  # noqa: E731
    a = lambda text: {"from": "gpt", "value": text}  # noqa: E731
    records = [
        {
            "id": "one",
            "image": "images/0.jpg",
            "conversations": [q("<image>\nColour?"), a("Red."), q("Shape?"), a("Circle.")],
        },
        {
            "id": "two",
            "image": ["images/1.jpg", "images/2.jpg"],
            "conversations": [q("<image>\n<image>\nSame?"), a("No.")],
        },
        {"id": "text", "conversations": [q("How many sides has a triangle?"), a("Three.")]},
        {"id": "missing", "image": "images/nope.jpg", "conversations": [q("<image>\nColour?"), a("Blue.")]},
        {
            "id": "corrupt",
            "image": "images/corrupt.jpg",
            "conversations": [q("<image>\nColour?"), a("Blue.")],
        },
        {"id": "order", "conversations": [a("Hi."), q("Hello?")]},
        {"id": "count", "image": "images/0.jpg", "conversations": [q("No placeholder"), a("Hm.")]},
        {"id": "nofield"},
    ]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_instruction_json_index_is_compact_and_samples_encode(model, instruct):
    index = InstructionIndex(instruct)
    assert len(index) == 8 and isinstance(index.buffer, bytes) and index.offsets.dtype == np.int64
    assert list(index.num_images) == [1, 2, 0, 1, 1, 0, 1, 0]
    ds = InstructionDataset(index, instruct.parent, _encoder(model, "vicuna_v1"))
    one, two, text = ds[0], ds[1], ds[2]
    size = model.vision_tower.image_size
    assert one["pixel_values"].shape == (1, 3, size, size) and two["pixel_values"].shape[0] == 2
    assert text["pixel_values"].shape[0] == 0
    image_id = model.image_token_id
    assert int((two["input_ids"] == image_id).sum()) == 2 * model.vision_tower.num_tokens
    reasons = [ds[i].get(SKIP) for i in range(3, 8)]
    assert reasons == [
        "missing_image",
        "bad_image",
        "bad_turn_order",
        "image_count_mismatch",
        "malformed_record",
    ]
    assert "id=missing" in ds[3]["where"]


def test_strict_mode_raises_naming_the_record(model, instruct):
    ds = InstructionDataset(instruct, instruct.parent, _encoder(model, "vicuna_v1", strict=True))
    with pytest.raises(StrictModeError, match=r"data.json\[3\] id=missing"):
        ds[3]


def test_collator_pads_right_and_batches_mixed_images(model, instruct):
    ds = InstructionDataset(instruct, instruct.parent, _encoder(model, "vicuna_v1"))
    batch = LlavaCollator(pad_token_id=model.tokenizer.pad_token_id)([ds[i] for i in range(5)])
    assert batch["skipped"] == {"missing_image": 1, "bad_image": 1}
    keys = {"input_ids", "attention_mask", "labels", "pixel_values", "skipped", "right_padded"}  # LlavaBatch
    assert set(batch) == keys and batch["right_padded"] is True
    image_runs = (batch["input_ids"] == model.image_token_id).sum(1) // model.vision_tower.num_tokens
    assert image_runs.tolist() == [1, 2, 0]
    assert batch["pixel_values"].shape[0] == 3
    lengths = batch["attention_mask"].sum(1)
    for i, n in enumerate(lengths):  # each row 1...1 0...0, as `right_padded` says
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["input_ids"][i, n:] == model.tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == -100).all()
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    assert torch.isfinite(out.loss)
    text_only = LlavaCollator(0)([ds[2]])
    assert text_only["pixel_values"] is None


def test_weighted_mixture_has_exact_length_and_follows_weights(model, instruct, shards):
    captions = CaptionShards(
        str(shards / "shard-{00000..00002}.tar"), _encoder(model), resampled=True, epoch_length=10**6
    )
    index = InstructionDataset(instruct, instruct.parent, _encoder(model))
    mix = WeightedMixture([captions, index], [3.0, 1.0], epoch_length=200, seed=0)

    def kind(sample):
        if SKIP in sample:
            return "skip"
        text = model.tokenizer.decode(sample["input_ids"][sample["labels"] != -100])
        return "caption" if text.startswith("caption") else "instruct"

    kinds = Counter(kind(s) for s in mix)
    assert sum(kinds.values()) == 200 and kinds["instruct"] > 0
    assert 0.6 < kinds["caption"] / 200 < 0.9


def test_datamodule_takes_settings_from_the_model_and_counts(model, instruct, shards):
    dm = LlavaDataModule(
        train=[SourceConfig(kind="instruct", path=str(instruct), image_root=str(instruct.parent))],
        val=[SourceConfig(kind="captions", path=str(shards / "shard-{00000..00003}.tar"))],
        template="vicuna_v1",
        batch_size=4,
        num_workers=0,
    )
    dm.connect(model)
    assert dm.encoder.transform.size == model.vision_tower.image_size
    assert dm.encoder.num_image_tokens == model.vision_tower.num_tokens
    for batch in dm.train_dataloader():
        dm.count(batch)
        if len(batch["input_ids"]):
            model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    summary = dm.epoch_summary()
    assert summary["samples_seen"] == 8
    assert summary["skipped/missing_image"] == 1 and summary["skipped/malformed_record"] == 1
    assert sum(v for k, v in summary.items() if k.startswith("skipped/")) == 5
    assert dm.epoch_summary()["samples_seen"] == 0
    val = list(dm.val_dataloader())
    assert sum(len(b["input_ids"]) for b in val) == 16


def test_uint8_pixels_normalised_by_the_model_equal_the_float_transform(model, instruct):
    ds_float = InstructionDataset(instruct, instruct.parent, _encoder(model, "vicuna_v1"))
    enc8 = _encoder(model, "vicuna_v1")
    enc8.uint8_pixels = True
    enc8.__post_init__()
    ds_uint8 = InstructionDataset(instruct, instruct.parent, enc8)
    raw = ds_uint8[1]["pixel_values"]
    assert raw.dtype == torch.uint8 and raw.shape == (
        2,
        3,
        model.vision_tower.image_size,
        model.vision_tower.image_size,
    )
    torch.testing.assert_close(model.normalize_pixels(raw), ds_float[1]["pixel_values"], rtol=1e-5, atol=1e-5)


def test_datamodule_parses_from_yaml_with_typed_sources():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LlavaDataModule, "data")
    cfg = parser.parse_string(
        "data:\n"
        "  train:\n"
        "    - {kind: captions, path: 'shards/shard-{00000..00009}.tar', resampled: true, epoch_length: 1000}\n"
        "  template: plain\n"
        "  batch_size: 32\n"
        "  strict: true\n"
    )
    init = parser.instantiate(cfg)
    dm = init.data
    assert dm.batch_size == 32 and dm.strict and dm.template == "plain"
    assert isinstance(dm.train_sources[0], SourceConfig) and dm.train_sources[0].epoch_length == 1000
    with pytest.raises(Exception, match="captions"):
        parser.parse_string("data:\n  train:\n    - {kind: parquet, path: x}\n")


def test_trainer_run_logs_seen_and_skipped_per_epoch(model, instruct, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import Logger

    class Recorder(Logger):
        name, version = "rec", 0
        rows = []

        @property
        def experiment(self):
            return None

        def log_metrics(self, metrics, step=None):
            if "data/samples_seen" in metrics:
                self.rows.append(metrics)

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, idx):
            return self.model(
                batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]
            ).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.multi_modal_projector.parameters(), lr=0.0)

    dm = LlavaDataModule(
        train=[SourceConfig(kind="instruct", path=str(instruct), image_root=str(instruct.parent))],
        template="vicuna_v1",
        batch_size=8,
        num_workers=0,
    )
    recorder = Recorder()
    trainer = quiet_trainer(tmp_path, max_epochs=2, logger=recorder)
    trainer.fit(Lit(), datamodule=dm)
    assert [r["data/epoch"] for r in recorder.rows] == [0.0, 1.0]
    for row in recorder.rows:
        assert row["data/samples_seen"] == 8
        assert row["data/skipped/missing_image"] == 1 and row["data/skipped/bad_turn_order"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_loader_resumes_after_the_consumed_batches(workers):
    from llava_lightning.data.mixture import WeightedMixture
    from llava_lightning.data.sampler import ResumableDataLoader

    def loader():
        mix = WeightedMixture([Numbers(0, 50), Numbers(1000, 30)], [2.0, 1.0], epoch_length=40, seed=3)
        return ResumableDataLoader(mix, batch_size=4, num_workers=workers)

    full = [b.tolist() for b in loader()]
    first = loader()
    it = iter(first)
    seen = [next(it).tolist() for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 3} and seen == full[:3]
    resumed = loader()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == full[3:]
    assert [b.tolist() for b in resumed] == full  # the offset applied to one pass only


# -- bad input at the edges: elongated images, broken and cut shards, failing pipe: commands -------


def test_an_extremely_elongated_image_is_a_counted_bad_image_skip(model, tmp_path):
    tall = io.BytesIO()
    Image.new("L", (1, 100_000)).save(tall, "PNG")  # under 300 bytes; its padded square: 10^10 pixels
    samples = [("0", {"png": tall.getvalue(), "txt": b"tall"}), ("1", {"jpg": _image_bytes(1), "txt": b"ok"})]
    _write_shard(tmp_path / "s.tar", samples)
    for aspect in ("pad", "square"):
        encoder = _encoder(model)
        encoder.transform = ImageTransform.from_tower(model.vision_tower, aspect=aspect)
        captions, skipped = _drain(
            CaptionShards(str(tmp_path / "s.tar"), encoder, shuffle_buffer=0), model=model
        )
        assert captions == ["ok"] and skipped == {"bad_image": 1}, aspect


def _member_offsets(path):
    """Byte offsets of the tar headers of `path`'s members, in order."""
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def _items(url, **kwargs):
    from llava_lightning.data.captions import iter_tar_samples

    return list(iter_tar_samples(url, **kwargs))


def test_a_tar_cut_at_a_member_boundary_is_a_counted_bad_shard(model, shards, tmp_path):
    from llava_lightning.data.captions import count_samples

    whole = shards / "shard-00000.tar"  # 5 samples of 3 members (jpg, txt, json)
    data, offsets = whole.read_bytes(), _member_offsets(whole)
    cuts = {
        "after sample 2": offsets[9],  # no end-of-archive blocks: samples 3 and 4 are lost
        "inside sample 2": offsets[7],  # between its jpg and its txt
        "inside a header": offsets[9] + 100,
    }
    for name, cut in cuts.items():
        path = tmp_path / f"cut-{cut}.tar"
        path.write_bytes(data[:cut])
        for url in (str(path), f"pipe:cat {path}"):
            items = _items(url)
            assert [i.get("__key__") for i in items[:2]] == ["000000000", "000000001"], (name, url)
            assert len(items) == 3 and items[2][SKIP] == "bad_shard", (name, url)
            assert "end-of-archive" in items[2]["detail"] and f"cut-{cut}.tar" in items[2]["where"]
        assert count_samples(str(path)) == 3, name  # the same items, without a sizes.json
        captions, skipped = _drain(CaptionShards(str(path), _encoder(model), shuffle_buffer=0), model=model)
        assert sorted(captions) == ["caption 0", "caption 1"] and skipped == {"bad_shard": 1}, name


def test_well_formed_shards_are_unaffected_by_the_end_of_archive_check(tmp_path):
    from webdataset import TarWriter

    from llava_lightning.data.captions import count_samples

    with TarWriter(str(tmp_path / "wds.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:04d}", "jpg": b"jpeg", "txt": f"caption {i}".encode()})
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with tarfile.open(tmp_path / "gz.tar.gz", "w:gz") as tar:
        for i in range(2):
            info = tarfile.TarInfo(f"{i:04d}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    for name, n in [("wds.tar", 3), ("empty.tar", 0), ("gz.tar.gz", 2)]:
        url = str(tmp_path / name)
        for source in (url, f"pipe:cat {url}"):
            items = _items(source)
            assert len(items) == n and not any(SKIP in i for i in items), source
        assert count_samples(url) == n, name
    assert (tmp_path / "empty.tar").stat().st_size > 0  # well-formed: its end-of-archive blocks


def test_strict_mode_raises_on_a_broken_shard_naming_it_but_not_on_padding(
    model, shards, tmp_path, monkeypatch
):
    from llava_lightning.data import captions as captions_module

    good = (shards / "shard-00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(good[: len(good) // 2 + 100])
    strict = _encoder(model, strict=True)
    with pytest.raises(StrictModeError, match=r"cut\.tar:.*ReadError"):
        list(CaptionShards(str(tmp_path / "cut.tar"), strict, shuffle_buffer=0))
    # a stale sizes.json: the shard lacks the samples it promises
    (tmp_path / "short.tar").write_bytes(good)
    with pytest.raises(StrictModeError, match=r"short\.tar:#5: the shard ends before its recorded 7"):
        list(CaptionShards(str(tmp_path / "short.tar"), strict, shuffle_buffer=0, sizes={"short.tar": 7}))
    # padding slots (5 samples over 2 ranks: rank 1 gets 2 samples and 1 padding slot) stay padding
    monkeypatch.setattr(captions_module, "rank_and_world", lambda: (1, 2))
    out = list(CaptionShards(str(tmp_path / "short.tar"), strict, shuffle_buffer=0))
    assert [s.get(SKIP) for s in out] == [None, None, "padding"]


def _children() -> set[int]:
    """Process ids whose parent is this process, zombies included (read from /proc)."""
    import os

    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # exited meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                pids.add(int(entry))
    return pids


def _ended(pid: int, within: float = 5.0) -> bool:
    """Whether process `pid` has ended (gone, or a zombie), waiting up to `within` seconds."""
    import time

    deadline = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in "ZX":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_pipe_commands_are_reaped_and_a_failing_one_is_a_bad_shard(model, shards, tmp_path):
    shard = shards / "shard-00002.tar"  # captions 10..14
    before = _children()
    ok = _items(f"pipe:cat {shard}")
    assert [i["txt"] for i in ok] == [f"caption {i}".encode() for i in range(10, 15)]
    # stopping early terminates the command and what it started (not a failure), even a slow one;
    # a long shard, so that the reader stops well before the end it would wait for
    _write_shard(tmp_path / "long.tar", [(f"{i:03d}", {"txt": b"%03d" % i * 500}) for i in range(12)])
    pid_file = tmp_path / "sleeper.pid"  # a process the command's shell starts before writing
    slow = f"pipe:sh -c 'sleep 60 & echo $! > {pid_file}; cat {tmp_path / 'long.tar'}; wait'"
    early = _items(slow, stop=2)
    assert [i["__key__"] for i in early] == ["000", "001"]
    assert _ended(int(pid_file.read_text()))
    assert _items(f"pipe:cat {shard}", start=1, stop=3)[0]["txt"] == b"caption 11"
    # a command that fails after writing a complete tar: its last sample becomes the bad_shard marker
    failing = f"pipe:sh -c 'cat {shard}; exit 3'"
    items = _items(failing)
    assert [i.get("txt") for i in items[:4]] == [f"caption {i}".encode() for i in range(10, 14)]
    assert items[4][SKIP] == "bad_shard" and "exit 3" in items[4]["detail"]
    assert "exited with status 3" in items[4]["detail"]
    captions, skipped = _drain(
        CaptionShards(failing, _encoder(model), shuffle_buffer=0, sizes={failing: 5}), model=model
    )
    assert len(captions) == 4 and skipped == {"bad_shard": 1}
    with pytest.raises(StrictModeError, match="exited with status 3"):
        list(CaptionShards(failing, _encoder(model, strict=True), shuffle_buffer=0, sizes={failing: 5}))
    assert _children() <= before  # every command was reaped: no zombies, nothing left running
