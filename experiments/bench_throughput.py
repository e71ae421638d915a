"""Throughput against the limit: simulation alone, a BPTT gradient, diffpg SHAC, Brax APG.

For one Brax env, backend, batch ``B`` and horizon ``T``, measured in one process and reported as
env steps per second (``B * T`` per call or update) and as ratios (an analytic env, such as
``pendulum``, runs too, with ``--skip-apg``):

* ``simulate``: ``T`` steps of ``B`` envs with the policy's sampled actions, no gradient (the
  ceiling for anything that must simulate and act);
* ``bptt_gradient``: one full-horizon BPTT gradient (``diffpg.estimators`` ``bptt``);
* ``shac_training``: diffpg's training loop with SHAC (critic fitting and optimiser included);
* ``brax_apg_training``: Brax's own APG trainer at the same horizon, batch and backend (its
  ``training/sps`` of the last epoch, compilation excluded).

Each diffpg row is timed over ``--repeats`` calls after one compiling call. Targets:
SHAC training >= 1/4 of ``simulate`` and >= 1.0x Brax APG.

A second table breaks one update of the env's configuration (``diffpg train --env ENV
ESTIMATOR``, its policy and critic sizes; ``--estimator``, default shac) into its parts, each
compiled and timed alone: the rollout's forward pass, the estimator's gradient (forward and
reverse), its critic's fit (passes of sequential minibatch steps), the whole update, and, once
per ``updates_per_call`` updates, an evaluation and a checkpoint.

    python experiments/bench_throughput.py                       # CPU: hopper, 64 x 32
    python experiments/bench_throughput.py --gpu                 # GPU: ant, 2048 x 32
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from diffpg import (  # noqa: E402
    checkpoints,
    envs,  # noqa: E402
    estimators,
)
from diffpg.acting import unroll  # noqa: E402
from diffpg.normalization import init_statistics  # noqa: E402
from diffpg.policy import make_gaussian_mlp_policy  # noqa: E402
from diffpg.training import make_trainer, settings_for  # noqa: E402


def seconds_per_call(function, *args, repeats: int) -> tuple[float, float]:
    """(compile + first call, mean of ``repeats`` later calls) in seconds."""
    started = time.perf_counter()
    jax.block_until_ready(function(*args))
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(function(*args))
    return first, (time.perf_counter() - started) / repeats


def update_breakdown(env_name: str, num_envs: int, horizon: int, repeats: int,
                     key: jax.Array, estimator_name: str = "shac") -> list[dict]:
    """Seconds of each part of one update with the env's configuration (module docstring)."""
    settings = settings_for(env=env_name, estimator=estimator_name, num_envs=num_envs,
                            horizon=horizon, updates=1000, updates_per_call=1)
    trainer = make_trainer(settings)
    state = trainer.init_run()
    estimator, policy = trainer.estimator, trainer.policy
    estimate = jax.jit(estimator.estimate)
    parts = {
        "rollout (forward only)": (jax.jit(lambda s, k: unroll(
            trainer.env, policy, s.params, s.obs_stats, s.env_state, k, horizon)[1].next_obs),
            (state, key)),
        "gradient (forward + reverse)": (
            lambda s, k: estimate(s.params, s.obs_stats, s.estimator_state, s.env_state, k).grad,
            (state, key)),
    }
    # the critic fits the batch of the estimate (args made when its turn comes, so that the
    # gradient's row includes its compilation)
    parts["critic fit"] = (jax.jit(lambda s, b, k: estimator.update(
        s.params, s.obs_stats, s.estimator_state, b, k)), lambda: (state, estimate(
            state.params, state.obs_stats, state.estimator_state, state.env_state, key).batch,
            key))
    parts["whole update"] = (trainer.run_updates, (state,))
    parts["evaluation (per call)"] = (trainer.evaluate, (state, key))
    rows = []
    for what, (function, args) in parts.items():
        args = args() if callable(args) else args
        compile_s, seconds = seconds_per_call(function, *args, repeats=repeats)
        rows.append({"part": what, "seconds": seconds, "compile_s": compile_s})
    with tempfile.TemporaryDirectory() as folder:
        with checkpoints.checkpoint_manager(Path(folder), writing=True) as manager:
            started = time.perf_counter()
            for update in range(repeats):
                checkpoints.save_checkpoint(manager, state._replace(update=state.update + update), [])
            rows.append({"part": "checkpoint (per call)",
                         "seconds": (time.perf_counter() - started) / repeats, "compile_s": 0.0})
    whole = next(row["seconds"] for row in rows if row["part"] == "whole update")
    for row in rows:
        row["share_of_update"] = row["seconds"] / whole
    return rows


def brax_apg_sps(env, num_envs: int, horizon: int, updates: int) -> tuple[float, float]:
    """Brax APG's ``training/sps`` of its last epoch, and its whole wall-clock."""
    from brax.training.agents.apg import train as apg

    reported = []
    started = time.perf_counter()
    apg.train(environment=env.unwrapped.brax_env, episode_length=env.episode_length,
              policy_updates=updates, horizon_length=horizon, num_envs=num_envs, num_evals=3,
              num_eval_envs=16, learning_rate=2e-3, normalize_observations=True,
              progress_fn=lambda step, metrics: reported.append(dict(metrics)))
    sps = [m["training/sps"] for m in reported if "training/sps" in m]
    return float(sps[-1]), time.perf_counter() - started


def parse_arguments():
    """The command line: env, sizes, repeats and what to leave out."""
    parser = common.parser("bench_throughput", __doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="GPU size: ant, 2048 envs")
    parser.add_argument("--env", default=None, help="Brax env (default: hopper; ant with --gpu), "
                        "or an analytic env with --skip-apg")
    parser.add_argument("--num-envs", type=int, default=None)
    parser.add_argument("--horizon", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-apg", action="store_true", help="leave Brax APG out")
    parser.add_argument("--estimator", default="shac",
                        help="estimator of the per-update breakdown (default: shac)")
    return parser.parse_args()


def simulation_and_gradient_rows(env, num_envs: int, horizon: int, repeats: int,
                                 key: jax.Array) -> list[dict]:
    """The ``simulate`` and ``bptt_gradient`` rows: ``T`` steps of ``B`` envs from ``B`` fresh
    starts with a fresh MLP policy, without and with BPTT's gradient; each row's
    ``env_steps_per_s`` is ``B * T`` over the mean seconds of a call."""
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size)
    params = policy.init(key)
    starts = jax.vmap(env.reset)(jax.random.split(key, num_envs))
    stats = init_statistics(env.observation_size)
    steps = num_envs * horizon

    def simulate(env_states, key):
        # Return what depends on the physics: a constant reward (inverted_pendulum's) alone
        # would let XLA drop the simulation.
        end, transitions = unroll(env, policy, params, stats, env_states, key, horizon)
        return end.obs, transitions.reward, transitions.next_obs

    first, per_call = seconds_per_call(jax.jit(simulate), starts, key, repeats=repeats)
    rows = [{"what": "simulate", "compile_s": first, "env_steps_per_s": steps / per_call}]
    bptt = estimators.make("bptt", env, policy, horizon=horizon)
    bptt_state = bptt.init(key, params)
    gradient = jax.jit(lambda s, k: bptt.estimate(params, stats, bptt_state, s, k).grad)
    first, per_call = seconds_per_call(gradient, starts, key, repeats=repeats)
    rows.append({"what": "bptt_gradient", "compile_s": first, "env_steps_per_s": steps / per_call})
    return rows


def shac_training_row(env_name: str, num_envs: int, horizon: int, repeats: int) -> dict:
    """The ``shac_training`` row: diffpg's training loop with SHAC, ``repeats`` updates per call;
    ``compile_s`` is the first call (compilation included), the rate is from the second."""
    settings = settings_for(env=env_name, estimator="shac", num_envs=num_envs, horizon=horizon,
                            updates=100 * repeats, updates_per_call=repeats,
                            eval_envs=1)
    trainer = make_trainer(settings)
    state = trainer.init_run()
    started = time.perf_counter()
    state, _ = jax.block_until_ready(trainer.run_updates(state))
    first = time.perf_counter() - started
    started = time.perf_counter()
    state, _ = jax.block_until_ready(trainer.run_updates(state))
    per_update = (time.perf_counter() - started) / repeats
    return {"what": "shac_training", "compile_s": first,
            "env_steps_per_s": num_envs * horizon / per_update}


def compare_rates(rows: list[dict]) -> dict[str, float]:
    """Adds ``vs_simulate`` (and ``vs_brax_apg`` where APG ran) to every row, each row's rate
    over that row's; returns the targets' measured ratios for SHAC training."""
    rate = {row["what"]: row["env_steps_per_s"] for row in rows}
    for row in rows:
        row["vs_simulate"] = row["env_steps_per_s"] / rate["simulate"]
        if "brax_apg_training" in rate:
            row["vs_brax_apg"] = row["env_steps_per_s"] / rate["brax_apg_training"]
    targets = {"shac_vs_simulate (target >= 0.25)": rate["shac_training"] / rate["simulate"]}
    if "brax_apg_training" in rate:
        targets["shac_vs_brax_apg (target >= 1.0)"] = (rate["shac_training"]
                                                       / rate["brax_apg_training"])
    return targets


def main() -> None:
    common.supply_brax_trainer_api()
    arguments = parse_arguments()
    # Not inverted_pendulum: its reward is a constant 1 while alive, so its BPTT gradient is 0.
    env_name = arguments.env or ("ant" if arguments.gpu else "hopper")
    num_envs = arguments.num_envs or (2048 if arguments.gpu else 64)
    horizon, repeats = arguments.horizon, arguments.repeats
    out = common.prepare_output(arguments.out, arguments.overwrite)

    env = envs.make(env_name)
    key = jax.random.PRNGKey(arguments.seed)
    rows = simulation_and_gradient_rows(env, num_envs, horizon, repeats, key)
    rows.append(shac_training_row(env_name, num_envs, horizon, repeats))
    if not arguments.skip_apg:
        sps, wall = brax_apg_sps(env, num_envs, horizon, updates=3 * repeats)
        rows.append({"what": "brax_apg_training", "compile_s": wall, "env_steps_per_s": sps})
    targets = compare_rates(rows)
    table = common.format_table(rows, ["what", "env_steps_per_s", "vs_simulate", "vs_brax_apg",
                                       "compile_s"])
    backend = getattr(env.unwrapped, "backend", None)  # None: an analytic env
    header = (f"{env_name} ({backend or 'analytic'}), {num_envs} envs x {horizon} steps, "
              f"{jax.devices()[0].platform}; compile_s for brax_apg is its whole run")
    print(header)
    print(table)
    for name, value in targets.items():
        print(f"{name}: {value:.3f}")
    breakdown = update_breakdown(env_name, num_envs, horizon, repeats, key, arguments.estimator)
    breakdown_table = common.format_table(breakdown, ["part", "seconds", "share_of_update",
                                                      "compile_s"])
    print(f"\none {arguments.estimator} update of {env_name}'s configuration, {num_envs} envs x "
          f"{horizon} steps:")
    print(breakdown_table)
    common.write_json(out / "results.json", {
        "env": env_name, "backend": backend, "num_envs": num_envs,
        "horizon": horizon, "repeats": repeats, "rows": rows, "targets": targets,
        "update_breakdown": breakdown, "breakdown_estimator": arguments.estimator,
        "device": str(jax.devices()[0]),
    })
    (out / "report.md").write_text(f"# Throughput\n\n{header}\n\n{table}\n\n" + "\n".join(
        f"- {k}: {v:.3f}" for k, v in targets.items()) + f"\n\n## One {arguments.estimator} update\n\n"
        + breakdown_table + "\n")


if __name__ == "__main__":
    main()
