"""Command line: `python -m llava_lightning {fit,validate,test,predict,export}`.

`fit/validate/test/predict` are LightningCLI with `parser_mode="omegaconf"` (several `-c` files
overlay left to right; `${...}` interpolation works; every hyperparameter is a flag). The model's
tokenizer and image settings flow into the data module by argument links applied when the model is
instantiated, so no YAML repeats them. `export --ckpt_path CKPT --out DIR` writes a llava-hf folder (from a
.ckpt file or a sharded checkpoint folder, consolidated on the fly).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from .data.datamodule import ImageSettings, LlavaDataModule
from .module import LlavaLitModule

log = logging.getLogger(__name__)


class LlavaCLI(LightningCLI):
    """LightningCLI for LLaVA: model -> data links for tokenizer and image settings."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.stage", "data.stage", apply_on="parse")
        parser.link_arguments(
            "model", "data.tokenizer", compute_fn=lambda lit: lit.model.tokenizer, apply_on="instantiate"
        )
        parser.link_arguments(
            "model",
            "data.image_settings",
            compute_fn=lambda lit: ImageSettings.from_tower(lit.model.vision_tower),
            apply_on="instantiate",
        )


@contextlib.contextmanager
def consolidated(ckpt_path: str | Path) -> Iterator[str]:
    """A single-file checkpoint for `ckpt_path`: the file itself, or, for the folder of a sharded
    checkpoint, its shards gathered into one full state dict in a temporary file (needs CPU memory for
    the whole model; optimizer states are left out)."""
    path = Path(ckpt_path)
    if not path.is_dir():
        yield str(path)
        return
    if (path / "latest").is_file() or (path / "checkpoint").is_dir():  # DeepSpeed
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "full.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
            yield str(out)
        return
    if not (path / ".metadata").is_file():
        raise ValueError(
            f"{path} is a folder but not a sharded checkpoint (no torch.distributed.checkpoint `.metadata`, "
            "no DeepSpeed `latest`); pass a .ckpt file or the checkpoint folder a sharded run wrote"
        )
    # The model weights only (no optimizer state), rebuilt from the shards' metadata in one process as
    # torch's `dcp_to_torch_save` does (with the same private helpers: the public `load` only fills
    # keys already present); Lightning keeps everything else in `meta.pt` beside them.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    weights: dict = {}
    # The weights' key: "state_dict" (ModelParallelStrategy / FSDP2), "model" (FSDPStrategy / FSDP1).
    planner = _EmptyStateDictLoadPlanner(keys={"state_dict", "model"})
    _load_state_dict(weights, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
    checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = weights.get("state_dict", weights.get("model"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.ckpt"
        torch.save(checkpoint, out)
        yield str(out)


def export(argv: list[str]) -> None:
    """`export --ckpt_path CKPT --out DIR`: a Lightning checkpoint -> llava-hf folder."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m llava_lightning export", description=export.__doc__)
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="Lightning checkpoint of an LlavaLitModule run: a .ckpt file, or the folder of a sharded one "
        "(FSDP2 / FSDP distributed checkpoint, DeepSpeed ZeRO), consolidated on the fly",
    )
    parser.add_argument(
        "--out", required=True, help="Folder to write (config, safetensors, processor, tokenizer)"
    )
    args = parser.parse_args(argv)
    with consolidated(args.ckpt_path) as ckpt_file:
        lit = LlavaLitModule.load_from_checkpoint(ckpt_file, map_location="cpu", weights_only=True)
    model = lit.model
    if hasattr(model.language_model, "merge_and_unload"):  # LoRA: fold the adapters into the weights
        model.language_model = model.language_model.merge_and_unload()
    model.save_hf(args.out)
    print(f"llava-hf folder written to {args.out}")  # noqa: T201 (CLI output)


def main(argv: list[str] | None = None) -> LlavaCLI | None:
    """Run a subcommand; returns the CLI (its `trainer.callback_metrics` hold the run's last metrics)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["export"]:
        export(argv[1:])
        return None
    return LlavaCLI(
        LlavaLitModule,
        LlavaDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=argv,
    )
