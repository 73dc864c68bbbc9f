"""Config files: `_base_` overlays, `${...}` across `-c` files, and settings written once (model -> data links)."""

import inspect

import pytest
import yaml
from conftest import REPO

from llava_lightning import LlavaDataModule, LlavaLitModule
from llava_lightning.cli import main

CONF = REPO / "conf"


def _printed(args, capsys) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["fit", *args, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_a_stage_file_is_its_base_with_the_stage_merged_over_it(capsys):
    base = yaml.safe_load((CONF / "llava15_7b.yaml").read_text())
    for stage, lr in (("stage1.yaml", 1e-3), ("stage2.yaml", 2e-5)):
        printed = _printed(["-c", str(CONF / stage)], capsys)
        # From the base, untouched by the overlay (nested keys of the same mappings included).
        assert printed["model"]["spec"]["language"]["name"] == base["model"]["spec"]["language"]["name"]
        assert printed["model"]["optim"]["warmup_ratio"] == base["model"]["optim"]["warmup_ratio"]
        assert printed["trainer"]["devices"] == base["trainer"]["devices"] == 8
        assert printed["data"]["max_length"] == base["data"]["max_length"]
        # From the overlay, beside them in the same mappings.
        assert printed["model"]["optim"]["lr"] == lr
        assert printed["trainer"]["default_root_dir"] == f"outputs/{stage[:6]}"


def test_base_paths_are_relative_to_the_including_file_and_chain(tmp_path, capsys, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    _write(
        tmp_path / "a" / "root.yaml",
        "model: {preset: tiny}\ntrainer: {max_epochs: 7, log_every_n_steps: 3}\n",
    )
    _write(tmp_path / "a" / "b" / "mid.yaml", "_base_: ../root.yaml\ntrainer: {max_epochs: 5}\n")
    top = _write(tmp_path / "a" / "b" / "top.yaml", "_base_: mid.yaml\ntrainer: {log_every_n_steps: 2}\n")
    monkeypatch.chdir(tmp_path)  # not the files' folder
    printed = _printed(["-c", top], capsys)
    assert printed["model"]["preset"] == "tiny"
    assert printed["trainer"]["max_epochs"] == 5
    assert printed["trainer"]["log_every_n_steps"] == 2


def test_a_base_loop_or_a_missing_base_is_named(tmp_path):
    one = _write(tmp_path / "one.yaml", "_base_: two.yaml\n")
    _write(tmp_path / "two.yaml", "_base_: one.yaml\n")
    with pytest.raises(ValueError, match="_base_ loop"):
        main(["fit", "-c", one, "--print_config"])
    lost = _write(tmp_path / "lost.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        main(["fit", "-c", lost, "--print_config"])


def test_interpolation_points_into_another_config_file(tmp_path, capsys):
    first = _write(tmp_path / "first.yaml", "model: {preset: tiny}\ntrainer: {max_epochs: 3}\n")
    second = _write(
        tmp_path / "second.yaml",
        "trainer:\n  default_root_dir: runs/${model.preset}-${trainer.max_epochs}\n  max_steps: ${trainer.max_epochs}\n",
    )
    printed = _printed(["-c", first, "-c", second], capsys)
    assert printed["trainer"]["default_root_dir"] == "runs/tiny-3"
    assert printed["trainer"]["max_steps"] == 3


@pytest.mark.parametrize("key", ["template", "image_aspect"])
def test_template_and_image_aspect_are_written_once_on_the_model(key, tmp_path, capsys):
    # stage1 sets the model's value; the data module receives it through the link.
    from llava_lightning.cli import LlavaCLI, LlavaDataModule, LlavaLitModule

    cli = LlavaCLI(
        LlavaLitModule,
        LlavaDataModule,
        args=["-c", str(CONF / "stage1.yaml"), "-c", str(CONF / "tiny.yaml"), "--trainer.logger=false"],
        run=False,
    )
    expected = {"template": "plain", "image_aspect": "square"}[key]
    assert getattr(cli.model, key) == expected
    assert getattr(cli.datamodule, key) == expected
    # Setting the data module's copy is refused with the key to set instead, in a file and as a flag.
    given = _write(tmp_path / "data.yaml", f"data: {{{key}: pad}}\n")
    with pytest.raises(ValueError, match=f"set model.{key} instead"):
        main(["fit", "-c", str(CONF / "stage2.yaml"), "-c", given, "--print_config"])
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(CONF / "stage2.yaml"), f"--data.{key}=pad", "--print_config"])
    assert f"data.{key}" in capsys.readouterr().err  # jsonargparse names the link target


def test_model_and_data_module_defaults_agree():
    from llava_lightning.model.pretrained import resolve_settings

    model, data = inspect.signature(LlavaLitModule), inspect.signature(LlavaDataModule)
    # The module's None means "the pretrained checkpoint's, else the default": the data module's default.
    assert model.parameters["template"].default is None and model.parameters["image_aspect"].default is None
    defaults = tuple(data.parameters[key].default for key in ("template", "image_aspect"))
    assert resolve_settings(None, None, None) == defaults


def test_no_shipped_config_sets_a_linked_data_key():
    for path in CONF.rglob("*.yaml"):
        data = yaml.safe_load(path.read_text()).get("data") or {}
        assert not {"template", "image_aspect", "stage"} & set(data), path
