"""The package's import rules: `model/` and `data/` stand side by side; the LightningModule names no strategy.

Every import statement is read from the source (also those inside functions and under TYPE_CHECKING),
relative ones resolved against the file's package.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llava_lightning"
FORBIDDEN = {
    "model": ("llava_lightning.data", "llava_lightning.training"),
    "data": ("llava_lightning.model", "llava_lightning.training"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`."""
    package = ["llava_lightning", *path.relative_to(PACKAGE).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            # `from . import x` / `from .. import data`: each name may be a module.
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_the_import_reader_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    source = PACKAGE / "model" / "_probe.py"
    text = "def f():\n    from ..data import templates\n    from . import llava\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self == source else "")
    assert _imports(source) == [
        (2, "llava_lightning.data.templates"),
        (3, "llava_lightning.model.llava"),
    ]


@pytest.mark.parametrize("side", sorted(FORBIDDEN))
def test_model_and_data_do_not_import_each_other(side):
    offending = [
        f"{path.relative_to(PACKAGE)}:{line}: {name}"
        for path in sorted((PACKAGE / side).rglob("*.py"))
        for line, name in _imports(path)
        if name.startswith(FORBIDDEN[side])
    ]
    assert not offending, f"{side}/ must not import {FORBIDDEN[side]}:\n" + "\n".join(offending)


def test_the_lightning_module_names_no_strategy_class():
    source = (PACKAGE / "module.py").read_text()
    names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)}
    strategies = {n for n in names if n.endswith("Strategy")}
    assert not strategies, (
        f"module.py names strategy classes {strategies}: that belongs in training/strategies.py"
    )
    imported = [name for _, name in _imports(PACKAGE / "module.py")]
    assert not [
        n
        for n in imported
        if n.startswith(("lightning.pytorch.strategies", "deepspeed", "torch.distributed"))
    ]
