"""The packages' layering: `data_pipeline` imports nothing of `pretrain` or `cluster`, and
`pretrain` nothing of `cluster`, anywhere in a module (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

FORBIDDEN = {"data_pipeline": ("pretrain", "cluster"), "pretrain": ("cluster",)}


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {(node.lineno, alias.name.split(".")[0]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.lineno, node.module.split(".")[0]))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_lower_layer_imports_no_higher_one(package):
    modules = sorted((REPO / package).rglob("*.py"))
    assert modules
    breaches = [
        f"{module.relative_to(REPO)}:{line} imports {name}"
        for module in modules
        for line, name in sorted(imported_packages(module))
        if name in FORBIDDEN[package]
    ]
    assert not breaches, breaches


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "lazy.py"
    module.write_text(
        "def f():\n    from cluster.launch.plan import RANK_MODULE\n    import pretrain.x\n"
    )
    assert imported_packages(module) == {(2, "cluster"), (3, "pretrain")}
