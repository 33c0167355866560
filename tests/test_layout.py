"""The house rules of the layout: one installed top-level package, and imports that point one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_imports_neither_the_jobs_nor_the_service() -> None:
    offenders = []
    for path in sorted((ROOT / "debias").rglob("*.py")):
        if path.name == "__main__.py":  # `python -m debias`: the program's entry point, above everything
            continue
        for name in _imports(path):
            if name.split(".")[:2] in (["debias", "pipelines"], ["debias", "service"]) or name.split(".")[0] in (
                "pipelines", "service"
            ):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_the_jobs_do_not_import_the_service_except_to_serve_it() -> None:
    for path in sorted((ROOT / "pipelines").glob("*.py")):
        if path.stem in ("serve", "ray_serve", "cli"):
            continue
        assert not [n for n in _imports(path) if n.startswith("debias.service")], path


@pytest.mark.parametrize("name", ["service", "pipelines"])
def test_only_debias_is_installed_at_the_top_level(name: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "No module named" in out.stderr
    ok = subprocess.run([sys.executable, "-c", f"import debias.{name}"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
