"""The package's structure in numbers (issue 27's before/after): lines and modules, import cycles (module-level and
function-level imports alike), functions above complexity 10 (ruff's C901), and start-up times.

    python -m benchmarks.structure [REPO]            # REPO: a checkout (default: this one)
    python -m benchmarks.structure BEFORE AFTER      # start-up of both, alternating in one run (time as ratios)
"""

from __future__ import annotations

import ast
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Set

STARTUP = ("import mergekit.merge_methods as m; m.get('ota')", "import mergekit_ota")


def modules(repo: Path) -> Dict[str, Path]:
    """``{dotted name: file}`` of every module of ``repo/mergekit_ota``."""
    found = {}
    for path in sorted((repo / "mergekit_ota").rglob("*.py")):
        parts = list(path.relative_to(repo).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(mods: Dict[str, Path]) -> Dict[str, Set[str]]:
    """Who imports whom inside the package (``from pkg import sub`` counts as importing ``sub`` only)."""
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                target = (
                    ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                    if node.level
                    else node.module or ""
                )
                subs = [f"{target}.{alias.name}" for alias in node.names]
                known = [s for s in subs if s in mods]
                candidates = known if len(known) == len(subs) else [target, *known]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in mods:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    graph[name].add(candidate)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def complex_functions(repo: Path) -> List[tuple]:
    """``(complexity, function, file)`` above 10, largest first (ruff's C901)."""
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "C901", "--config", "lint.mccabe.max-complexity=10"]
        + ["--output-format", "concise", "--no-cache", str(repo / "mergekit_ota")],
        capture_output=True,
        text=True,
    ).stdout
    found = re.findall(r"^(\S+?):\d+:\d+: C901 `(\S+)` is too complex \((\d+) > 10\)", out, re.M)
    return sorted(((int(c), f, path) for path, f, c in found), reverse=True)


def startup(trees: List[str], rounds: int = 8) -> Dict[str, Dict[str, float]]:
    """Median seconds of each :data:`STARTUP` line per tree, the trees alternating in one run (run from ``/``: the
    current directory would come before ``PYTHONPATH`` on ``sys.path``)."""
    times: Dict[str, Dict[str, List[float]]] = {t: {c: [] for c in STARTUP} for t in trees}
    for _ in range(rounds):
        for tree in trees:
            for code in STARTUP:
                started = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": tree}, cwd="/", check=True
                )
                times[tree][code].append(time.perf_counter() - started)
    return {t: {c: statistics.median(v) for c, v in by.items()} for t, by in times.items()}


def main() -> None:
    trees = [str(Path(a).resolve()) for a in sys.argv[1:]] or [str(Path(__file__).resolve().parents[1])]
    for tree in trees:
        repo = Path(tree)
        mods = modules(repo)
        lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in mods.values())
        print(f"{tree}: {len(mods)} modules, {lines} lines")
        for group in cycles(import_graph(mods)):
            print("  import cycle:", " <-> ".join(group))
        functions = complex_functions(repo)
        print(f"  functions above complexity 10: {len(functions)}; largest: {functions[:3]}")
    for tree, by in startup(trees).items():
        print(tree, {code: f"{seconds:.3f} s" for code, seconds in by.items()})


if __name__ == "__main__":
    main()
