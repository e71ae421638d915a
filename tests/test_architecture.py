"""The package's structure: no import cycles, and the comparison and training code never name an
estimator (they read what each estimator declares)."""

from __future__ import annotations

import ast
from pathlib import Path

from diffpg import estimators

PACKAGE = Path(__file__).resolve().parents[1] / "diffpg"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The diffpg modules ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_no_module_imports_a_module_that_imports_it_back():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    graph = {_module_name(path): _imports(path, modules) for path in paths}
    # A package imports its submodules and they import the package's names: not a cycle of
    # modules, so edges to a package from its own submodules are left out.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(t + ".")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for target in graph[start]:
            if target == goal or (target not in seen and reaches(target, goal, seen | {target})):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_comparison_and_training_name_no_estimator():
    names = set(estimators.names())
    for module in ("compare.py", "training.py", "runs.py", "cli.py", "command_line.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        named = {node.value for node in ast.walk(tree)
                 if isinstance(node, ast.Constant) and node.value in names}
        assert not named, f"diffpg/{module} names estimators {sorted(named)}"
