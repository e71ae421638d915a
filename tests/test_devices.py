"""Data parallelism: 1, 2 and 4 (forced host) devices train to the same parameters and give
the same comparison gradients; a multi-seed, multi-device run resumes bit-exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json
import jax
import numpy as np
from diffpg.training import make_trainer, settings_for

results = {}
for estimator in ("shac",):
    params = {}
    for devices in (1, 2, 4):
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
    for devices in (2, 4):
        diff = np.abs(params[devices] - params[1]).max()
        results[f"{estimator}/{devices}/max_abs_diff"] = float(diff)
    results[f"{estimator}/update_size"] = float(np.abs(params[1]).max())
import envs
from diffpg import estimators
from diffpg.compare import sample_gradients
from diffpg.devices import shard_batch
from diffpg.policy import make_gaussian_mlp_policy

env = envs.make("pendulum")
policy = make_gaussian_mlp_policy(env.observation_size, env.action_size, hidden_sizes=(16,))
params = policy.init(jax.random.PRNGKey(0))
starts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), 8))
estimator = estimators.make("bptt", env, policy, horizon=8)
samples = {}
for devices in (1, 2, 4):
    samples[devices], _ = sample_gradients(estimator, params, shard_batch(starts, devices),
                                           jax.random.PRNGKey(2), 4, 0)
for devices in (2, 4):
    results[f"compare/{devices}/max_abs_diff"] = float(np.abs(samples[devices]
                                                              - samples[1]).max())
results["compare/gradient_size"] = float(np.abs(samples[1]).max())
# Two seeds over two devices, stopped and resumed: bit-exact, and still split.
import pathlib, tempfile
from diffpg.runs import train

folder = pathlib.Path(tempfile.mkdtemp())
settings = settings_for(env="pendulum", updates=4, updates_per_call=2, num_envs=4, horizon=8,
                         eval_envs=2, hidden_sizes=(16,), seeds=2, devices=2)
whole = train(settings, folder / "whole")
train(settings, folder / "split", stop_at_update=2)
resumed = train(settings, folder / "split", resume=True)
results["resume/bit_exact"] = all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(whole.params),
                                         jax.tree.leaves(resumed.params)))
results["resume/shards"] = len(resumed.env_state.obs.sharding.device_set)
print("RESULTS" + json.dumps(results))
"""


def test_one_two_and_four_devices_give_the_same_parameters():
    environment = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=environment, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULTS")[-1])
    print(results)
    for estimator in ("shac",):
        for devices in (1, 2, 4):
            assert results[f"{estimator}/{devices}/shards"] == devices  # really split
        for devices in (2, 4):
            # Float32 sums reduced in another order: differences at rounding level only.
            assert results[f"{estimator}/{devices}/max_abs_diff"] < 1e-5, results
            assert abs(results[f"{estimator}/{devices}/reward"]
                       - results[f"{estimator}/1/reward"]) < 1e-3, results
    assert results["resume/bit_exact"] and results["resume/shards"] == 2
    for devices in (2, 4):  # diffpg compare's gradient samples, start states split too
        assert results[f"compare/{devices}/max_abs_diff"] < 1e-5 * max(
            1.0, results["compare/gradient_size"]), results
