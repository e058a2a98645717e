"""The package's import discipline: no reads of the import system's private state, and mergekit's private
names reached only through :mod:`mergekit_ota.compat` (whose version guard checks each of them)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List, Set

import mergekit

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "mergekit_ota").rglob("*.py"), ROOT / "mergekit_ota_autoload.py"])
COMPAT = ROOT / "mergekit_ota" / "compat.py"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _mergekit_private_names() -> Set[str]:
    """Every single-underscore name mergekit defines (functions, classes, methods, attributes, variables)."""
    names: Set[str] = set()
    for path in Path(mergekit.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {name for name in names if _is_private(name)}


def _is_mergekit(module: str) -> bool:
    return module == "mergekit" or module.startswith("mergekit.")


def _private_uses(path: Path, private: Set[str]) -> List[str]:
    """Where ``path`` imports a private mergekit name, reads or sets one as an attribute (also through
    ``getattr``/``setattr``), or overrides one as a method."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and not node.level and _is_mergekit(node.module or ""):
            parts = (node.module or "").split(".") + [alias.name for alias in node.names]
            found += [f"{where}: from {node.module} import {p}" for p in parts if _is_private(p)]
        elif isinstance(node, ast.Import):
            found += [
                f"{where}: import {a.name}"
                for a in node.names
                if _is_mergekit(a.name) and any(_is_private(p) for p in a.name.split("."))
            ]
        elif isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f"{where}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr"):
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in private:
                found.append(f"{where}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.ClassDef):
            found += [
                f"{where}: method {item.name}"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in private
            ]
    return found


def test_no_module_reads_the_import_systems_initializing_flag():
    """Import order is handled structurally (the start-up hook sees each module finish), never by reading
    ``__spec__._initializing``."""
    assert [str(p.relative_to(ROOT)) for p in SOURCES if "_initializing" in p.read_text(encoding="utf-8")] == []


def test_only_compat_touches_private_mergekit_names():
    """No module but compat.py imports, reads, sets or overrides a private (underscore) name of mergekit."""
    private = _mergekit_private_names()
    assert {"_plan", "_tensors", "_execute", "_bind_parameters", "_model_out_config"} <= private  # the scan sees them
    found = [use for path in SOURCES if path != COMPAT for use in _private_uses(path, private)]
    assert found == []
    assert _private_uses(COMPAT, private)  # compat is where they are (the scan finds them there)
