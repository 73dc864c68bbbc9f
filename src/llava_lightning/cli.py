"""Command line: `python -m llava_lightning {fit,validate,test,predict,export}`.

`fit/validate/test/predict` are LightningCLI with `parser_mode="omegaconf"` (several `-c` files
overlay left to right; `${...}` interpolation works; every hyperparameter is a flag). The model's
tokenizer and image settings flow into the data module by argument links applied when the model is
instantiated, so no YAML repeats them. `export --ckpt_path CKPT --out DIR` writes a llava-hf folder.
"""

from __future__ import annotations

import logging
import sys

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


def export(argv: list[str]) -> None:
    """`export --ckpt_path CKPT --out DIR`: a Lightning checkpoint -> llava-hf folder."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m llava_lightning export", description=export.__doc__)
    parser.add_argument(
        "--ckpt_path", required=True, help="Lightning checkpoint (.ckpt) of an LlavaLitModule run"
    )
    parser.add_argument(
        "--out", required=True, help="Folder to write (config, safetensors, processor, tokenizer)"
    )
    args = parser.parse_args(argv)
    lit = LlavaLitModule.load_from_checkpoint(args.ckpt_path, map_location="cpu", weights_only=True)
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
