"""The architecture's rules, checked on the source: one-way layers, no import dodging a cycle,
and first-party imports that a type checker resolves from a plain checkout."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"gradserve": ROOT / "client" / "gradserve", "gradserve_engine": ROOT / "workers" / "gradserve_engine",
            "gradserve_server": ROOT / "server" / "gradserve_server"}
# what each layer may import: the engine stands alone, the SDK builds on it, the server on both
ALLOWED = {"gradserve_engine": {"gradserve_engine"}, "gradserve": {"gradserve", "gradserve_engine"},
           "gradserve_server": {"gradserve_server", "gradserve", "gradserve_engine"}}


def _sources(package: str) -> list[Path]:
    return sorted(p for p in PACKAGES[package].rglob("*.py") if "v1" not in p.relative_to(PACKAGES[package]).parts)


def _first_party_imports(path: Path, package: str) -> list[tuple[int, str, bool]]:
    """(line, imported top-level package, inside a function) of every first-party import."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name.split(".")[0], in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                top = package if child.level else (child.module or "").split(".")[0]
                found.append((child.lineno, top, in_function))
            visit(child, nested)

    visit(tree, False)
    return [f for f in found if f[1] in PACKAGES]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_layers_import_one_way(package: str) -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {top}"
             for path in _sources(package) for line, top, _ in _first_party_imports(path, package)
             if top not in ALLOWED[package]]
    assert wrong == [], f"{package} may import only {sorted(ALLOWED[package])}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_first_party_import_inside_a_function(package: str) -> None:
    """Imports inside functions hid import cycles; only optional heavy libraries stay lazy."""
    inside = [f"{path.relative_to(ROOT)}:{line} imports {top}"
              for path in _sources(package) for line, top, nested in _first_party_imports(path, package) if nested]
    assert inside == []


def test_type_checker_resolves_every_first_party_import() -> None:
    """mypy, configured in pyproject.toml with the three package folders as its path, checks the
    packages from this checkout (not an installed copy): every first-party import resolves."""
    result = subprocess.run([sys.executable, "-m", "mypy", "-p", "gradserve", "-p", "gradserve_engine",
                             "-p", "gradserve_server"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
