"""The experiment scripts run, at their smallest sizes, through their command lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import HANG_LIMIT_S

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_the_race_runs_every_learner_at_every_env_count_within_its_budget(tmp_path):
    """``race.py`` at tiny sizes: one row per learner and env count, each curve stopped at the
    first evaluation past the wall-clock budget (the schedule has more)."""
    out = tmp_path / "race"
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "race.py"), "--env", "pendulum", "--learners", "shac",
         "--num-envs", "4", "8", "--seconds", "0.001", "--steps", "1024", "--evals", "4",
         "--out", str(out)], capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| shac | 4 |" in done.stdout and "| shac | 8 |" in done.stdout
    results = json.loads((out / "results.json").read_text())
    for name in ("shac 4", "shac 8"):
        (first,) = results["curves"][name]  # stopped at its first evaluation: past 1 ms
        assert first["env_steps"] > 0
    assert (out / "race.png").stat().st_size > 0 and (out / "report.md").exists()


def test_fall_anatomy_reads_an_episode_s_last_steps_from_its_record():
    """``fall_anatomy.summary`` on a made-up record of 3 bodies over 6 steps (the step that
    ends an episode returns the next one's start, so the record holds one step fewer)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("fall_anatomy",
                                                  EXPERIMENTS / "fall_anatomy.py")
    anatomy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anatomy)
    heights = np.array([[1.2, 0.6, 0.0], [1.5, 1.0, 0.4], [2.0, 1.6, 1.0], [1.4, 1.2, 0.9],
                        [0.9, 0.7, 0.5]])
    angles = np.zeros((5, 5))
    angles[:, 2] = [0.0, 0.01, 0.02, 0.03, 0.04]  # pitch
    angles[:, 3:] = [[-1.0, -0.5]] * 5  # two joints
    found = anatomy.summary({"length": 6, "fell": True, "reward": np.arange(6.0),
                             "heights": heights, "angles": angles,
                             "speed": np.array([0.0, 1.0, 2.0, 3.0, 4.0])})
    assert (found["length"], found["fell"], found["return"]) == (6, True, 15.0)
    assert found["highest_torso"] == 2.0 and found["lowest_body"] == 0.0
    assert found["reward_per_step_first_50"] == found["reward_per_step_last_50"] == 2.5
    last = found["last_steps"]
    assert [step["step"] for step in last] == [1, 2, 3, 4]  # LAST_STEPS before the end
    assert last[-1] == {"step": 4, "torso_height": 0.9, "lowest_body": 0.5, "highest_body": 0.9,
                        "pitch": 0.04, "joints": [-1.0, -0.5], "forward_velocity": 4.0}


def test_the_reverse_pass_profile_runs_and_counts_each_program_s_operations(tmp_path):
    """``profile_reverse.py`` at tiny sizes on the pendulum: a row per program, the forward as
    the unit, and the reverse step's program holding more operations than the forward's."""
    out = tmp_path / "profile"
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "profile_reverse.py"), "--env", "pendulum",
         "--num-envs", "4", "--horizon", "4", "--segments", "0", "1", "--repeats", "2",
         "--out", str(out)], capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [row["program"] for row in results["rollout"]] == [
        "forward rollout", "BPTT gradient", "BPTT gradient, remat every 1"]
    assert results["rollout"][0]["x_forward"] == 1.0
    forward, reverse = results["step"]
    assert reverse["operations"] > forward["operations"] > 0
