"""`--ckpt_path`: the command line against the checkpoint's settings, key by key.

A resumed run uses the command line's config (after `-c` files and flags, defaults included). Each
difference from the checkpoint's `hyper_parameters` (model) and `datamodule_hyper_parameters` (data) is
applied with a warning when its key is in `APPLIED_ON_RESUME` (it changes neither what trains nor which
samples are read in which order), or refused with a `ResumeMismatchError` naming key, checkpoint value and
command-line value. Linked values (`LINKED`) and `trust_remote_code` (always the command line's) are not
compared; a key the checkpoint predates takes the command line's value, named in a warning.
`validate` / `test` / `predict` evaluate the checkpoint's model instead (`evaluation_model_settings`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from .checkpoint_file import read_checkpoint

log = logging.getLogger(__name__)

# `fit --ckpt_path`: keys whose command-line value is applied when it differs from the checkpoint's (a key
# and everything under it), with why that keeps the resumed run exact. Every other difference is refused.
APPLIED_ON_RESUME: dict[str, str] = {
    "model.max_new_tokens": "used by generation / predict only",
    "model.projector_artifact": "names the file written at the end of align",
    "model.init_projector": "starting projector weights, which the checkpoint's replace",
    "model.sharded_init": "how the model is built before the checkpoint's weights replace it",
    "data.num_workers": "the loader resumes at its batch count with any number of workers",
    "data.strict": "raises on a bad sample instead of skipping it; the samples read are the same",
    "data.max_skip_ratio": "when to stop on skipped samples; the samples read are the same",
    "data.skip_window": "the window the skip ratio is checked over; the samples read are the same",
    "data.missing_data_hint": "error text only",
    "data.val": "validation data, not training data",
    "data.test": "`test` data, not training data",
    "data.predict": "`predict` prompts, not training data",
}
# Filled from the model by the CLI's links, not user settings.
LINKED = ("data.tokenizer", "data.image_settings", "data.stage", "data.template", "data.image_aspect")
_ABSENT = type("_Absent", (), {"__repr__": lambda self: "absent"})()


class ResumeMismatchError(ValueError):
    """`fit --ckpt_path` with a command line that changes what the checkpoint's run trained on or with."""


def _under(key: str, prefixes) -> bool:
    """`key` is one of `prefixes` or lies under one (`data.val.finetune[0].path` under `data.val`)."""
    return any(key == p or key.startswith((p + ".", p + "[")) for p in prefixes)


def _is_remote_code_key(key: str) -> bool:
    """`model.spec.language.trust_remote_code`, also in jsonargparse's `class_path` / `init_args` form."""
    return key.startswith("model.spec.") and key.endswith(".language.trust_remote_code")


class _Fields(dict):
    """A config schema's values (a namespace or dataclass): a key the checkpoint lacks is one it predates
    (in a free-form dict such as `spec.vision.config`, a missing key is a difference)."""


def plain_config(value: Any) -> Any:
    """Config values as plain data to compare: namespaces and dataclasses as `_Fields`, mappings as dicts,
    tuples as lists."""
    if isinstance(value, Namespace):
        return _Fields({k: plain_config(v) for k, v in vars(value).items()})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _Fields({f.name: plain_config(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, Mapping):
        return {str(k): plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _differences(given: Any, saved: Any, key: str) -> Iterator[tuple[str, Any, Any, bool]]:
    """(key, checkpoint value, command-line value, whether the checkpoint predates the key) of every leaf
    where a plain command-line config and a plain checkpoint config differ. A schema key the command line
    lacks (a setting since removed) is not compared."""
    if isinstance(given, dict) and isinstance(saved, dict):
        schema = isinstance(given, _Fields)
        for k in [*given, *(k for k in saved if k not in given and not schema)]:
            if schema and k not in saved:
                yield f"{key}.{k}", _ABSENT, given[k], True
            else:
                yield from _differences(given.get(k, _ABSENT), saved.get(k, _ABSENT), f"{key}.{k}")
    elif isinstance(given, list) and isinstance(saved, list) and len(given) == len(saved):
        for i, (g, c) in enumerate(zip(given, saved)):
            yield from _differences(g, c, f"{key}[{i}]")
    elif given != saved:
        yield key, saved, given, False


def _section_differences(section: str, given: dict, saved: dict) -> Iterator[tuple[str, Any, Any, bool]]:
    """`_differences` of a command-line section (`model`, `data`) and its checkpoint hyperparameters,
    without the linked values and `trust_remote_code` (always the command line's)."""
    for key, old, new, predated in _differences(given, saved, section):
        if not _under(key, LINKED) and not _is_remote_code_key(key):
            yield key, old, new, predated


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def spec_language(spec: Any) -> Any:
    """The `language` part of a spec config (plain or `class_path` / `init_args` form), or None."""
    if spec is None:
        return None
    if "class_path" in spec:
        spec = spec.get("init_args") or {}
    return spec.get("language")


def remote_code_requested(model: dict) -> bool:
    language = spec_language(model.get("spec"))
    return bool(language is not None and language.get("trust_remote_code"))


def saved_settings(ckpt_path: str | Path, weights_only: bool = True) -> tuple[dict, dict] | None:
    """(model, data) settings a checkpoint saved, as plain data: from a `.ckpt` file or the `meta.pt`
    beside a sharded FSDP2 / FSDP folder's shards, read with weights only and memory-mapped; None where
    Lightning resolves or reads the checkpoint itself (`last`, `best`, `hpc`, DeepSpeed folders)."""
    path = Path(ckpt_path)
    if path.is_file():
        checkpoint = read_checkpoint(path, weights_only=weights_only)
    elif path.is_dir() and (path / "meta.pt").is_file():
        checkpoint = read_checkpoint(path / "meta.pt", weights_only=weights_only)
    else:
        return None
    model = plain_config(checkpoint.get("hyper_parameters") or {})
    data = plain_config(checkpoint.get("datamodule_hyper_parameters") or {})
    for saved in (model, data):
        for private in ("_instantiator", "_class_path"):
            saved.pop(private, None)
    return model, data


def check_resume(ckpt_path, model: dict, data: dict, saved_model: dict, saved_data: dict) -> None:
    """Apply (with a warning) or refuse each difference between the command line and the checkpoint;
    the run then uses the command line's config."""
    for section, saved in (("model", saved_model), ("data", saved_data)):
        if not saved:
            log.warning(
                "fit --ckpt_path %s: the checkpoint holds no %s settings, so the command line's %s.* "
                "cannot be checked against the run that wrote it",
                ckpt_path,
                section,
                section,
            )
    differences = [
        *_section_differences("model", model, saved_model),
        *_section_differences("data", data, saved_data),
    ]
    refused, predated_keys = [], []
    for key, old, new, predated in differences:
        if predated:
            predated_keys.append(f"{key}={_show(new)}")
        elif _under(key, APPLIED_ON_RESUME):
            reason = next(why for k, why in APPLIED_ON_RESUME.items() if _under(key, [k]))
            log.warning(
                "fit --ckpt_path %s: %s is %s on the command line, %s in the checkpoint; the command "
                "line's value applies (%s)",
                ckpt_path,
                key,
                _show(new),
                _show(old),
                reason,
            )
        else:
            refused.append(f"  {key}: checkpoint {_show(old)}, command line {_show(new)}")
    if predated_keys:
        log.warning(
            "fit --ckpt_path %s: the checkpoint predates these settings; the command line's values apply: %s",
            ckpt_path,
            ", ".join(predated_keys),
        )
    if refused:
        raise ResumeMismatchError(
            f"fit --ckpt_path {ckpt_path}: the command line differs from the checkpoint in settings a "
            "resumed run cannot change (they shape what trains, with what, or which samples are read):\n"
            + "\n".join(refused)
            + "\nTo continue the run, drop these flags (or -c values) so the checkpoint's values stay (a "
            "resumed run takes the -c files and flags of the run that wrote the checkpoint). To "
            "train with the new values, start a new run without --ckpt_path from the checkpoint's weights "
            "(LlavaLitModule.load_from_checkpoint; the optimizer, schedule and data position then start "
            "afresh)."
        )


def evaluation_model_settings(subcommand: str, ckpt_path, model: dict, saved_model: dict) -> dict:
    """validate / test / predict evaluate the checkpoint's model: the checkpoint's model settings to parse
    over the command line's, all but the keys of `APPLIED_ON_RESUME` (generation settings among them) and
    `trust_remote_code`; each difference is named in a warning."""
    for key, old, new, predated in _section_differences("model", model, saved_model):
        kept = predated or _under(key, APPLIED_ON_RESUME)
        log.warning(
            "%s --ckpt_path %s: %s is %s on the command line, %s in the checkpoint; the %s value applies",
            subcommand,
            ckpt_path,
            key,
            _show(new),
            _show(old),
            "command line's" if kept else "checkpoint's",
        )
    return {
        k: v for k, v in saved_model.items() if k in model and not _under(f"model.{k}", APPLIED_ON_RESUME)
    }
