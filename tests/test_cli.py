"""The CLI: every shipped YAML parses, and stage 1 -> stage 2 -> export runs end to end on `tiny`."""

import glob
import importlib
import json
import math
import os

import pytest
import torch
import yaml
from conftest import REPO, trainer_for_strategy_yaml

from llava_lightning.cli import main
from llava_lightning.data.image import decode_image
from llava_lightning.data.prompts import prompt_of
from llava_lightning.inference.generate import generate

CONF = REPO / "conf"
YAMLS = sorted(str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml"))


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_under_conf_is_valid_yaml(name):
    assert isinstance(yaml.safe_load((CONF / name).read_text()), dict)


@pytest.mark.parametrize(
    "files",
    [
        ["stage1.yaml"],
        ["stage2.yaml"],
        ["stage1.yaml", "tiny.yaml"],
        ["stage2.yaml", "tiny.yaml"],
        ["stage2.yaml", "next.yaml"],
        ["stage2.yaml", "tiny.yaml", "tiny_next.yaml"],
        ["stage2.yaml", "scienceqa.yaml"],
        ["stage2.yaml", "strategy/ddp.yaml"],
        ["stage2.yaml", "strategy/fsdp2.yaml"],
        ["finetune_lora.yaml"],
    ],
)
def test_print_config_for_each_stage_and_overlay(files, capsys):
    args = ["fit"] + [a for f in files for a in ("-c", str(CONF / f))] + ["--print_config"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["stage"] in ("align", "finetune", "lora")
    if "tiny.yaml" in files:
        preset = "tiny-next" if "tiny_next.yaml" in files else "tiny"
        assert printed["model"]["preset"] == preset and printed["trainer"]["accelerator"] == "cpu"
    if "next.yaml" in files:  # the recipe's spec, with LLaVA-NeXT's pinpoints
        assert printed["model"]["spec"]["language"]["name"] == "lmsys/vicuna-7b-v1.5"
        assert printed["model"]["spec"]["image_grid_pinpoints"][0] == [336, 672]


def test_overlays_merge_left_to_right(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "-c",
                str(CONF / "stage2.yaml"),
                "-c",
                str(CONF / "tiny.yaml"),
                "--model.optim.lr=0.5",
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["optim"]["lr"] == 0.5  # flag over tiny.yaml over stage2.yaml
    assert printed["model"]["template"] == "vicuna_v1"  # from stage2.yaml, untouched by tiny.yaml


def test_stage1_stage2_export_end_to_end(shapes_dir, tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    from llava_lightning.module import LlavaLitModule

    (tmp_path / "data").mkdir()
    os.symlink(shapes_dir, tmp_path / "data" / "shapes")
    monkeypatch.chdir(tmp_path)  # tiny.yaml names data/shapes relative to the working directory
    common = [
        "-c", str(CONF / "tiny.yaml"), "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
        "--data.num_workers=0", f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
    ]  # fmt: skip
    main(["fit", "-c", str(CONF / "stage1.yaml"), *common, "--trainer.logger.init_args.name=s1"])
    (projector,) = glob.glob(f"{tmp_path}/runs/s1/version_0/projector.safetensors")
    main(["fit", "-c", str(CONF / "stage2.yaml"), *common, "--trainer.logger.init_args.name=s2",
          f"--model.init_projector={projector}"])  # fmt: skip
    (ckpt,) = glob.glob(f"{tmp_path}/runs/s2/version_0/checkpoints/last.ckpt")
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "hf")])
    main(["predict", "-c", str(CONF / "stage2.yaml"), *common[:2], "-c", str(CONF / "predict.yaml"),
          "--data.num_workers=0", "--data.batch_size=5", "--model.max_new_tokens=3",
          f"--trainer.callbacks.init_args.output={tmp_path}/pred.jsonl", f"--ckpt_path={ckpt}"])  # fmt: skip

    ours = LlavaLitModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).model.eval()
    assert ours.multi_modal_projector.linear_1.weight.shape[0] == ours.language_model.config.hidden_size
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    n = ours.vision_tower.num_tokens
    ids = torch.tensor([[1, 5, 6] + [ours.image_token_id] * n + [7, 8, 9]])
    pixels = torch.randn(1, 3, ours.vision_tower.image_size, ours.vision_tower.image_size)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, pixel_values=pixels).logits,
            theirs(input_ids=ids, pixel_values=pixels).logits,
            rtol=0,
            atol=1e-4,
        )
    # predict: one JSON line per eval record, in order, each the greedy reply to the record's prompt
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    records = json.loads((shapes_dir / "eval" / "scienceqa_style.json").read_text())
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    first = records[0]
    image = decode_image(shapes_dir / "eval" / first["image"])
    assert rows[0]["reply"] == generate(ours, [[image]], [prompt_of(first)], max_new_tokens=3)[0]


def test_tiny_anyres_run_trains_on_cpu_exports_to_llava_next_and_predicts(shapes_dir, tmp_path, monkeypatch):
    """`-c conf/stage2.yaml -c conf/tiny.yaml -c conf/tiny_next.yaml` on the synthetic data: a LLaVA-NeXT
    (anyres) stage 2 trains on the CPU, exports to a folder transformers loads as llava-next, predicts."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from llava_lightning.module import LlavaLitModule

    (tmp_path / "data").mkdir()
    os.symlink(shapes_dir, tmp_path / "data" / "shapes")
    monkeypatch.chdir(tmp_path)
    common = [
        "-c", str(CONF / "tiny.yaml"), "-c", str(CONF / "tiny_next.yaml"), "--trainer.enable_progress_bar=false",
        "--data.num_workers=0", f"--trainer.logger.init_args.save_dir={tmp_path}/runs", "--data.batch_size=4",
    ]  # fmt: skip
    cli = main(["fit", "-c", str(CONF / "stage2.yaml"), *common, "--trainer.max_steps=6",
                "--trainer.limit_val_batches=1", "--trainer.logger.init_args.name=next"])  # fmt: skip
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    (ckpt,) = glob.glob(f"{tmp_path}/runs/next/version_0/checkpoints/last.ckpt")
    ours = LlavaLitModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).model.eval()
    assert ours.anyres is not None
    # image_newline trained in stage 2: its own AdamW group, with moments
    optimizer = torch.load(ckpt, map_location="cpu", weights_only=True)["optimizer_states"][0]
    (group,) = [g for g in optimizer["param_groups"] if g["name"] == "image_newline/no_decay"]
    assert optimizer["state"][group["params"][0]]["exp_avg"].abs().sum() > 0
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "hf")])
    theirs = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    image = decode_image(next((shapes_dir / "instruct").rglob("*.jpg")))
    inputs = processor(images=[image], text=["USER: <image>\nWhat is it? ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=0, atol=1e-4)
    main(["predict", "-c", str(CONF / "stage2.yaml"), *common[:4], "-c", str(CONF / "predict.yaml"),
          "--data.num_workers=0", "--data.batch_size=5", "--model.max_new_tokens=3",
          f"--trainer.callbacks.init_args.output={tmp_path}/pred.jsonl", f"--ckpt_path={ckpt}"])  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    records = json.loads((shapes_dir / "eval" / "scienceqa_style.json").read_text())
    first = records[0]
    assert len(rows) == len(records)
    image = decode_image(shapes_dir / "eval" / first["image"])
    assert rows[0]["reply"] == generate(ours, [[image]], [prompt_of(first)], max_new_tokens=3)[0]


def test_sweep_trials_expand_to_valid_cli_flags(capsys):
    import itertools

    sweep = yaml.safe_load((CONF / "sweeps" / "tiny_lr_wandb.yaml").read_text())
    command = sweep["command"]
    base = command[command.index("fit") : command.index("${args}")]
    base = [str(REPO / a) if a.endswith(".yaml") else a for a in base]
    names = list(sweep["parameters"])
    for values in itertools.product(*(sweep["parameters"][n]["values"] for n in names)):
        flags = [f"--{n}={v}" for n, v in zip(names, values)]  # what W&B's ${args} expands to
        with pytest.raises(SystemExit):
            main([*base, *flags, "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["optim"]["lr"] == values[0] and printed["data"]["batch_size"] == values[2]


def test_optuna_sweep_runs_trials_through_the_cli(shapes_dir, tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_optuna", CONF / "sweeps" / "tiny_optuna.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    (tmp_path / "data").mkdir()
    os.symlink(shapes_dir, tmp_path / "data" / "shapes")
    (tmp_path / "conf").symlink_to(CONF)
    monkeypatch.chdir(tmp_path)
    study = sweep.main(
        ["--trials", "2", "--max-steps", "2", "--out", str(tmp_path / "optuna"), "--",
         "--data.num_workers=0", "--trainer.enable_progress_bar=false"]
    )  # fmt: skip
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        assert math.isfinite(t.value) and t.value > 0
        # the trial's suggestions reached the run: its logged hyperparameters carry them
        hparams = yaml.safe_load((tmp_path / f"optuna/trial_{t.number}/version_0/hparams.yaml").read_text())
        assert hparams["optim"]["lr"] == pytest.approx(t.params["model.optim.lr"])
    assert trials[0].params != trials[1].params


@pytest.mark.parametrize("name", sorted(p.name for p in (CONF / "strategy").glob("*.yaml")))
def test_every_strategy_yaml_builds_its_strategy(name):
    trainer = trainer_for_strategy_yaml(name)
    class_path = yaml.safe_load((CONF / "strategy" / name).read_text())["trainer"]["strategy"]["class_path"]
    module, _, cls = class_path.rpartition(".")
    assert type(trainer.strategy) is getattr(importlib.import_module(module), cls)
