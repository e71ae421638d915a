"""Data parallelism: 1 and 4 (forced host) devices train to the same parameters and give every
estimator the same gradient; ``diffpg compare --devices 2`` gives the table of one device; a
two-seed run over 2 devices resumes bit-exactly, and on one device to the same parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import HANG_LIMIT_S

from diffpg import estimators

TRAINING = r"""
import json, pathlib, tempfile
import jax
import numpy as np
from diffpg.training import make_trainer, settings_for

results = {}
for estimator in ("shac",):
    params = {}
    for devices in (1, 4):
        settings = settings_for(env="pendulum", estimator=estimator, num_envs=8, horizon=8,
                                 updates=4, updates_per_call=2, eval_envs=2, hidden_sizes=(16,),
                                 devices=devices)
        trainer = make_trainer(settings)
        state = trainer.init_run()
        for _ in range(2):
            state, metrics = trainer.run_updates(state)
        evaluation = trainer.evaluate(state, jax.random.PRNGKey(1))
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)])
        params[devices] = flat
        results[f"{estimator}/{devices}/shards"] = len(state.env_state.obs.sharding.device_set)
        results[f"{estimator}/{devices}/reward"] = float(evaluation["eval/episode_reward"])
    diff = np.abs(params[4] - params[1]).max()
    results[f"{estimator}/4/max_abs_diff"] = float(diff)
    results[f"{estimator}/update_size"] = float(np.abs(params[1]).max())
# Two seeds over two devices, stopped and resumed: bit-exact, and still split.
from diffpg.runs import train

folder = pathlib.Path(tempfile.mkdtemp())
settings = settings_for(env="pendulum", updates=4, updates_per_call=2, num_envs=4, horizon=8,
                         eval_envs=2, hidden_sizes=(16,), seeds=2, devices=2)
whole = train(settings, folder / "whole")
train(settings, folder / "split", stop_at_update=2)
import shutil

shutil.copytree(folder / "split", folder / "fewer")  # (the same stopped run, resumed below)
resumed = train(settings, folder / "split", resume=True)
results["resume/bit_exact"] = all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(whole.params),
                                         jax.tree.leaves(resumed.params)))
results["resume/shards"] = len(resumed.env_state.obs.sharding.device_set)
# Stopped on two devices and resumed on one (devices may change on resume): the same run.
import dataclasses

fewer = train(dataclasses.replace(settings, devices=1), folder / "fewer", resume=True)
results["resume_on_one/max_abs_diff"] = max(
    float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(whole.params),
                                               jax.tree.leaves(fewer.params)))
results["resume_on_one/shards"] = len(fewer.env_state.obs.sharding.device_set)
print("RESULTS" + json.dumps(results))
"""


GRADIENTS = r"""
import json, pathlib, tempfile
import jax
import numpy as np
results = {}
from diffpg import envs
from diffpg import estimators
from diffpg.sampling import sample_gradients
from diffpg.devices import shard_batch
from diffpg.policy import make_gaussian_mlp_policy

env = envs.make("pendulum")
policy = make_gaussian_mlp_policy(env.observation_size, env.action_size, hidden_sizes=(16,))
params = policy.init(jax.random.PRNGKey(0))
starts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), 8))
estimator = estimators.make("bptt", env, policy, horizon=8)
samples = {}
for devices in (1, 4):
    samples[devices], _ = sample_gradients(estimator, params, shard_batch(starts, devices),
                                           jax.random.PRNGKey(2), 4, 0)
results["compare/4/max_abs_diff"] = float(np.abs(samples[4] - samples[1]).max())
results["compare/gradient_size"] = float(np.abs(samples[1]).max())
# Raw gradients (no optimiser between them and the check) of every estimator, start states
# split over 1 and 4 devices: a per-device scaling error would show here.
from jax.flatten_util import ravel_pytree
from diffpg.normalization import init_statistics

stats = init_statistics(env.observation_size)
for name in estimators.names():
    estimator = estimators.make(name, env, policy, **estimators.comparison_settings(name, 8, 0.99))
    state = estimator.init(jax.random.PRNGKey(3), params)
    grads = {d: np.asarray(ravel_pytree(jax.jit(estimator.estimate)(
        params, stats, state, shard_batch(starts, d), jax.random.PRNGKey(4)).grad)[0])
        for d in (1, 4)}
    scale = float(np.abs(grads[1]).max())
    results[f"grad/{name}/relative_diff"] = float(np.abs(grads[4] - grads[1]).max()) / scale
# diffpg compare itself, with --devices 2, against --devices 1.
from diffpg import cli
for devices in (1, 2):
    out = pathlib.Path(tempfile.mkdtemp()) / "compare"
    assert cli.main(["compare", "--env", "pendulum", "--estimators", "bptt", "shac",
                     "--sweep", "none", "--horizon", "4", "--num-estimates", "4",
                     "--num-envs", "4", "--reference-estimates", "8", "--critic-warmup", "5",
                     "--hidden-sizes", "16", "--devices", str(devices), "--out", str(out)]) == 0
    table = json.loads((out / "results.json").read_text())["results"][0]["estimators"]
    results[f"cli_compare/{devices}"] = {k: v["mean_norm"] for k, v in table.items()}
print("RESULTS" + json.dumps(results))
"""


def _run_on_four_devices(script: str) -> dict:
    environment = os.environ | {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
                                + " --xla_force_host_platform_device_count=4",
                                "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True,
                          text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULTS")[-1])
    print(results)
    return results


@pytest.mark.slow
def test_one_and_four_devices_train_to_the_same_parameters_and_resume_bit_exactly():
    results = _run_on_four_devices(TRAINING)
    for estimator in ("shac",):
        for devices in (1, 4):
            assert results[f"{estimator}/{devices}/shards"] == devices  # really split
        # Float32 sums reduced in another order: differences at rounding level only.
        assert results[f"{estimator}/4/max_abs_diff"] < 1e-5, results
        assert abs(results[f"{estimator}/4/reward"] - results[f"{estimator}/1/reward"]) < 1e-3, \
            results
    assert results["resume/bit_exact"] and results["resume/shards"] == 2
    assert results["resume_on_one/shards"] == 1 and results["resume_on_one/max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_one_two_and_four_devices_give_every_estimator_and_compare_the_same_gradient():
    results = _run_on_four_devices(GRADIENTS)
    # diffpg compare's gradient samples, start states split too
    assert results["compare/4/max_abs_diff"] < 1e-5 * max(1.0, results["compare/gradient_size"]), \
        results
    # Raw gradients of every estimator, 1 vs 4 devices: float32 sums in another order
    # (score-function sums cancel: up to ~5e-4 of the largest coordinate); a per-device scale
    # error would be 50% or more.
    for name in estimators.names():
        assert results[f"grad/{name}/relative_diff"] < 2e-3, (name, results)
    one, two = results["cli_compare/1"], results["cli_compare/2"]
    assert one.keys() == two.keys() and all(abs(one[k] - two[k]) <= 1e-4 * abs(one[k])
                                            for k in one), (one, two)
