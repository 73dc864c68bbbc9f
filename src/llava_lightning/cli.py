"""Command line: `python -m llava_lightning {fit,validate,test,predict,export,chat,serve,evaluate,score}`.

`fit/validate/test/predict` are LightningCLI with `parser_mode="omegaconf+"` (several `-c` files
overlay left to right; a file may start from another with `_base_:` (config_base.py); `${...}` is
resolved after all files are merged, so it may point into another file; every hyperparameter is a
flag). The data module takes the model's stage, template and image aspect by links applied at parse
time, and its tokenizer and image settings by links applied when the model is instantiated, so no
YAML repeats them. `export --ckpt_path CKPT --out DIR` writes a llava-hf folder (from a
.ckpt file or a sharded checkpoint folder, consolidated on the fly); LoRA adapters are merged, a qlora
run's into un-quantized base weights (`--qlora_base`, docs/qlora.md).

A checkpoint is untrusted input; `--ckpt_path` (a .ckpt file, or the `meta.pt` of a sharded FSDP2 / FSDP
folder) is read with weights only before anything else, and:

- Remote code. `model.spec.language.trust_remote_code` always comes from the command line (`-c` files and
  flags; `export --trust_remote_code`), never from a checkpoint: a checkpoint that asks for it is named in a
  warning, and transformers then refuses code the model's files name.
- A file that cannot be read (empty, truncated, not a PyTorch checkpoint, objects outside the weights-only
  allowlist) stops the run with a `CheckpointLoadError` naming it, never with advice to drop the allowlist.
- `fit --ckpt_path` resumes the run the command line describes: the command line's config (after `-c`
  files and flags, defaults included) is compared with the checkpoint's `hyper_parameters` (model) and
  `datamodule_hyper_parameters` (data), value by value. A difference in a key of `APPLIED_ON_RESUME` (they
  change neither what trains nor which samples are read in which order) is applied, with a warning
  naming it; any other difference (the model, its stage, optimizer and LoRA settings, gradient
  checkpointing; the training sources, batch size, template, token limit, image aspect, seed, shuffling,
  mixture length, pixel transport) is refused with a `ResumeMismatchError` naming key, checkpoint value and
  command-line value: drop the flag to continue with the checkpoint's value, or start a new run from the
  checkpoint's weights. Linked values (`data.tokenizer`, `data.image_settings`, `data.stage`) are not
  compared. A key the checkpoint predates (a setting added since) takes the command line's value, named in
  a warning; a checkpoint without data settings gets a warning that the data could not be checked.
- `validate/test/predict --ckpt_path` evaluate the checkpoint's model: its hyperparameters replace the
  command line's (as LightningCLI does), except the keys of `APPLIED_ON_RESUME` (generation settings
  among them), which stay the command line's; each difference is named in a warning.

`--ckpt_path last|best|hpc` and DeepSpeed folders are resolved and read by Lightning itself: nothing is
compared for them (their model is still built with the command line's `trust_remote_code`).
"""

from __future__ import annotations

import logging
import sys

from lightning.pytorch.cli import LightningCLI

from . import config_base
from .data.chat_template import jinja_chat_template
from .data.datamodule import ImageSettings, LlavaDataModule
from .inference.generate import save_stop_tokens
from .module import LlavaLitModule
from .training.checkpoint_file import callers_trust_remote_code
from .training.consolidate import consolidated
from .training.resume_check import (
    check_resume,
    evaluation_model_settings,
    plain_config,
    remote_code_requested,
    saved_settings,
    spec_language,
)

log = logging.getLogger(__name__)


# Written once, on the model, and linked into the data module: the stage picks the data, and the
# template and image handling are the training data's as well as generation's.
DATA_FROM_MODEL = ("stage", "template", "image_aspect")


def refuse_linked_data_keys(value: object) -> None:
    """A config file that sets `data.template` (or another linked key) would be overridden without a
    word by the link: refuse it with the key to set instead."""
    data = value.get("data") if isinstance(value, dict) else None
    given = [k for k in DATA_FROM_MODEL if isinstance(data, dict) and k in data]
    if given:
        raise ValueError(
            "config sets "
            + ", ".join(f"data.{k}" for k in given)
            + ": these come from the model; set "
            + ", ".join(f"model.{k}" for k in given)
            + " instead (the CLI links them into the data module)"
        )


class LlavaCLI(LightningCLI):
    """LightningCLI for LLaVA: model -> data links for tokenizer and image settings; `--ckpt_path` as the
    module docstring says (remote code from the command line only, clear errors, checked resumes)."""

    _ckpt_trust: tuple[bool, str] | None = None  # (the command line's trust_remote_code, the checkpoint)

    def __init__(self, *args, parser_kwargs: dict | None = None, **kwargs) -> None:
        parser_kwargs = dict(parser_kwargs or {})
        parser_kwargs.setdefault("parser_mode", config_base.register(check=refuse_linked_data_keys))
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which parses the checkpoint's hyperparameters over the command line
        (what happens instead: the module docstring, and `training/resume_check.py`)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        given = self.config[subcommand]
        ckpt_path = given.get("ckpt_path")
        if not ckpt_path:
            return
        model, data = plain_config(given.get("model") or {}), plain_config(given.get("data") or {})
        trust = remote_code_requested(model)
        self._ckpt_trust = (trust, str(ckpt_path))
        saved = saved_settings(ckpt_path, weights_only=given.get("weights_only") is not False)
        if saved is None:
            return
        saved_model, saved_data = saved
        if remote_code_requested(saved_model) and not trust:
            log.warning(
                "checkpoint %s asks for model.spec.language.trust_remote_code=true; ignored: remote code runs "
                "only on your own say-so (--model.spec.language.trust_remote_code=true), so transformers "
                "refuses code the model's files name",
                ckpt_path,
            )
        if subcommand == "fit":
            check_resume(ckpt_path, model, data, saved_model, saved_data)
            return
        taken = evaluation_model_settings(subcommand, ckpt_path, model, saved_model)
        if taken:
            try:
                self.config = self.parser.parse_object({subcommand: {"model": taken}}, self.config)
            except SystemExit:
                sys.stderr.write(f"Parsing of the hyperparameters of {ckpt_path} failed!\n")
                raise
        language = spec_language(self.config[subcommand].model.get("spec"))
        if language is not None:
            language.trust_remote_code = trust

    def instantiate_classes(self) -> None:
        if self._ckpt_trust is None:
            super().instantiate_classes()
            return
        # Whatever form the checkpoint's hyperparameters took, the module gets the command line's value.
        with callers_trust_remote_code(*self._ckpt_trust):
            super().instantiate_classes()

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.stage", "data.stage", apply_on="parse")
        # The module resolves these (a `--model.pretrained` checkpoint may supply them), so the data
        # takes the module's values once it is built.
        parser.link_arguments(
            "model", "data.template", compute_fn=lambda lit: lit.template, apply_on="instantiate"
        )
        parser.link_arguments(
            "model", "data.image_aspect", compute_fn=lambda lit: lit.image_aspect, apply_on="instantiate"
        )
        parser.link_arguments(
            "model", "data.tokenizer", compute_fn=lambda lit: lit.model.tokenizer, apply_on="instantiate"
        )
        parser.link_arguments(
            "model",
            "data.image_settings",
            compute_fn=lambda lit: ImageSettings.from_tower(
                lit.model.vision_tower, lit.model.image_grid_pinpoints
            ),
            apply_on="instantiate",
        )


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
    parser.add_argument(
        "--trust_remote_code",
        type=bool,
        default=False,
        help="Let transformers run code that the model's hub repository or folder names (only if you trust "
        "it). A checkpoint's own trust_remote_code is ignored",
    )
    parser.add_argument(
        "--qlora_base",
        choices=["auto", "original", "dequantized"],
        default="auto",
        help="Stage qlora: the un-quantized weights the adapters merge into: the base model's own (rebuilt from "
        "its hub name or folder), the checkpoint's 4-bit weights dequantized, or auto: the original where the "
        "spec names weights, else dequantized (docs/qlora.md)",
    )
    args = parser.parse_args(argv)
    with consolidated(args.ckpt_path) as ckpt_file:
        # A checkpoint that asks for remote code is named in a warning (by load_from_checkpoint).
        lit = LlavaLitModule.load_from_checkpoint(
            ckpt_file, map_location="cpu", weights_only=True, trust_remote_code=args.trust_remote_code
        )
    model = lit.model
    if lit.stage == "qlora":  # adapters merged into un-quantized base weights (training/qlora_merge.py)
        from .training.qlora_merge import merge_qlora

        base = merge_qlora(model, lit.spec, args.qlora_base, lit.pretrained)
        print(f"qlora: adapters merged into the {base} base weights")  # noqa: T201 (CLI output)
    elif hasattr(model.language_model, "merge_and_unload"):  # LoRA: fold the adapters into the weights
        model.language_model = model.language_model.merge_and_unload()
    # The template and image aspect ride along, so `--model.pretrained OUT` trains and answers as this run did.
    # The processor pads as training did and carries the template as a Jinja chat template (engines' prompts).
    tok = model.tokenizer
    chat_template = jinja_chat_template(lit.template, tok.bos_token, tok.eos_token)
    model.save_hf(args.out, template=lit.template, image_aspect=lit.image_aspect, chat_template=chat_template)
    save_stop_tokens(args.out, tok, lit.template)  # engines stop at the template's end of turn
    print(f"llava-hf folder written to {args.out}")  # noqa: T201 (CLI output)


# Subcommands beside LightningCLI's fit / validate / test / predict: name -> "module:function", each
# function taking the arguments after the name (imported only when run).
COMMANDS = {
    "export": "llava_lightning.cli:export",
    "chat": "llava_lightning.inference.chat_cli:main",
    "serve": "llava_lightning.serve.server:main",
    "evaluate": "llava_lightning.eval.evaluate:main",
    "score": "llava_lightning.eval.score:main",
}


def main(argv: list[str] | None = None) -> LlavaCLI | None:
    """Run a subcommand; returns the CLI (its `trainer.callback_metrics` hold the run's last metrics)."""
    given = argv
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] and argv[0] in COMMANDS:
        import importlib

        module, function = COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return None
    return LlavaCLI(
        LlavaLitModule,
        LlavaDataModule,
        save_config_kwargs={"overwrite": True},
        args=given,  # None: LightningCLI reads sys.argv itself (and does not warn that both were given)
    )
