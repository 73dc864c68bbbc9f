"""`SampleReplies`: validation logs the model's greedy replies to fixed held-out samples with their images
(TensorBoard read back from its event files), under one process, DDP and FSDP2."""

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, quiet_trainer
from PIL import Image

CONF = REPO / "conf"


def _expected_samples(shapes_dir, n):
    """The first `n` records of val.json with an image, read here without the callback's code:
    (image as RGB array, prompt without its `<image>` line, first gpt turn)."""
    records = json.loads((shapes_dir / "instruct" / "val.json").read_text())
    out = []
    for r in records:
        if r.get("image") and len(out) < n:
            first = r["conversations"][0]["value"]
            prompt = first[len("<image>\n") :] if first.startswith("<image>\n") else first
            image = Image.open(shapes_dir / "instruct" / r["image"]).convert("RGB")
            out.append((image, prompt, r["conversations"][1]["value"]))
    assert len(out) == n
    return out


def _events(log_dir):
    """{tag: [(step, value)]} for the texts (str) and images (HWC uint8 array) of a TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    texts = {
        t.removesuffix("/text_summary"): [
            (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(t)
        ]
        for t in tags["tensors"]
    }
    images = {
        t: [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))) for e in acc.Images(t)]
        for t in tags["images"]
    }
    return texts, images


def test_validation_logs_each_samples_image_and_the_models_greedy_reply_at_its_step(
    shapes_dir, tmp_path, caplog
):
    from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

    from llava_lightning.data import LlavaDataModule, SourceConfig
    from llava_lightning.inference.generate import generate
    from llava_lightning.module import LlavaLitModule
    from llava_lightning.training.sample_replies import SampleReplies, sample_text

    class TableLogger(Logger):  # W&B's interface: log_text and log_image
        name, version, experiment = "table", 0, None
        calls: list = []

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_text(self, key, columns, data, step=None):
            self.calls.append(("text", key, columns, data, step))

        def log_image(self, key, images, step=None, **kwargs):
            self.calls.append(("image", key, [np.asarray(i).shape for i in images], kwargs["caption"], step))

    def fit(callbacks, loggers):
        torch.manual_seed(0)
        root = shapes_dir / "instruct"
        module = LlavaLitModule(preset="tiny", stage="finetune", template="vicuna_v1", image_aspect="pad")
        dm = LlavaDataModule(
            train=[
                SourceConfig(kind="instruct", path=str(root / "llava_instruct.json"), image_root=str(root))
            ],
            val=[SourceConfig(kind="instruct", path=str(root / "val.json"), image_root=str(root))],
            batch_size=4,
            num_workers=0,
        )
        trainer = quiet_trainer(
            tmp_path,
            logger=loggers,
            max_steps=4,
            val_check_interval=2,
            limit_val_batches=1,
            num_sanity_val_steps=1,
            callbacks=callbacks,
        )
        trainer.fit(module, dm)
        return module, trainer

    table = TableLogger()
    loggers = [TensorBoardLogger(tmp_path, name="tb"), table, CSVLogger(tmp_path, name="csv")]
    with caplog.at_level(logging.INFO):
        module, trainer = fit([SampleReplies(num_samples=2, max_new_tokens=6)], loggers)
    # Greedy generation draws no random numbers and leaves the model as it was: training is unchanged.
    plain, _ = fit([], False)
    for (name, ours), theirs in zip(module.named_parameters(), plain.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)

    texts, images = _events(trainer.loggers[0].log_dir)
    assert set(texts) == {"val_samples/0/text", "val_samples/1/text"}
    assert set(images) == {"val_samples/0/image", "val_samples/1/image"}
    # Validations after steps 2 and 4 (the sanity check logs nothing); the last one saw the final model.
    samples = _expected_samples(shapes_dir, 2)
    replies = generate(
        module.model,
        [s[0] for s in samples],
        [s[1] for s in samples],
        "vicuna_v1",
        max_new_tokens=6,
        aspect="pad",
    )
    for k, (image, prompt, reference) in enumerate(samples):
        assert [step for step, _ in texts[f"val_samples/{k}/text"]] == [2, 4]
        assert texts[f"val_samples/{k}/text"][-1][1] == sample_text(prompt, replies[k], reference)
        assert [step for step, _ in images[f"val_samples/{k}/image"]] == [2, 4]
        # TensorBoard stores PNG (lossless): the decoded sample image, pixel for pixel.
        np.testing.assert_array_equal(images[f"val_samples/{k}/image"][-1][1], np.asarray(image))
    # A logger with a text table gets one table (and the images) per validation; CSV gets nothing, said once.
    assert [c[0] for c in table.calls] == ["text", "image", "text", "image"]
    _, key, columns, rows, step = table.calls[2]
    assert (key, columns, step) == ("val_samples", ["id", "prompt", "reply", "reference"], 4)
    assert [row[1:] for row in rows] == [[p, r, ref] for (_, p, ref), r in zip(samples, replies)]
    assert table.calls[3][2] == [np.asarray(s[0]).shape for s in samples] and table.calls[3][3] == replies
    said = [r.getMessage() for r in caplog.records if "CSVLogger takes no text" in r.getMessage()]
    assert len(said) == 1


def test_the_samples_are_the_first_records_with_an_image_and_a_broken_one_is_skipped_with_a_warning(tmp_path):
    from llava_lightning.data import SourceConfig
    from llava_lightning.training.sample_replies import SampleReplies

    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    Image.new("RGB", (20, 50), "blue").save(tmp_path / "blue.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "It is red."}]
    records = [
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        },
        {"id": "missing", "image": "nope.png", "conversations": turns},
        {"id": "a", "image": "red.png", "conversations": turns},
        {"id": "b", "image": "blue.png", "conversations": turns},
        {"id": "c", "image": "red.png", "conversations": turns},
    ]
    (tmp_path / "val.json").write_text(json.dumps(records))
    source = SourceConfig(kind="instruct", path=str(tmp_path / "val.json"), image_root=str(tmp_path))
    with pytest.warns(UserWarning, match=r"record 1 \(id 'missing'\).*nope.png"):
        samples = SampleReplies(num_samples=2, source=source).load_samples(source)
    assert [s["id"] for s in samples] == ["a", "b"]
    assert [s["prompt"] for s in samples] == ["What colour?"] * 2
    assert [s["reference"] for s in samples] == ["It is red."] * 2
    assert [s["images"][0].size for s in samples] == [(40, 30), (20, 50)]
    # Every 3rd validation from the 1st, counted across a resume through the callback's state.
    every = SampleReplies(every_n_val=3)
    assert [every.due() for _ in range(4)] == [True, False, False, True]
    resumed = SampleReplies(every_n_val=3)
    resumed.load_state_dict(every.state_dict())
    assert [resumed.due() for _ in range(3)] == [False, False, True]
    with pytest.raises(ValueError, match="instruction JSON"):
        SampleReplies(source=SourceConfig(kind="captions", path="x.tar"))


# -- two processes through the real CLI: DDP (rank 0 generates) and FSDP2 (every rank generates) ---------


@pytest.fixture
def workdir(shapes_dir, tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(shapes_dir, tmp_path / "data" / "shapes")
    return tmp_path


def _fit_two_ranks(workdir, name, *extra):
    """Stage 2 of the tiny recipe on 2 CPU processes for 2 steps, validating at the end with SampleReplies
    and a checkpoint; returns the TensorBoard run folder."""
    cmd = [
        sys.executable, "-m", "llava_lightning", "fit", "-c", str(CONF / "stage2.yaml"), "-c", str(CONF / "tiny.yaml"),
        "--data.num_workers=0", "--data.batch_size=2", "--data.mixture_epoch_length=16",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.devices=2",
        "--trainer.callbacks=[]",
        "--trainer.callbacks+=llava_lightning.training.sample_replies.SampleReplies",
        "--trainer.callbacks.num_samples=2", "--trainer.callbacks.max_new_tokens=6",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={workdir}/{name}-ckpt", "--trainer.callbacks.filename=last",
        f"--trainer.logger.init_args.save_dir={workdir}", f"--trainer.logger.init_args.name={name}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir / name / "version_0"


def _assert_logged_replies_of(model, log_dir, shapes_dir, step):
    from llava_lightning.inference.generate import generate
    from llava_lightning.training.sample_replies import sample_text

    samples = _expected_samples(shapes_dir, 2)
    model.eval()
    replies = generate(model, [s[0] for s in samples], [s[1] for s in samples], "vicuna_v1", max_new_tokens=6)
    texts, images = _events(log_dir)
    for k, (image, prompt, reference) in enumerate(samples):
        assert texts[f"val_samples/{k}/text"] == [(step, sample_text(prompt, replies[k], reference))]
        assert [(s, a.shape) for s, a in images[f"val_samples/{k}/image"]] == [
            (step, np.asarray(image).shape)
        ]


def test_ddp_on_two_processes_logs_rank_zeros_replies_of_the_trained_model(workdir, shapes_dir):
    from llava_lightning.module import LlavaLitModule

    log_dir = _fit_two_ranks(workdir, "ddp", "--trainer.strategy=ddp")
    model = LlavaLitModule.load_from_checkpoint(workdir / "ddp-ckpt" / "last.ckpt", map_location="cpu").model
    _assert_logged_replies_of(model, log_dir, shapes_dir, step=2)


def test_fsdp2_on_two_processes_generates_on_every_rank_and_logs_the_replies_of_the_trained_model(
    workdir, shapes_dir
):
    from llava_lightning.cli import main
    from llava_lightning.model import LlavaModel

    log_dir = _fit_two_ranks(
        workdir, "fsdp2",
        "--trainer.strategy=llava_lightning.training.fsdp2.FSDP2Strategy",
        "--trainer.strategy.param_dtype=null", "--trainer.strategy.frozen_vision_dtype=null",
    )  # fmt: skip
    # The sharded checkpoint, consolidated: the weights the two ranks generated with, on one process.
    main(["export", f"--ckpt_path={workdir / 'fsdp2-ckpt' / 'last.ckpt'}", f"--out={workdir}/hf"])
    _assert_logged_replies_of(LlavaModel.from_hf(str(workdir / "hf")), log_dir, shapes_dir, step=2)
