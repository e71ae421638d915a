"""The experiment scripts run, at their smallest sizes, through their command lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_the_race_runs_every_learner_at_every_env_count_within_its_budget(tmp_path):
    """``race.py`` at tiny sizes: one row per learner and env count, each curve stopped at the
    first evaluation past the wall-clock budget (the schedule has more)."""
    out = tmp_path / "race"
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "race.py"), "--env", "pendulum", "--learners", "shac",
         "--num-envs", "4", "8", "--seconds", "0.001", "--steps", "1024", "--evals", "4",
         "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| shac | 4 |" in done.stdout and "| shac | 8 |" in done.stdout
    results = json.loads((out / "results.json").read_text())
    for name in ("shac 4", "shac 8"):
        (first,) = results["curves"][name]  # stopped at its first evaluation: past 1 ms
        assert first["env_steps"] > 0
    assert (out / "race.png").stat().st_size > 0 and (out / "report.md").exists()
