"""The imports point one way: every artdist module imports only modules of its own layer or below (docs/design.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "artdist"

# Bottom to top; a module's layer is that of the longest prefix listed. Same-layer imports are allowed.
LAYERS = [
    ("artdist.errors",),
    ("artdist.config", "artdist.dist", "artdist.metrics", "artdist.progress", "artdist.rundir"),
    ("artdist.data", "artdist.audit.folds", "artdist.audit"),
    ("artdist.model",),
    ("artdist.train",),
    ("artdist.outliers", "artdist.bench", "artdist.checklist", "artdist.audit.merge", "artdist.audit.peer"),
    ("artdist.job", "artdist.submit", "artdist.audit.run"),
    ("artdist.commands",),
    ("artdist.cli", "artdist.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    if module == "artdist":  # the package's __init__: a docstring only
        return 0
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    if layer is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/design.md's table")
    return layer


def artdist_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an artdist module in `path`, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "artdist"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "artdist":  # from artdist import dist, ...
                found += [(node.lineno, f"artdist.{a.name}") for a in node.names]
            elif node.module.startswith("artdist."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import; spell it artdist.…")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert MODULES
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    module = module_name(path)
    own = layer_of(module)
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line}: {module} (layer {own}) imports {target} "
              f"(layer {layer_of(target)})"
              for line, target in artdist_imports(path) if layer_of(target) > own]
    assert not upward, "\n".join(upward)


def test_nothing_below_the_cli_imports_it():
    importers = [module_name(p) for p in MODULES
                 if module_name(p) not in ("artdist.cli", "artdist.__main__")
                 and any(t == "artdist.cli" or t.startswith("artdist.cli.") for _, t in artdist_imports(p))]
    assert importers == []


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef f():\n    from artdist.cli import main\n    from artdist import job\n")
    assert [t for _, t in artdist_imports(bad)] == ["artdist.cli", "artdist.job"]
    assert layer_of("artdist.cli") > layer_of("artdist.data.loader") < layer_of("artdist.job")
