"""Reading checkpoint files one may not trust: a clear error for a file that cannot be read safely,
and remote code only on the caller's own say-so, whatever a checkpoint's hyperparameters ask for.

`read_checkpoint` loads with weights only (torch's allowlist), memory-mapped, and turns every failure
(empty, truncated, foreign file, objects outside the allowlist) into a `CheckpointLoadError` naming the
file, never torch's advice to retry with `weights_only=False`. Inside `callers_trust_remote_code`,
every `LlavaLitModule` built (by `load_from_checkpoint` or the CLI on `--ckpt_path`) gets the caller's
`trust_remote_code` in its spec (`with_callers_trust`).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..model.specs import LlavaSpec

log = logging.getLogger(__name__)


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that cannot be read safely: empty, truncated, not a PyTorch checkpoint, or
    holding objects outside torch's weights-only allowlist. Nothing was loaded from it."""


_NOT_LOADED = (
    "The file was not loaded. Do not retry with weights_only=False for a file you do not trust: that "
    "unpickles it without the allowlist, which runs any code the file names."
)


def _torch_detail(err: BaseException) -> str:
    """The informative part of a torch.load error, without torch's advice to drop the allowlist."""
    text = str(err)
    for pattern in (r"GLOBAL [\w.]+", r"Unsupported operand \d+"):
        found = re.search(pattern, text)
        if found:
            return found.group(0)
    first = text.strip().splitlines()[0][:160] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def read_checkpoint(path: str | Path, *, weights_only: bool = True, mmap: bool = True) -> dict[str, Any]:
    """`torch.load` of a local checkpoint file onto the CPU, weights only unless the caller says otherwise,
    memory-mapped where the format allows (reading `hyper_parameters` then reads no weights).

    A file that cannot be read raises `CheckpointLoadError` naming it and what is wrong with it (empty,
    truncated, not a PyTorch checkpoint, objects outside the weights-only allowlist), never torch's
    advice to retry with `weights_only=False`."""
    path = Path(path)
    size = path.stat().st_size  # a missing file: FileNotFoundError, which names it
    if size == 0:
        raise CheckpointLoadError(
            f"cannot load checkpoint {path}: the file is empty (0 bytes). {_NOT_LOADED}"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = zipfile.is_zipfile(path)
    if head == b"PK\x03\x04" and not is_zip:
        raise CheckpointLoadError(
            f"cannot load checkpoint {path}: the file is truncated (PyTorch's zip archive stops after {size} "
            f"bytes, before its end: an interrupted write or copy). {_NOT_LOADED}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap and is_zip)
    except Exception as err:  # noqa: BLE001 (every unpickling failure gets the same clear message)
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err):
            what = (
                f"it holds objects outside torch's weights-only allowlist ({_torch_detail(err)}); an "
                "llava_lightning checkpoint holds only tensors, plain values and the config classes this "
                "package registers (a file of your own with a class of your own: register that class with "
                "torch.serialization.add_safe_globals)"
            )
        elif is_zip:
            what = f"the file is a damaged or truncated PyTorch checkpoint ({_torch_detail(err)})"
        else:
            what = (
                "the file is not a PyTorch checkpoint, or is a truncated one in torch's legacy format "
                f"({_torch_detail(err)})"
            )
        raise CheckpointLoadError(f"cannot load checkpoint {path}: {what}. {_NOT_LOADED}") from None


# Set (by `callers_trust_remote_code`) while `LlavaLitModule.load_from_checkpoint` or the CLI on
# `--ckpt_path` builds the module: (the caller's trust_remote_code, the checkpoint). It replaces the
# spec's value, whatever the checkpoint's hyperparameters said.
_CALLER_TRUST_REMOTE_CODE: ContextVar[tuple[bool, str] | None] = ContextVar(
    "_CALLER_TRUST_REMOTE_CODE", default=None
)


@contextlib.contextmanager
def callers_trust_remote_code(trust: bool, checkpoint: str) -> Iterator[None]:
    """Every `LlavaLitModule` built inside gets `trust_remote_code=trust` in its spec, whatever its
    hyperparameters say (they came from `checkpoint`, which a warning names if it asked for remote code)."""
    token = _CALLER_TRUST_REMOTE_CODE.set((trust, checkpoint))
    try:
        yield
    finally:
        _CALLER_TRUST_REMOTE_CODE.reset(token)


def with_callers_trust(spec: LlavaSpec) -> LlavaSpec:
    """`spec` with the caller's `trust_remote_code` inside `callers_trust_remote_code` (else `spec`
    unchanged): a checkpoint's hyperparameters never switch remote code on."""
    caller = _CALLER_TRUST_REMOTE_CODE.get()
    if caller is None:
        return spec
    trust, source = caller
    if spec.language.trust_remote_code and not trust:
        log.warning(
            "checkpoint %s asks for model.spec.language.trust_remote_code=True; ignored: remote code runs only "
            "on your own say-so (LlavaLitModule.load_from_checkpoint(..., trust_remote_code=True), "
            "`export --trust_remote_code=true`, or --model.spec.language.trust_remote_code=true), so "
            "transformers refuses code the model's files name",
            source,
        )
    return replace(spec, language=replace(spec.language, trust_remote_code=trust))
