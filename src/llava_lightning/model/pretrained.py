"""What a released llava-hf checkpoint says about how it was trained: its conversation template and
image aspect, which `--model.pretrained` takes unless the command line sets them.

A folder our `export` wrote carries them in `llava_lightning.json`; for the llava-hf releases we know
the recipe (`KNOWN`); anything else must name its template on the command line, since the wrong
template trains and answers in a format the model never saw.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SETTINGS_FILE = "llava_lightning.json"
"""Written by `save_hf` beside config.json: the template and image aspect the model was trained with."""

# Hub names (owner/name, case-insensitive) -> (template, image aspect) of their training recipe:
# LLaVA-1.5 and LLaVA-NeXT-Vicuna fine-tune with the vicuna_v1 conversation and pad-to-square images.
KNOWN: dict[str, tuple[str, str]] = {
    r"llava-hf/llava-1\.5-(7b|13b)-hf": ("vicuna_v1", "pad"),
    r"llava-hf/llava-v1\.6-vicuna-(7b|13b)-hf": ("vicuna_v1", "pad"),
}


@dataclass
class TrainedWith:
    """The conversation template and image aspect a checkpoint was trained with, and where that came from."""

    template: str | None
    """Template name (`vicuna_v1`, ...), or None when the checkpoint does not say."""
    image_aspect: str | None
    """`pad` or `square`, or None when the checkpoint does not say."""
    source: str
    """Where the values came from (for the log)."""


def write_settings(folder: str | Path, template: str | None, image_aspect: str | None) -> None:
    """Record the template and image aspect in an exported folder (`SETTINGS_FILE`)."""
    data = {"template": template, "image_aspect": image_aspect}
    (Path(folder) / SETTINGS_FILE).write_text(json.dumps(data, indent=2) + "\n")


def trained_with(name_or_dir: str) -> TrainedWith:
    """The template and image aspect of a llava-hf folder or hub name (`SETTINGS_FILE`, else `KNOWN`)."""
    path = _settings_file(name_or_dir)
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable ({err}); fix or delete the file") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object with 'template' and 'image_aspect'")
        return TrainedWith(data.get("template"), data.get("image_aspect"), str(path))
    for pattern, (template, aspect) in KNOWN.items():
        if re.fullmatch(pattern, name_or_dir.strip("/"), flags=re.IGNORECASE):
            return TrainedWith(template, aspect, f"the known recipe of {name_or_dir}")
    where = "a folder without" if Path(name_or_dir).is_dir() else "not a folder here, and a hub name without"
    return TrainedWith(None, None, f"{name_or_dir} ({where} {SETTINGS_FILE}, not a known release)")


def _settings_file(name_or_dir: str) -> str | None:
    """The local path of `SETTINGS_FILE` in a folder or hub repository (cached), or None without one."""
    if Path(name_or_dir).is_dir():
        path = Path(name_or_dir) / SETTINGS_FILE
        return str(path) if path.is_file() else None
    from transformers.utils import cached_file

    try:
        return cached_file(
            name_or_dir,
            SETTINGS_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:  # not a hub name or not reachable: the known table decides
        return None


DEFAULT_TEMPLATE, DEFAULT_ASPECT = "vicuna_v1", "pad"
"""A run's template and image aspect when neither the command line nor a pretrained checkpoint sets them
(LLaVA-1.5's stage 2)."""


def resolve_settings(
    pretrained: str | None, template: str | None, image_aspect: str | None
) -> tuple[str, str]:
    """The run's (template, image aspect): the given values, else the pretrained checkpoint's, else the
    defaults; a pretrained checkpoint that does not say its template is refused without one given."""
    if pretrained is None or (template is not None and image_aspect is not None):
        return template or DEFAULT_TEMPLATE, image_aspect or DEFAULT_ASPECT
    known = trained_with(pretrained)
    if template is None and known.template is None:
        raise ValueError(
            f"cannot tell which conversation template {known.source} was trained with: set "
            "--model.template (vicuna_v1 for LLaVA-1.5 / LLaVA-NeXT-Vicuna, chatml for Qwen-based models, "
            "llama3, llama_2, or auto for the tokenizer's own chat template)"
        )
    template = template or known.template
    image_aspect = image_aspect or known.image_aspect or DEFAULT_ASPECT
    log.info(
        "pretrained %s: template %s, image aspect %s (from %s)",
        pretrained,
        template,
        image_aspect,
        known.source,
    )
    return template, image_aspect
