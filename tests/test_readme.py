"""The README's numbers are the program's: its example prints what the README shows, and the
default ``diffpg compare`` run's table is the README's (``experiments/readme_numbers.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "readme_numbers.py"


@pytest.fixture(scope="module")
def readme_numbers():
    spec = importlib.util.spec_from_file_location("readme_numbers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("section", ["example", "compare-table"])
def test_the_readme_shows_what_the_program_computes(readme_numbers, section):
    computed = readme_numbers.SECTIONS[section]()[section]
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
