"""The package's layers, as docs/architecture.md draws them: every import inside mlilt points
to the same layer or one below it, so there are no cycles between the parts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mlilt

PACKAGE = Path(mlilt.__file__).parent

# Bottom to top. A module may import from its own layer and from any layer below it.
LAYERS = [
    {"errors", "defaults", "files"},
    {"towers"},
    {"methods"},
    {"packs", "hub"},  # hub: packs on the Hugging Face Hub (resolve_pack's hf:// hook)
    {"modeling"},
    {"speed"},
    {"data"},
    {"datasets"},
    {"evaluation"},
    {"training"},
    {"api", "clip_model"},
    {"export"},  # packs in other libraries' formats (sentence-transformers, PEFT)
    {"demo"},
    {"studies"},
    {"cli", "__main__"},
]
LEVEL = {part: level for level, parts in enumerate(LAYERS) for part in parts}
MODULES = sorted(PACKAGE.rglob("*.py"))


def _part(module: str) -> str:
    """The layer-level part a dotted module name belongs to: ``mlilt.towers.text`` -> towers."""
    return module.split(".")[1] if "." in module else "mlilt"


def _imports(source: Path) -> list[tuple[str, list[str], int]]:
    tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for inner in ast.walk(node)}  # annotations only: never imported at run time
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "mlilt":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "mlilt"]
    return found


def test_every_part_has_a_layer():
    parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES} - {"__init__"}
    assert parts == set(LEVEL), "a part of the package is missing from LAYERS (or LAYERS names one that is gone)"


@pytest.mark.parametrize("source", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_imports_point_down(source):
    relative = source.relative_to(PACKAGE)
    if relative.as_posix() == "__init__.py":
        return  # the package root re-exports the public API lazily
    own = relative.parts[0].removesuffix(".py")
    for module, names, line in _imports(source):
        target = _part(module)
        if target == "mlilt":  # ``from mlilt import ...``: the version is fine anywhere, the API is a layer
            if set(names) <= {"__version__"}:
                continue
            target = "api"
        assert LEVEL[target] <= LEVEL[own], \
            f"{relative}:{line} imports {module} ({target}), a layer above {own}"
