"""The package's structure: no import cycles, and the comparison and training code never name an
estimator (they read what each estimator declares)."""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

from diffpg import estimators

PACKAGE = Path(__file__).resolve().parents[1] / "diffpg"
ENVS = PACKAGE.parent / "envs"
"""The environments' folder, installed as ``diffpg.envs``."""


def _module_name(path: Path) -> str:
    if path.is_relative_to(ENVS):
        parts = ("diffpg", "envs", *path.relative_to(ENVS).with_suffix("").parts)
    else:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The diffpg modules ``path`` imports anywhere (module level or inside functions);
    ``from package import submodule`` imports the submodule."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name for name in submodules if name in modules]
            if len(names) < len(submodules):  # names defined in the module itself
                names.append(node.module)
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def _import_graph() -> dict[str, set[str]]:
    """Each module of ``diffpg`` and ``diffpg.envs`` -> the modules of both it imports. A package
    imports its submodules and they import the package's names: not a cycle of modules, so
    edges to a package from its own submodules are left out."""
    paths = sorted([*PACKAGE.rglob("*.py"), *ENVS.rglob("*.py")])
    modules = {_module_name(path) for path in paths}
    graph = {_module_name(path): _imports(path, modules) for path in paths}
    return {name: {t for t in targets if not name.startswith(t + ".") and t != name}
            for name, targets in graph.items()}


def test_no_module_imports_a_module_that_imports_it_back():
    graph = _import_graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for target in graph[start]:
            if target == goal or (target not in seen and reaches(target, goal, seen | {target})):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def _drawn_floors() -> dict[str, int]:
    """docs/architecture.md's floors drawing: module -> floor (``pkg.{a, b}`` is two modules)."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    drawing = text.split("## Floors", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    floors, floor = {}, None
    for line in drawing.splitlines():
        match = re.match(r"\s*(\d+)?\s+([\w.]+(?:\{[^}]*\})?)", line)
        floor = int(match.group(1)) if match.group(1) else floor
        spec = match.group(2)
        prefix, _, group = spec.partition("{")
        names = ([prefix + name for name in group.rstrip("}").split(", ")] if group
                 else [spec])
        floors.update({name: floor for name in names})
    return floors


def test_the_architecture_drawing_is_the_import_graph():
    """docs/architecture.md draws every module of both packages on the floor its imports give it
    (one more than the highest it imports from), and no module that does not exist."""
    graph = _import_graph()

    @functools.cache
    def floor(module: str) -> int:
        return 1 + max((floor(target) for target in graph[module]), default=-1)

    computed = {module: floor(module) for module in graph}
    drawn = _drawn_floors()
    assert sorted(set(drawn) - set(computed)) == [], "drawn modules that do not exist"
    assert sorted(set(computed) - set(drawn)) == [], "modules docs/architecture.md leaves out"
    moved = {m: (drawn[m], computed[m]) for m in computed if drawn[m] != computed[m]}
    assert moved == {}, f"module: (drawn floor, floor from its imports): {moved}"


def test_comparison_and_training_name_no_estimator():
    names = set(estimators.names())
    for module in ("compare.py", "training.py", "runs.py", "cli.py", "command_line.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        named = {node.value for node in ast.walk(tree)
                 if isinstance(node, ast.Constant) and node.value in names}
        assert not named, f"diffpg/{module} names estimators {sorted(named)}"


ENV_CONFIGURATIONS = "configs.py"
"""The one module that names envs: each env's measured training configuration."""


def test_the_commands_and_training_name_no_env():
    """Outside the per-env training configurations, diffpg reads what an env declares (an exact
    return, a stiffness setting, a drawing: ``diffpg.envs``) instead of naming it, so a user's
    registered env gets every capability it declares."""
    from diffpg import envs

    names = set(envs.names())
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == ENV_CONFIGURATIONS:
            continue
        named = {node.value for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Constant) and node.value in names}
        assert not named, f"{path.relative_to(PACKAGE.parent)} names envs {sorted(named)}"


def test_importing_diffpg_and_envs_changes_nothing_in_the_process():
    """No environment variable, JAX setting, signal handler or stubbed module changes on import
    (the command line's process-wide setup is ``diffpg.setup()``, called by ``cli.run``)."""
    script = (
        "import os, signal, sys, jax\n"
        "environment, configuration = dict(os.environ), dict(jax.config.values)\n"
        "handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]\n"
        "import diffpg, envs, diffpg.cli, diffpg.runs, diffpg.compare\n"
        "assert dict(os.environ) == environment, 'environment'\n"
        # (options JAX's own submodules register as they load are new, not changed)
        "changed = {k for k, v in configuration.items() if jax.config.values[k] != v}\n"
        "assert not changed, changed\n"
        "assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers\n"
        "assert sys.modules.get('warp', 'absent') is not None, 'warp stubbed'\n"
        "diffpg.setup(cache_dir=None)\n"
        "assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == '3'\n")
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=environment | {"PYTHONPATH": str(PACKAGE.parent)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_reading_a_command_line_imports_no_playground():
    """The env option's help once listed every env, which imported MuJoCo Playground (1.4 s and
    its Warp) to read any ``train`` or ``compare`` command line; its tasks now read as
    ``playground:TASK`` there (``diffpg --help`` lists them)."""
    script = ("import sys\n"
              "from diffpg.command_line import parse_compare_command, parse_train_command\n"
              "parse_train_command(['--env', 'pendulum', '--updates', '2', '--updates-per-call', '2'])\n"
              "parse_compare_command(['--env', 'lqr'])\n"
              "print('mujoco_playground' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(PACKAGE.parent)})
    assert done.returncode == 0 and done.stdout.split() == ["False"], done.stderr[-2000:]
    from diffpg import envs

    assert "playground:TASK" in envs.names_in_brief()
    assert set(envs.names_in_brief()) - {"playground:TASK"} < set(envs.names())


def test_a_project_s_own_envs_package_is_the_project_s_and_diffpg_s_is_diffpg_envs(tmp_path):
    """``envs`` is a name research projects use: diffpg's environments install as
    ``diffpg.envs``, so in a project folder with its own ``envs`` package, ``import envs`` is
    the project's while diffpg, as a library and as the ``diffpg`` command, uses its own (it
    lists its environments); no bare ``envs`` is installed."""
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "__init__.py").write_text("OWNER = 'the project'\n")
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = ("import envs; import diffpg.training; from diffpg import envs as ours\n"
              "print(envs.OWNER, 'halfcheetah' in ours.names())\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, env=environment)
    assert done.returncode == 0 and done.stdout.split() == ["the", "project", "True"], (
        done.stderr[-2000:])
    command = Path(sys.executable).with_name("diffpg")  # the installed command
    assert command.exists(), f"diffpg is not installed beside {sys.executable}"
    done = subprocess.run([str(command), "train", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "halfcheetah" in done.stdout and "the project" not in done.stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-c", "import envs"], cwd=elsewhere,
                          capture_output=True, text=True, env=environment)
    assert done.returncode != 0 and "No module named 'envs'" in done.stderr


MAX_FUNCTION_LINES = 80
"""The longest a function of the library or its experiments may be, its docstring aside: a
newcomer reads one at a time."""


def _function_lengths(path: Path):
    """``(name, lines)`` of every function in ``path``, its docstring not counted."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0]
            documented = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                          and isinstance(first.value.value, str))
            start = first.end_lineno + 1 if documented else node.lineno
            yield node.name, node.end_lineno - start + 1


def test_no_library_function_is_longer_than_the_rule():
    root = Path(__file__).resolve().parents[1]
    long = [f"{path.relative_to(root)}::{name} ({lines} lines)"
            for package in ("diffpg", "envs", "experiments")
            for path in sorted((root / package).rglob("*.py"))
            for name, lines in _function_lengths(path) if lines > MAX_FUNCTION_LINES]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_video_names_no_environment():
    """How an environment looks is the environment's (``frame_drawer``, ``diffpg.envs.drawing``):
    ``diffpg/video.py`` names no env class and no env."""
    from diffpg import envs

    source = (PACKAGE / "video.py").read_text()
    classes = set(envs.ANALYTIC_ENV_CLASSES.values()) | {
        "BraxEnvironment", "PlaygroundEnvironment"}
    named = sorted(name for name in classes | set(envs.names())
                   if f'"{name}"' in source or f"'{name}'" in source or name in source.split())
    assert named == []
