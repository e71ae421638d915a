"""The experiment scripts run, at their smallest sizes, through their command lines."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_LIMIT_S

from diffpg.configs import default_estimator

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def run_script(monkeypatch, name: str, *arguments: str) -> None:
    """``experiments/<name>`` run in this process as its command line runs it: ``sys.argv`` its
    arguments, the experiments folder on ``sys.path`` (its ``import common``), and its
    ``if __name__ == "__main__"`` block run. Cheaper than a subprocess: jax and diffpg are
    imported already."""
    script = EXPERIMENTS / name
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    monkeypatch.setattr(sys, "argv", [str(script), *arguments])
    runpy.run_path(str(script), run_name="__main__")


def all_finite(*values) -> bool:
    """Every value (numbers, or lists of them, nested) is a finite number."""
    flat = []
    for value in values:
        flat += list(np.ravel(np.asarray(value, dtype=float)))
    return bool(flat) and all(math.isfinite(x) for x in flat)


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
    the unit, the reverse step's program holding more operations than the forward's, and the
    BPTT gradient's levers each giving today's gradient."""
    out = tmp_path / "profile"
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "profile_reverse.py"), "--env", "pendulum",
         "--num-envs", "4", "--horizon", "4", "--segments", "0", "1", "--repeats", "2",
         "--levers", "--out", str(out)], capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [row["program"] for row in results["rollout"]] == [
        "forward rollout", "BPTT gradient", "BPTT gradient, remat every 1"]
    assert results["rollout"][0]["x_forward"] == 1.0
    forward, reverse = results["step"]
    assert reverse["operations"] > forward["operations"] > 0
    assert reverse["mflop"] > forward["mflop"] > 0 and reverse["mbyte"] > forward["mbyte"] > 0
    # Each lever: the same gradient (float32 rounding) from a program timed against today's.
    levers = results["levers"]
    assert levers[0]["lever"] == "today" and levers[0]["x_today_cpu"] == 1.0
    assert levers[-1]["lever"] == "today, again" and levers[-1]["gradient_difference"] == 0
    assert len(levers) > 5 and all(row["error"] == "" for row in levers), levers
    assert all(row["gradient_difference"] < 1e-5 and row["cpu_s"] > 0 for row in levers), levers


def test_bench_compare_compile_times_each_program_and_the_whole_command(tmp_path, monkeypatch,
                                                                       capsys):
    """``bench_compare_compile.py`` on a tiny comparison (REINFORCE with a learned value
    baseline, one horizon): a row for its baseline's warm-up and one for its estimates, each
    traced, compiled with both sets of options and run; then the whole command cold and warm in
    fresh processes. (The script turns the persistent cache off through ``DIFFPG_CACHE_DIR``
    for its own process, which this one's cache, on already, ignores; ``monkeypatch`` restores
    the variable.)"""
    out = tmp_path / "bench"
    monkeypatch.setenv("DIFFPG_CACHE_DIR", "off")
    learner = "reinforce:baseline=value"
    run_script(monkeypatch, "bench_compare_compile.py", "--estimators", learner, "--sweep", "none",
               "--horizon", "2", "--num-envs", "2", "--num-estimates", "2", "--critic-warmup",
               "1", "--out", str(out))
    printed = capsys.readouterr().out
    assert "| estimator | program | count | trace_and_lower_s |" in printed
    results = json.loads((out / "results.json").read_text())
    assert [(row["estimator"], row["program"]) for row in results["programs"]] == [
        (learner, "warm-up"), (learner, "estimates")]
    for row in results["programs"]:
        assert row["count"] == 1
        assert all_finite(*(row[k] for k in row if k.endswith("_s")))
    assert [command["cache"] for command in results["command"]] == ["cold", "warm"]
    assert all(command["wall_s"] > 0 for command in results["command"])
    assert (out / "compare_warm" / "results.json").exists()


def test_bench_compile_reports_the_stages_of_a_cold_and_a_warm_compile(tmp_path, monkeypatch,
                                                                      capsys):
    """``bench_compile.py`` on the pendulum: two fresh processes, a cold and a warm cache, each
    with the stages of its first training call (the env's configured estimator) and their sum;
    the warm one loads the executable the cold one compiled, in a fraction of its time."""
    out = tmp_path / "bench"
    run_script(monkeypatch, "bench_compile.py", "--env", "pendulum", "--num-envs", "2",
               "--horizon", "2", "--out", str(out))
    assert "| cache | compile_s | trace_s |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert results["estimator"] == default_estimator("pendulum")
    assert [row["cache"] for row in rows] == ["cold", "warm"]
    for row in rows:
        stages = row["trace_s"] + row["lower_s"] + row["xla_compile_or_load_s"]
        assert all_finite(stages, row["run_s"]) and row["compile_s"] == stages
    cold, warm = (row["xla_compile_or_load_s"] for row in rows)
    assert warm < cold / 2


def test_bench_learning_logs_a_curve_per_learner(tmp_path, monkeypatch, capsys):
    """``bench_learning.py`` with diffpg's SHAC on the pendulum, 2 updates of 2 envs: a curve
    of evaluations, a row of final results, its run folder and the plot."""
    out = tmp_path / "bench"
    run_script(monkeypatch, "bench_learning.py", "--env", "pendulum", "--learners", "shac",
               "--num-envs", "2", "--horizon", "4", "--steps", "16", "--evals", "1",
               "--out", str(out))
    assert "| learner | final_reward |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    (row,) = results["rows"]
    assert row["learner"] == "shac" and row["env_steps"] == 16 and all_finite(row["final_reward"])
    assert [point["env_steps"] for point in results["curves"]["shac"]][-1] == 16
    assert (out / "learning.png").stat().st_size > 0
    assert (out / "runs" / "shac" / "settings.json").exists()


def test_bench_memory_reports_xla_s_memory_with_and_without_remat(tmp_path, monkeypatch, capsys):
    """``bench_memory.py`` on the pendulum at horizon 4: the BPTT gradient without and with
    remat segments of 2, each compiled and run once in its own process."""
    out = tmp_path / "bench"
    run_script(monkeypatch, "bench_memory.py", "--env", "pendulum", "--num-envs", "2",
               "--horizons", "4", "--segment", "2", "--run", "--out", str(out))
    assert "| horizon | remat_segment | xla_gib |" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["horizon"], row["remat_segment"]) for row in rows] == [(4, 0), (4, 2)]
    for row in rows:
        assert "error" not in row, row
        assert row["xla_gib"] > 0 and row["peak_rss_gib"] > 0 and all_finite(row["run_s"])


def test_bench_throughput_rates_simulation_gradient_and_training(tmp_path, monkeypatch, capsys):
    """``bench_throughput.py`` on the analytic pendulum (no Brax APG), 2 envs x 2 steps: a rate
    and ratio per row, and the parts of one SHAC update as shares of the whole."""
    out = tmp_path / "bench"
    run_script(monkeypatch, "bench_throughput.py", "--env", "pendulum", "--num-envs", "2",
               "--horizon", "2", "--repeats", "1", "--skip-apg", "--out", str(out))
    printed = capsys.readouterr().out
    assert "pendulum (analytic), 2 envs x 2 steps" in printed
    assert "| what | env_steps_per_s | vs_simulate |" in printed
    results = json.loads((out / "results.json").read_text())
    assert [row["what"] for row in results["rows"]] == ["simulate", "bptt_gradient",
                                                        "shac_training"]
    assert all_finite(*(row["env_steps_per_s"] for row in results["rows"]))
    assert results["rows"][0]["vs_simulate"] == 1.0 and results["backend"] is None
    parts = {row["part"]: row for row in results["update_breakdown"]}
    assert parts["whole update"]["share_of_update"] == 1.0 and len(parts) == 6


@pytest.mark.slow
def test_diagnose_falls_probes_a_hopper_run(tmp_path, monkeypatch, capsys):
    """``diagnose_falls.py`` on Brax's hopper (spring), 1 update of 2 envs: a probe before and
    after it, each with the census's shares of falls by bound and the one update's effect."""
    out = tmp_path / "falls"
    run_script(monkeypatch, "diagnose_falls.py", "--env", "hopper", "--learner",
               "shac:num_envs=2,horizon=2,eval_envs=2,episode_length=8,health_shaping=0.0",
               "--updates", "1", "--updates-per-call", "1", "--probe-every", "1",
               "--census-envs", "2", "--out", str(out))
    assert "| update | env_steps | eval_return | fall_share |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["bounds"][0] == "height_low"
    assert [row["update"] for row in results["rows"]] == [0, 1]
    for row in results["rows"]:
        assert 0.0 <= row["fall_share"] <= 1.0
        assert all_finite(row["window_before"], row["window_after"], row["return_before"],
                          row["return_after"], row["value_alive"])


@pytest.mark.slow
def test_measure_brax_backends_measures_a_pair_in_its_own_process(tmp_path, monkeypatch, capsys):
    """``measure_brax_backends.py`` on Brax's inverted pendulum (spring), 2 envs x 2 steps: the
    pair's forward rate and finite gradients (its reward's is 0: 1 per step while alive)."""
    out = tmp_path / "backends.json"
    run_script(monkeypatch, "measure_brax_backends.py", "--envs", "inverted_pendulum",
               "--backends", "spring", "--batch", "2", "--horizon", "2", "--seeds", "1",
               "--forward-reps", "1", "--out", str(out))
    assert "| env | backend | grad finite |" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    assert "error" not in result, result["error"]
    assert result["grad_finite_fraction"] == 1.0 and result["grad_norm_median"] == 0.0
    assert result["obs_grad_norm_median"] > 0 and result["steps_per_s"] > 0


def test_s2_fits_the_variance_against_the_horizon(tmp_path, monkeypatch, capsys):
    """``s2_horizon_variance.py`` at horizons 1, 2, 4 with SHAC's window 2: a row per horizon
    (SHAC's = BPTT's up to its window), finite fits, the plot and the report."""
    out = tmp_path / "s2"
    run_script(monkeypatch, "s2_horizon_variance.py", "--max-horizon", "4", "--window", "2",
               "--num-envs", "2", "--num-estimates", "4", "--reference-estimates", "4",
               "--warmup", "2", "--split", "2", "--out", str(out))
    printed = capsys.readouterr().out
    assert "| T | log|dx_T/dx_0| | bptt var |" in printed and "BPTT log-variance vs T" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["horizons"] == [1, 2, 4]
    shac = [entry["estimators"]["shac"]["same_as_bptt"] for entry in results["results"]]
    assert shac == [True, True, False]
    summary = results["summary"]
    assert all_finite(summary["bptt_log_variance_rate_per_step"],
                      summary["shac_log_variance_rate_per_step_T_ge_window"],
                      summary["lyapunov"]["closed_loop_per_step"])
    assert (out / "variance_vs_horizon.png").stat().st_size > 0 and (out / "report.md").exists()


def test_s3_orders_the_baselines_on_the_lqr_and_the_pendulum(tmp_path, monkeypatch, capsys):
    """``s3_baselines.py`` with 8 estimates per baseline: a row per env and baseline, the
    ordering checks, and the batch-size sweep's scale factors."""
    out = tmp_path / "s3"
    run_script(monkeypatch, "s3_baselines.py", "--horizon", "4", "--pendulum-horizon", "4",
               "--num-states", "2", "--estimates", "8", "--pendulum-estimates", "8",
               "--reference-estimates", "8", "--value-warmup", "2", "--sweep-sizes", "2,4",
               "--sweep-estimates", "8", "--out", str(out))
    assert "| env | baseline | variance_trace |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [(row["env"], row["baseline"]) for row in results["rows"]] == [
        (env, baseline) for env in ("lqr", "pendulum")
        for baseline in ("none", "batch_mean", "leave_one_out", "value", "optimal")]
    assert all_finite(*(row["variance_trace"] for row in results["rows"]))
    assert len(results["ordering_checks"]) == 8 and len(results["batch_size_sweep"]) == 4
    assert (out / "baselines.png").stat().st_size > 0


def test_s4_measures_both_batch_shape_designs(tmp_path, monkeypatch, capsys):
    """``s4_batch_shape.py`` at a budget of 4 steps: design (a) at n = 2, 4 and design (b) at
    k = 1, 2 for each estimator, with their log-log slopes."""
    out = tmp_path / "s4"
    run_script(monkeypatch, "s4_batch_shape.py", "--budget", "4", "--fixed-k", "4",
               "--max-n", "4", "--num-estimates", "8", "--out", str(out))
    assert "Summary (log-log slopes)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    for variant in ("reinforce_rtg", "reinforce_total", "bptt"):
        assert [r["n"] for r in results["design_a_fixed_k"][variant]] == [2, 4]
        assert [r["k"] for r in results["design_b_fixed_budget"][variant]] == [1, 2]
        assert all_finite(results["summary"][variant]["b_beta_log_var_vs_log_k"])
    assert (out / "variance_vs_batch_shape.png").stat().st_size > 0


def test_s5_follows_stale_batches_along_each_path(tmp_path, monkeypatch, capsys):
    """``s5_stale_batch.py`` with 4 batches of 2 rollouts and 2 Adam steps: a row per path and
    step, weighted and unweighted, starting at theta_0 with full effective sample size."""
    out = tmp_path / "s5"
    run_script(monkeypatch, "s5_stale_batch.py", "--horizon", "2", "--num-states", "2",
               "--batches", "4", "--steps", "2", "--chunk", "2", "--out", str(out))
    assert "| step | distance | ess_fraction |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(row["mode"], row["step"]) for row in rows] == [
        (mode, step) for mode in ("fixed_path", "is_driven", "naive") for step in range(3)]
    assert rows[0]["distance"] == 0.0 and rows[0]["ess_fraction"] == pytest.approx(1.0)
    assert all_finite(*(row["weighted_relative_bias"] for row in rows))
    assert len(results["fixed_path"]) == 3 and (out / "stale_batch.png").stat().st_size > 0


def test_s6_reads_the_typical_estimate_from_a_comparison(tmp_path, monkeypatch, capsys):
    """``s6_typical_estimate.py`` on a tiny ``diffpg compare`` run folder: a row per estimator
    whose median projection lies in its bootstrap interval; a folder without samples is an
    error naming the missing file."""
    from diffpg import cli

    run = tmp_path / "compare"
    assert cli.main(["compare", "--sweep", "none", "--horizon", "4", "--num-estimates", "8",
                     "--num-envs", "4", "--estimators", "reinforce", "bptt",
                     "--out", str(run)]) == 0
    capsys.readouterr()
    run_script(monkeypatch, "s6_typical_estimate.py", str(run))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| sweep_value | estimator | median_projection | ci90_low | ci90_high | "
                        "mean_projection | largest_norm_ratio |")
    rows = [line.strip("|").split("|") for line in lines[2:]]
    assert [row[1].strip() for row in rows] == ["reinforce", "bptt"]
    for row in rows:
        median, low, high = (float(cell) for cell in row[2:5])
        assert low <= median <= high
    with pytest.raises(SystemExit, match="not found"):
        run_script(monkeypatch, "s6_typical_estimate.py", str(tmp_path))


def test_s7_evaluates_both_objectives_along_a_direction(tmp_path, monkeypatch, capsys):
    """``s7_loss_smoothing.py`` on the pendulum (8-step episodes, a 4-step window, 5 grid
    points): both curves finite, their roughness and gradient norms reported."""
    out = tmp_path / "s7"
    run_script(monkeypatch, "s7_loss_smoothing.py", "--env", "pendulum", "--episode-length", "8",
               "--window", "4", "--num-envs", "2", "--points", "5", "--critic-fits", "2",
               "--out", str(out))
    assert "| objective | roughness | min | max |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["curves"]) == ["full_episode_bptt", "shac_window_4"]
    assert len(results["alphas"]) == 5 and len(results["critic_losses"]) == 2
    for row in results["rows"]:
        assert row["finite"] and all_finite(row["roughness"], row["grad_norm_at_0"])
    assert (out / "loss_along_direction.png").stat().st_size > 0


def test_plot_bodies_draws_each_run_folder_s_and_results_file_s_evaluations(tmp_path, monkeypatch,
                                                                            capsys):
    """``plot_bodies.py`` on a made-up run folder of two seeds (rows without an evaluation are
    skipped) and a ``bench_learning`` results.json: the drawn data is the files' data."""
    run = tmp_path / "run"
    run.mkdir()
    columns = ["update", "env_steps", "training/walltime", "eval/episode_reward",
               "eval/episode_reward_ci95", "eval/episode_reward/seed_0",
               "eval/episode_reward/seed_1"]
    rows = [[1, 100, 2.5, 10.0, 4.0, 8.0, 12.0], [2, 200, 4.0, "", "", "", ""],
            [3, 300, 6.5, 30.0, 2.0, 29.0, 31.0]]
    (run / "metrics.csv").write_text("\n".join(",".join(map(str, row))
                                               for row in [columns, *rows]) + "\n")
    ppo = {"env_steps": 0, "seconds": 1.0, "reward": 5.0, "ci95": 1.0, "seeds": [4.0, 6.0]}
    (tmp_path / "results.json").write_text(json.dumps({"curves": {"brax_ppo": [ppo]}}))
    out = tmp_path / "out"
    run_script(monkeypatch, "plot_bodies.py", "--out", str(out), "--curve", f"ant:AHAC={run}",
               "--curve", f"ant:Brax PPO={tmp_path / 'results.json'}#brax_ppo",
               "--curve", f"hopper:SHAC={run}")
    drawn = json.loads((out / "bodies.json").read_text())["bodies"]
    assert drawn["ant"]["AHAC"] == drawn["hopper"]["SHAC"] == [
        {"env_steps": 100, "seconds": 2.5, "reward": 10.0, "ci95": 4.0, "seeds": [8.0, 12.0]},
        {"env_steps": 300, "seconds": 6.5, "reward": 30.0, "ci95": 2.0, "seeds": [29.0, 31.0]}]
    assert drawn["ant"]["Brax PPO"] == [ppo]
    assert (out / "bodies.png").stat().st_size > 0
    assert "| ant | AHAC | 300 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is not BODY:LABEL=PATH"):
        run_script(monkeypatch, "plot_bodies.py", "--out", str(tmp_path / "x"), "--curve", "ant")
