"""The README's numbers are the program's: its example prints what the README shows, and the
default ``diffpg compare`` run's table is the README's (``experiments/readme_numbers.py``)."""

from __future__ import annotations

import importlib.util
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


def _checked_by_a_users_process(readme_numbers, section: str) -> list[str]:
    """``readme_numbers``' check of ``section`` (its differences from the README) computed in a
    new process with the user's XLA flags, not the tests' (whose one-thread Eigen, under
    pytest-xdist, is another rounding)."""
    return readme_numbers.in_a_new_process(f"r.check_section({section!r}, 0.02)",
                                           USER_XLA_FLAGS)


@pytest.mark.slow
@pytest.mark.parametrize("section", ["example", "compare-table"])
def test_the_readme_shows_what_the_program_computes(readme_numbers, section):
    """Each section computed as a user's process computes it (a comparison compiles with its
    own options either way)."""
    problems = _checked_by_a_users_process(readme_numbers, section)
    assert problems == [], (
        f"README.md's {section} block is stale ({problems}): run python "
        f"experiments/readme_numbers.py --only {section}")


def test_a_table_is_checked_against_the_ranges_other_roundings_gave(readme_numbers):
    """A cell where the roundings disagreed holds the interval where another rounding lands (or
    the verdicts seen): a computed value inside it (give or take the tolerance) passes, outside
    it fails; other cells as numbers."""
    header = readme_numbers.TABLE_HEADER
    written = header + ("| ahac | 39.6 | 1.9 to 2.1 | 0.0111 to 0.0291 | yes / not resolved | "
                        "0.0178 | 1 | 28 |\n")
    inside = header + "| ahac | 39.7 | 2.14 | 0.02 | not resolved | 0.0178 | 1 | 28 |\n"
    assert readme_numbers.table_differences(written, inside, 0.02) == []
    outside = header + "| ahac | 39.6 | 2.2 | 0.05 | yes | 0.0178 | 1 | 30 |\n"
    problems = readme_numbers.table_differences(written, outside, 0.02)
    assert [p.split(":")[0] for p in problems] == ["ahac variance_trace", "ahac relative_bias",
                                                   "ahac snr"]
    assert readme_numbers.table_differences(written, inside.replace("ahac", "shac"), 0.02)
    low, high = map(float, readme_numbers._cell([0.0291, 0.0111, 0.029]).split(" to "))
    assert low < 0.0111 and high > 0.0291  # where one more rounding may land, not the sample's
    assert readme_numbers._cell([2.0, 2.01]) == "2"
    assert readme_numbers._cell([True, False]) == "yes / not resolved"


def test_a_row_the_roundings_disagree_on_takes_its_range_over_other_draws_too(readme_numbers):
    """A learned row (the roundings disagree) spans the roundings and the estimators' other
    draws, each of its cells; a row the roundings agree on keeps its value, whatever the draws."""
    def tables(values):
        return [{"exact": dict.fromkeys(readme_numbers.TABLE_COLUMNS, 2.0),
                 "learned": dict.fromkeys(readme_numbers.TABLE_COLUMNS, value)}
                for value in values]

    table = readme_numbers._table(tables([10.0, 11.0, 12.0]), tables([5.0, 20.0]))
    rows = readme_numbers._cells(table)
    assert rows["exact"] == ["2"] * len(readme_numbers.TABLE_COLUMNS)
    low, high = map(float, rows["learned"][0].split(" to "))
    assert low < 5.0 and high > 20.0
    alone = readme_numbers._cells(readme_numbers._table(tables([10.0, 11.0, 12.0]), []))
    assert float(alone["learned"][0].split(" to ")[1]) < 20.0


def test_the_check_catches_a_changed_number(readme_numbers):
    """The comparison itself: a number off by more than the tolerance, or changed words, fail."""
    written = "| shac | 35.9 | 1.98 | 0.0745 | yes |\n"
    assert readme_numbers.differences(written, "| shac | 35.9 | 1.98 | 0.0746 | yes |\n", 0.02) == []
    assert readme_numbers.differences(written, "| shac | 35.9 | 2.2 | 0.0745 | yes |\n", 0.02)
    # numpy pads an array's numbers to the widest: a last digit moves the spaces, not the words
    assert readme_numbers.differences("[1.045044  4.4288797]", "[1.0450441 4.4288797]", 0.02) == []
    assert readme_numbers.differences("[1.0 2.0]", "[1.0, 2.0]", 0.02)
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
