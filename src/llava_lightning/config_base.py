"""`_base_:` in a config file: load another file first and merge this one over it, key by key.

`conf/stage1.yaml` starts with `_base_: llava15_7b.yaml`, so `fit -c conf/stage1.yaml` reads the shared
LLaVA-1.5-7B settings, then the stage's own. Mappings merge recursively; any other value (a list, a
scalar) replaces the base's. The path is relative to the including file (jsonargparse reads a config
file from inside its folder); bases may have bases. Registered as the loader of the CLI's
`omegaconf+` parser mode, which resolves `${...}` after all `-c` files are merged, so an
interpolation may point into another file. `${trainer.max_epochs}` names a key from the config's top
(as in one file); the loader rewrites it relative to where it stands (`${..trainer.max_epochs}`),
because the merged config sits under the subcommand (`fit.trainer...`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import get_loader, set_loader

BASE_KEY = "_base_"
PARSER_MODE = "omegaconf+"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: nested mappings merged, everything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_bases(value: Any, folder: Path, chain: tuple[Path, ...] = ()) -> Any:
    if not isinstance(value, dict) or BASE_KEY not in value:
        return value
    over = dict(value)
    name = over.pop(BASE_KEY)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{BASE_KEY} must name a YAML file, got {name!r}")
    path = (folder / name).resolve()
    if path in chain:
        raise ValueError(f"{BASE_KEY} loop: {' -> '.join(map(str, (*chain, path)))}")
    if not path.is_file():
        raise FileNotFoundError(f"{BASE_KEY}: {path} not found (the path is relative to the including file)")
    base = _resolve_bases(_yaml(path.read_text()), path.parent, (*chain, path))
    if not isinstance(base, dict):
        raise ValueError(f"{BASE_KEY}: {path} does not hold a mapping")
    return merge(base, over)


def _yaml(text: str) -> Any:
    return get_loader("yaml")(text)


_ABSOLUTE = re.compile(r"\$\{([A-Za-z_][\w\[\].]*)\}")


def relative_interpolations(node: Any, depth: int = 0) -> Any:
    """`${a.b}` at `depth` containers below the top -> `${` + depth dots + `a.b}` (OmegaConf's relative form)."""
    if isinstance(node, dict):
        return {k: relative_interpolations(v, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [relative_interpolations(v, depth + 1) for v in node]
    if isinstance(node, str) and depth:
        return _ABSOLUTE.sub(lambda m: "${" + "." * depth + m.group(1) + "}", node)
    return node


def load_with_base(text: str) -> Any:
    """The CLI's config loader: YAML with `_base_` applied and interpolations made relative (the parser
    resolves them once every file is merged)."""
    value = _resolve_bases(_yaml(text), Path.cwd())
    return relative_interpolations(value) if isinstance(value, dict) else value


def register(check: Callable[[Any], None] | None = None) -> str:
    """Install the loader for the CLI's parser mode (`check` sees every loaded value and may raise);
    returns the mode to pass as `parser_mode`."""

    def load(text: str) -> Any:
        value = load_with_base(text)
        if check is not None:
            check(value)
        return value

    set_loader(PARSER_MODE, load, exceptions=(yaml.YAMLError,))
    return PARSER_MODE
