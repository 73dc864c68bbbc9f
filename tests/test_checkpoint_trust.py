"""Checkpoints are untrusted input: remote code only on the user's own flag, a clear error for a corrupt
file, and a resumed run that refuses (or applies, and says so) every setting changed on its command line."""

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import sys
import uuid
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO

from llava_lightning.cli import main

CONF = REPO / "conf"

# Imported by transformers only when remote code is trusted: it leaves a marker file behind.
EVIL_CODE = """\
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

MARKER = Path({marker!r})
MARKER.write_text("remote code ran")


class EvilConfig(LlamaConfig):
    pass


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig

    def __init__(self, config):
        MARKER.write_text("remote code ran")
        super().__init__(config)
"""


def _fit_args(root, name: str, *extra: str) -> list[str]:
    """`fit` of the tiny stage-2 recipe for 2 steps (batch 4, no validation), logged under root/runs/name."""
    return [
        "fit", "-c", str(CONF / "stage2.yaml"), "-c", str(CONF / "tiny.yaml"),
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
        "--data.num_workers=0", "--data.batch_size=4",
        f"--trainer.logger.init_args.save_dir={root}/runs", f"--trainer.logger.init_args.name={name}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(shapes_dir, tmp_path_factory):
    """A 2-step tiny stage-2 run: its working directory (data/shapes linked) and its last.ckpt."""
    root = tmp_path_factory.mktemp("run")
    (root / "data").mkdir()
    os.symlink(shapes_dir, root / "data" / "shapes")
    with contextlib.chdir(root):  # conf/tiny.yaml names data/shapes relative to the working directory
        main(_fit_args(root, "first"))
    ckpt = root / "runs" / "first" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return SimpleNamespace(root=root, ckpt=ckpt)


# ----------------------------------------------------------------------------- remote code
@pytest.fixture
def evil_lm(tmp_path, monkeypatch):
    """A local tiny-Llama folder whose config names remote code (`auto_map`) that writes a marker file if
    it ever runs; transformers' dynamic-module cache is redirected into tmp_path."""
    import transformers.dynamic_module_utils as dynamic_modules
    from transformers import LlamaConfig, LlamaForCausalLM

    from llava_lightning.model.presets import TINY_LLAMA

    folder = tmp_path / f"evil_lm_{uuid.uuid4().hex[:8]}"  # a fresh module name: no import cache hit
    marker = tmp_path / "remote_code_ran"
    LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    ).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    return SimpleNamespace(folder=folder, marker=marker)


@pytest.fixture
def lm_trust_args(monkeypatch):
    """The `trust_remote_code` each `AutoModelForCausalLM.from_pretrained` call receives."""
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def record(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    return seen


def _evil_spec(evil_lm, trust: bool) -> dict:
    """The tiny preset with its LLM read from the evil folder, as the CLI writes a spec into hparams."""
    from llava_lightning.model import get_preset

    spec = get_preset("tiny")
    spec.language = dataclasses.replace(
        spec.language, name=str(evil_lm.folder), config=None, trust_remote_code=trust
    )
    return dataclasses.asdict(spec)


@pytest.fixture
def evil_ckpt(run, evil_lm, tmp_path):
    """The run's checkpoint, edited as an attacker would: its model spec asks for remote code. Also the
    `-c` file that gives a resumed run the same model (without asking for remote code)."""
    ckpt = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["preset"] = None
    ckpt["hyper_parameters"]["spec"] = _evil_spec(evil_lm, trust=True)
    path = tmp_path / "untrusted.ckpt"
    torch.save(ckpt, path)
    model_yaml = tmp_path / "evil_model.yaml"
    model_yaml.write_text(
        yaml.safe_dump({"model": {"preset": None, "spec": _evil_spec(evil_lm, trust=False)}})
    )
    return SimpleNamespace(path=path, model_yaml=model_yaml)


def _warned_about_remote_code(caplog, ckpt) -> bool:
    return any(
        str(ckpt) in r.getMessage() and "trust_remote_code" in r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING
    )


def test_load_from_checkpoint_runs_remote_code_only_on_the_callers_argument(
    evil_lm, evil_ckpt, lm_trust_args, caplog
):
    from llava_lightning.module import LlavaLitModule

    caplog.set_level(logging.WARNING)
    LlavaLitModule.load_from_checkpoint(evil_ckpt.path, map_location="cpu", weights_only=True)
    assert not evil_lm.marker.exists()
    assert lm_trust_args == [False]
    assert _warned_about_remote_code(caplog, evil_ckpt.path)

    LlavaLitModule.load_from_checkpoint(evil_ckpt.path, map_location="cpu", trust_remote_code=True)
    assert evil_lm.marker.exists()  # the caller's own say-so does turn it on
    assert lm_trust_args == [False, True]


def test_export_runs_remote_code_only_with_its_flag(run, evil_lm, evil_ckpt, lm_trust_args, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    main(["export", "--ckpt_path", str(evil_ckpt.path), "--out", str(tmp_path / "hf")])
    assert not evil_lm.marker.exists()
    assert lm_trust_args == [False]
    assert _warned_about_remote_code(caplog, evil_ckpt.path)
    assert any("--trust_remote_code" in r.getMessage() for r in caplog.records)

    main(
        [
            "export",
            "--ckpt_path",
            str(evil_ckpt.path),
            "--out",
            str(tmp_path / "hf2"),
            "--trust_remote_code=true",
        ]
    )
    assert evil_lm.marker.exists()
    assert lm_trust_args == [False, True]


def test_fit_ckpt_path_runs_remote_code_only_with_the_command_lines_flag(
    run, evil_lm, evil_ckpt, lm_trust_args, monkeypatch, caplog
):
    monkeypatch.chdir(run.root)
    caplog.set_level(logging.WARNING)
    # max_steps 2: the checkpoint's step, so the run builds the model, restores it and stops
    args = _fit_args(run.root, "evil", "-c", str(evil_ckpt.model_yaml), f"--ckpt_path={evil_ckpt.path}")
    cli = main(args)
    assert cli.trainer.global_step == 2
    assert not evil_lm.marker.exists()
    assert lm_trust_args == [False]
    assert _warned_about_remote_code(caplog, evil_ckpt.path)

    main([*args, "--model.spec.language.trust_remote_code=true"])
    assert evil_lm.marker.exists()
    assert lm_trust_args == [False, True]


def test_from_hf_never_runs_the_auto_map_code_of_an_exported_folder(run, tmp_path, monkeypatch):
    # A regression guard: `from_hf` passes trust_remote_code=False to every loader that takes it.
    import transformers.dynamic_module_utils as dynamic_modules

    from llava_lightning.model import LlavaModel

    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / f"exported_{uuid.uuid4().hex[:8]}"
    main(["export", "--ckpt_path", str(run.ckpt), "--out", str(folder)])
    marker = tmp_path / "remote_code_ran"
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    remote = {
        "config.json": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"},
        "tokenizer_config.json": {"AutoTokenizer": ["evil.EvilConfig", None]},
        "preprocessor_config.json": {"AutoImageProcessor": "evil.EvilConfig"},
    }
    for name, auto_map in remote.items():
        if (folder / name).exists():
            data = json.loads((folder / name).read_text())
            data["auto_map"] = auto_map
            if name == "config.json":
                data["text_config"]["auto_map"] = auto_map
            (folder / name).write_text(json.dumps(data))
    model = LlavaModel.from_hf(folder)
    assert model.language_model.config.model_type == "llama"
    assert not marker.exists()


# ----------------------------------------------------------------------------- corrupt checkpoints
class NotAllowlisted:
    """Pickled by reference to a callable outside torch's weights-only allowlist."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _bad_checkpoint(kind: str, run, tmp_path) -> pathlib.Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        data = run.ckpt.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "disallowed_global":
        torch.save(
            {"state_dict": {}, "hyper_parameters": {"x": NotAllowlisted(tmp_path / "pickle_ran")}}, path
        )
    return path


WHAT = {
    "empty": "empty",
    "random": "not a PyTorch checkpoint",
    "truncated": "truncated",
    "disallowed_global": "allowlist",
}


def _assert_clear_error(err: BaseException, path, kind: str, tmp_path) -> None:
    message = str(err)
    assert type(err).__name__ == "CheckpointLoadError", f"{type(err).__name__}: {message}"
    assert str(path) in message
    assert WHAT[kind] in message
    assert "not loaded" in message
    assert "weights_only=False" in message and "trust" in message
    assert "will likely succeed" not in message  # torch's advice to load it without the allowlist
    assert not (tmp_path / "pickle_ran").exists()


@pytest.mark.parametrize("kind", sorted(WHAT))
def test_a_corrupt_checkpoint_gives_a_clear_error_through_every_entry_point(kind, run, tmp_path, monkeypatch):
    from llava_lightning.module import LlavaLitModule

    path = _bad_checkpoint(kind, run, tmp_path)
    monkeypatch.chdir(run.root)
    entry_points = {
        "fit": lambda: main(_fit_args(tmp_path, "bad", f"--ckpt_path={path}")),
        "export": lambda: main(["export", "--ckpt_path", str(path), "--out", str(tmp_path / "hf")]),
        "load_from_checkpoint": lambda: LlavaLitModule.load_from_checkpoint(path, map_location="cpu"),
    }
    for name, call in entry_points.items():
        with pytest.raises(Exception) as info:
            call()
        _assert_clear_error(info.value, path, kind, tmp_path)
        assert not (tmp_path / "hf").exists(), name


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_every_subcommand_reads_its_ckpt_path_with_the_clear_error(subcommand, run, tmp_path, monkeypatch):
    path = _bad_checkpoint("empty", run, tmp_path)
    monkeypatch.chdir(run.root)
    args = [
        subcommand,
        "-c",
        str(CONF / "stage2.yaml"),
        "-c",
        str(CONF / "tiny.yaml"),
        "--trainer.logger=false",
    ]
    if subcommand == "predict":
        args += ["-c", str(CONF / "predict.yaml")]
    with pytest.raises(Exception) as info:
        main([*args, f"--ckpt_path={path}"])
    _assert_clear_error(info.value, path, "empty", tmp_path)


def test_export_of_a_sharded_folder_with_a_corrupt_meta_file_names_it(tmp_path):
    folder = tmp_path / "sharded.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"not used")
    (folder / "meta.pt").write_bytes(b"")
    with pytest.raises(Exception) as info:
        main(["export", "--ckpt_path", str(folder), "--out", str(tmp_path / "hf")])
    _assert_clear_error(info.value, folder / "meta.pt", "empty", tmp_path)


# ----------------------------------------------------------------------------- changed flags on resume
def test_resume_with_the_same_command_line_continues_and_a_changed_lr_is_refused(run, monkeypatch):
    monkeypatch.chdir(run.root)
    cli = main(_fit_args(run.root, "same", "--trainer.max_steps=3", f"--ckpt_path={run.ckpt}"))
    assert cli.trainer.global_step == 3  # resumed at step 2, trained one more step

    with pytest.raises(ValueError) as info:
        main(
            _fit_args(
                run.root, "lr", "--trainer.max_steps=3", "--model.optim.lr=0.1", f"--ckpt_path={run.ckpt}"
            )
        )
    message = str(info.value)
    assert "model.optim.lr" in message and "0.0005" in message and "0.1" in message
    assert str(run.ckpt) in message
    assert "drop" in message and "new run" in message
    assert not (run.root / "runs" / "lr").exists()  # refused before anything ran


@pytest.mark.parametrize(
    ("flag", "key", "saved", "given"),
    [
        ("--data.batch_size=8", "data.batch_size", "4", "8"),
        ("--model.preset=tiny-qwen2", "model.preset", "tiny", "tiny-qwen2"),
        ("--data.seed=3", "data.seed", "0", "3"),
    ],
)
def test_resume_refuses_a_changed_setting_that_shapes_training(run, monkeypatch, flag, key, saved, given):
    monkeypatch.chdir(run.root)
    with pytest.raises(ValueError) as info:
        main(_fit_args(run.root, "changed", "--trainer.max_steps=3", flag, f"--ckpt_path={run.ckpt}"))
    line = next(line for line in str(info.value).splitlines() if key in line)
    assert saved in line and given in line


def test_resume_applies_a_changed_num_workers_and_says_so(run, monkeypatch, caplog):
    monkeypatch.chdir(run.root)
    caplog.set_level(logging.WARNING)
    cli = main(
        _fit_args(
            run.root, "workers", "--trainer.max_steps=3", "--data.num_workers=1", f"--ckpt_path={run.ckpt}"
        )
    )
    assert cli.trainer.global_step == 3
    assert cli.datamodule.num_workers == 1
    said = [r.getMessage() for r in caplog.records if "data.num_workers" in r.getMessage()]
    assert said and "0" in said[0] and "1" in said[0]
