"""Projector files: our stage-1 artifact (written and read here) and the original LLaVA's `mm_projector.bin`.

Our artifact is `<name>.safetensors` (the projector's state dict) with `<name>.json` beside it (the
projector type, the vision and language specs it was trained with, the step). On load the JSON, when
present, must name the model's projector type.

LLaVA stores its projector as an `nn.Sequential` under `model.mm_projector`: Linear layers sit at
even indices (`0`, `2`, ...) with GELU between, or a bare Linear (`model.mm_projector.weight`) for
the v1 `linear` projector. Ours are `linear_1`, `linear_2`, ... as in transformers.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from .projector import projector_depth

log = logging.getLogger(__name__)

_LLAVA_KEY = re.compile(r"^(?:model\.)?mm_projector\.(?:(\d+)\.)?(weight|bias)$")


def convert_llava_projector_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model.mm_projector.{0,2}.{weight,bias}` -> `linear_{1,2}.{weight,bias}`."""
    out = {}
    for key, value in state.items():
        m = _LLAVA_KEY.match(key)
        if not m:
            raise ValueError(f"unexpected key {key!r} in a LLaVA projector file (want model.mm_projector.*)")
        index = int(m.group(1) or 0)
        if index % 2:
            raise ValueError(f"key {key!r}: LLaVA projector Linear layers sit at even indices")
        out[f"linear_{index // 2 + 1}.{m.group(2)}"] = value
    return out


def save_projector_artifact(
    path: str | Path, state: dict[str, torch.Tensor], projector_type: str, **meta: Any
) -> Path:
    """Write `state` as `path` (safetensors) and `path.with_suffix(".json")`: `{"projector": type, **meta}`
    (the training run adds `vision`, `language` and `global_step`)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    path.with_suffix(".json").write_text(
        json.dumps({"projector": projector_type, **meta}, indent=2, default=str)
    )
    log.info("projector artifact written to %s", path)
    return path


def _check_artifact_json(path: Path, projector_type: str) -> None:
    """The `.json` beside our artifact, when present, must describe a projector of `projector_type`."""
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        return
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: not the JSON our projector artifact writes ({err})") from err
    written = meta.get("projector") if isinstance(meta, dict) else None
    if written is not None and written != projector_type:
        raise ValueError(
            f"{path} holds a {written!r} projector ({meta_path}), but this model's projector is "
            f"{projector_type!r}: set `projector` to match the file"
        )


def load_projector_state(path: Path, projector_type: str) -> dict[str, torch.Tensor]:
    """Projector state dict in our key names from `.safetensors` (ours) or `.bin`/`.pt` (LLaVA)."""
    if not path.exists():
        raise FileNotFoundError(f"projector file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        _check_artifact_json(path, projector_type)
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if any(k.startswith(("model.mm_projector", "mm_projector")) for k in state):
            state = convert_llava_projector_keys(state)
    depth = projector_depth(projector_type)
    found = {int(k.split(".")[0].split("_")[1]) for k in state if k.startswith("linear_")}
    if found != set(range(1, depth + 1)):
        raise ValueError(
            f"{path} holds a projector with Linear layers {sorted(found)}, but this model's projector "
            f"is {projector_type!r} ({depth} Linear layers): set `projector` to match the file"
        )
    return state
