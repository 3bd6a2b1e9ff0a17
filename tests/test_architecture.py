"""ARCHITECTURE.md's layers hold in the tree: every import of a partial_fc module runs to the same or a lower layer."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.launchers import REPO

# Lowest first, as ARCHITECTURE.md lists them; a layer may import only itself and the layers before it.
LAYERS = (
    ("__init__", "errors", "fileio", "progress"),
    ("comm",),
    ("heads",),
    ("backbones",),
    ("data",),
    ("eval",),
    ("export",),
    ("engine",),
    ("perf",),
    ("cli", "__main__", "configs"),
)
# The one upward import, named in ARCHITECTURE.md: the GPU script drives `partial-fc train` through the CLI.
ALLOWED_UPWARD = {("partial_fc/perf/gpu.py", "partial_fc.cli.main")}


def _rank(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "partial_fc" or len(parts) < 2:
        return None
    for rank, names in enumerate(LAYERS):
        if parts[1] in names:
            return rank
    raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md")


def _imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted((REPO / "partial_fc").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        own = _rank(".".join(Path(relative).with_suffix("").parts))
        for module in _imports(ast.parse(path.read_text())):
            target = _rank(module)
            if target is not None and own is not None and target > own and (relative, module) not in ALLOWED_UPWARD:
                upward.append(f"{relative} imports {module}")
    assert upward == []


def test_the_architecture_page_is_short_and_names_every_folder():
    page = (REPO / "ARCHITECTURE.md").read_text()
    assert len(page.splitlines()) < 80
    folders = {path.name for path in (REPO / "partial_fc").iterdir() if path.is_dir() and path.name != "__pycache__"}
    for folder in folders:
        assert f"`{folder}/`" in page, folder
