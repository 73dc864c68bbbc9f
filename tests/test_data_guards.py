"""Runs that must not train on nothing: missing data fails at setup, too many skips stop the run; `test`."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer

from llava_lightning.cli import main
from llava_lightning.data import DataSkipError, LlavaDataModule, SourceConfig
from llava_lightning.module import LlavaLitModule

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_the_readme_command_before_the_data_exists_fails_at_setup_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", str(CONF / "stage1.yaml"), "-c", str(CONF / "tiny.yaml"), "--trainer.max_steps=2"]
    with pytest.raises(FileNotFoundError) as err:
        main(args)
    message = str(err.value)
    assert "data/shapes/captions/shard-00000.tar" in message and "10 missing" in message
    assert "python -m llava_lightning.data.synthetic --out data/shapes --seed 0" in message
    assert not list(tmp_path.rglob("projector.safetensors")) and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("stage,group", [("fit", "val"), ("test", "test"), ("predict", "predict")])
def test_each_stage_checks_the_sources_it_reads(shapes_dir, tmp_path, stage, group):
    good = SourceConfig(
        kind="instruct", path=str(shapes_dir / "instruct/val.json"), image_root=str(shapes_dir)
    )
    gone = SourceConfig(kind="instruct", path=str(tmp_path / "nope.json"), image_root=str(tmp_path / "imgs"))
    groups = {"val": [good], "test": [good], "predict": good} | {
        group: gone if group == "predict" else [gone]
    }
    dm = LlavaDataModule(train=[good], missing_data_hint="HINT", **groups)
    with pytest.raises(FileNotFoundError, match=rf"data\.{group} source .*nope.json: 2 missing(.|\n)*HINT"):
        dm.check_files(stage)
    dm.check_files("validate" if group != "val" else "test")  # a stage that does not read it passes


def test_predict_needs_no_image_root_but_training_does(shapes_dir):
    prompts = SourceConfig(kind="instruct", path=str(shapes_dir / "eval/scienceqa_style.json"))
    LlavaDataModule(train=[], predict=prompts).check_files("predict")  # images beside the JSON
    with pytest.raises(FileNotFoundError, match="needs image_root"):
        LlavaDataModule(train=[prompts]).check_files("fit")


def _skippy_json(shapes_dir, tmp_path, bad_share):
    """An instruction JSON of 16 records of which `bad_share` name a missing image."""
    records = json.loads((shapes_dir / "instruct/llava_instruct.json").read_text())[:16]
    for i in range(int(16 * bad_share)):
        records[i] = {**records[i], "image": "images/missing.jpg"}
    path = tmp_path / "skippy.json"
    path.write_text(json.dumps(records))
    return SourceConfig(kind="instruct", path=str(path), image_root=str(shapes_dir / "instruct"))


def _fit(source, tmp_path, **dm_kwargs):
    dm = LlavaDataModule(train=[source], batch_size=4, num_workers=0, seed=0, **dm_kwargs)
    lit = LlavaLitModule(preset="tiny", stage="finetune")
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(lit, datamodule=dm)
    return trainer


def test_a_run_whose_skips_exceed_max_skip_ratio_stops_naming_the_reasons(shapes_dir, tmp_path):
    source = _skippy_json(shapes_dir, tmp_path, 0.75)
    with pytest.raises(DataSkipError, match=r"12 of the last 16 samples were skipped .*missing_image 12"):
        _fit(source, tmp_path, skip_window=16, max_skip_ratio=0.5)
    assert _fit(source, tmp_path, skip_window=16, max_skip_ratio=1.0).global_step == 4  # 1.0: never stops
    assert _fit(_skippy_json(shapes_dir, tmp_path, 0.25), tmp_path, skip_window=16).global_step == 4


class _Strategy:
    root_device = torch.device("cpu")

    def __init__(self, other_rank):
        self.other_rank = other_rank

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        return tensor + torch.tensor(self.other_rank, dtype=tensor.dtype)


class _Trainer:
    world_size = 2

    def __init__(self, other_rank):
        self.strategy = _Strategy(other_rank)


def _batch(kept, **skipped):
    return {"input_ids": torch.zeros(kept, 3, dtype=torch.long), "skipped": skipped}


def test_the_skip_check_is_over_all_ranks_and_ignores_padding():
    dm = LlavaDataModule(train=[], batch_size=4, skip_window=8, max_skip_ratio=0.5)
    # This rank: 5 of 8 skipped, plus padding slots (not samples); the other rank's 8 were all kept.
    dm.trainer = _Trainer([8.0, 0.0])
    dm.count(_batch(1, missing_image=3))
    dm.count(_batch(2, bad_image=2, padding=2))
    dm.trainer = _Trainer([8.0, 8.0])  # now the other rank skips all
    dm.count(_batch(1, missing_image=3))
    with pytest.raises(
        DataSkipError, match=r"13 of the last 16 samples .*on this rank: missing_image 3, bad_image 2"
    ):
        dm.count(_batch(2, bad_image=2))


def test_test_subcommand_scores_data_test_through_the_cli(shapes_dir, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    os.symlink(shapes_dir, tmp_path / "data" / "shapes")
    monkeypatch.chdir(tmp_path)
    common = ["-c", str(CONF / "stage2.yaml"), "-c", str(CONF / "tiny.yaml"), "--data.num_workers=0"]
    quiet = ["--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}/runs"]
    main(["fit", *common, *quiet, "--trainer.max_steps=2"])
    (ckpt,) = tmp_path.glob("runs/tb/version_0/checkpoints/last.ckpt")
    cli = main(["test", *common, *quiet, f"--ckpt_path={ckpt}"])
    metrics = cli.trainer.callback_metrics
    assert {"test/loss", "test/ppl", "test/accuracy"} <= set(metrics) and not any(
        k.startswith("val/") for k in metrics
    )
    assert torch.isfinite(metrics["test/loss"]) and 0.0 <= float(metrics["test/accuracy"]) <= 1.0
    # A stage whose data.test is empty says what to set
    with pytest.raises(ValueError, match="test needs data.test"):
        main(["test", "-c", str(CONF / "stage1.yaml"), "-c", str(CONF / "tiny.yaml"), *quiet])
    shutil.rmtree(tmp_path / "runs")
