"""The README's numbers are the program's: its example prints what the README shows, and the
default ``diffpg compare`` run's table is the README's (``experiments/readme_numbers.py``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import USER_XLA_FLAGS

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "readme_numbers.py"


@pytest.fixture(scope="module")
def readme_numbers():
    spec = importlib.util.spec_from_file_location("readme_numbers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _computed_by_a_users_process(section: str) -> str:
    """``readme_numbers``' ``section`` computed in a new process with the user's XLA flags, not
    the tests' (whose one-thread Eigen, under pytest-xdist, changes the rounding of the learned
    critics' warm-ups enough to move their rows)."""
    code = ("import importlib.util, json, sys\n"
            "import diffpg\n"
            "diffpg.setup()\n"
            "spec = importlib.util.spec_from_file_location('readme_numbers', sys.argv[1])\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "print(json.dumps(module.SECTIONS[sys.argv[2]]()[sys.argv[2]]))\n")
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if USER_XLA_FLAGS is not None:
        environment["XLA_FLAGS"] = USER_XLA_FLAGS
    done = subprocess.run([sys.executable, "-c", code, str(SCRIPT), section], text=True,
                          capture_output=True, env=environment, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("section", ["example", "compare-table"])
def test_the_readme_shows_what_the_program_computes(readme_numbers, section):
    """Each section computed as a user's process computes it (a comparison compiles with its
    own options either way)."""
    computed = _computed_by_a_users_process(section)
    written = readme_numbers.block(readme_numbers.README.read_text(), section)
    assert readme_numbers.differences(written, computed, rtol=0.02) == [], (
        f"README.md's {section} block is stale: run python experiments/readme_numbers.py "
        f"--only {section}")


def test_the_check_catches_a_changed_number(readme_numbers):
    """The comparison itself: a number off by more than the tolerance, or changed words, fail."""
    written = "| shac | 35.9 | 1.98 | 0.0745 | yes |\n"
    assert readme_numbers.differences(written, "| shac | 35.9 | 1.98 | 0.0746 | yes |\n", 0.02) == []
    assert readme_numbers.differences(written, "| shac | 35.9 | 2.2 | 0.0745 | yes |\n", 0.02)
    assert readme_numbers.differences(written, "| shac | 35.9 | 1.98 | 0.0745 | not resolved |\n",
                                      0.02)


def test_every_test_the_guarantees_name_exists():
    """The README's "Runs you can trust" table names a test for each guarantee
    (``test_file.py::test_name``, or ``::test_name`` for the file named before it on the row):
    each is a test function of that file."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    table = readme.split("## Runs you can trust")[1].split("\n## ")[0]
    named = []
    for row in table.splitlines():
        current = None
        for file, name in re.findall(r"`(test_\w+\.py)?(?:::(\w+))?`", row):
            current = file or current
            if name:
                named.append((current, name))
    assert len(named) >= 20
    for file, name in named:
        source = (root / "tests" / file).read_text()
        assert f"def {name}(" in source, f"README names {file}::{name}, which does not exist"


def test_the_readmes_python_api_example_runs(tmp_path, monkeypatch, capsys):
    """The README's "Comparing and training from Python" block runs as written (in a fresh
    folder: it writes runs/pendulum-shac) and prints a line per horizon and the updates done."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    block = text.split("<!-- tested: python-api -->")[1].split("<!-- end: python-api -->")[0]
    code = block.split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[:-1]] == ["1", "2", "4", "8"]
    assert printed[-1] == "4 updates"
    assert (tmp_path / "runs" / "pendulum-shac" / "metrics.csv").exists()


def test_the_readme_is_short_and_every_link_of_it_and_of_docs_leads_to_a_file():
    """A newcomer reads the README in ten minutes (<= 300 lines); the results, the details and
    the reference live in docs/ and BENCHMARKS.md, and no moved section leaves a dead link."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = root / "README.md"
    assert len(readme.read_text().splitlines()) <= 300
    documents = [readme, root / "BENCHMARKS.md", *sorted((root / "docs").rglob("*.md"))]
    dead = []
    for document in documents:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text()):
            if not target.startswith(("http://", "https://")) and not (
                    document.parent / target).exists():
                dead.append(f"{document.relative_to(root)} -> {target}")
    assert dead == []
