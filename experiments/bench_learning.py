"""Learning against Brax's own trainers: return against env steps and wall-clock, one Brax env.

diffpg's estimators (``diffpg.training`` with their defaults) and Brax's APG and PPO run on the
same env, backend and machine for about the same number of env steps. Each logs
``(env steps, wall-clock, deterministic eval return)`` at its evaluations; wall-clock includes
compilation, as a user waits for it. Targets: SHAC above APG at equal env steps; SHAC reaches
PPO's final return with at most 1/10 of PPO's env steps and less wall-clock.

diffpg's ``ppo`` and ``brax_ppo`` share one configuration (``ppo_settings``: the batch of
``num_envs`` environments x ``unroll_length`` steps cut into minibatches of environments, epochs,
discount, learning rate, entropy cost, clipping, GAE lambda, network sizes, no gradient clipping,
deterministic evaluation), so their curves check diffpg's training loop against an independent
implementation. A diffpg learner is an estimator spec: ``shac`` or ``shac:window=16,discount=0.995``
(its settings, or training settings such as ``init_log_std``, as Python literals) on top of the
env's configuration (``diffpg.configs``).

    python experiments/bench_learning.py                 # CPU: inverted_pendulum, ~200k steps
    python experiments/bench_learning.py --learners ppo brax_ppo --seeds 5 --steps 1000000 --num-envs 512
    python experiments/bench_learning.py --env hopper --num-envs 256 --steps 4000000 --seeds 3 \
        --evals 8 --learners shac shac:health_shaping=0.0 brax_ppo
    python experiments/bench_learning.py --env playground:CheetahRun --num-envs 256 --seeds 3 \
        --learners shac brax_ppo                         # Playground's PPO settings
    python experiments/bench_learning.py --gpu           # GPU: ant, 2048 envs, ~50M steps
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from diffpg import envs  # noqa: E402
from diffpg.configs import config_for, default_estimator  # noqa: E402
from diffpg.options import parse_spec  # noqa: E402
from diffpg.runs import train  # noqa: E402
from diffpg.stats import (  # noqa: E402
    interquartile_mean,
    interquartile_mean_interval,
    mean_confidence_half_width,
)
from diffpg.training import TrainSettings, settings_for  # noqa: E402

PPO_INVERTED_PENDULUM = {
    "unroll_length": 5, "minibatches": 8, "epochs": 4, "discount": 0.97, "learning_rate": 3e-4,
    "entropy_cost": 1e-2, "clip_ratio": 0.3, "gae_lambda": 0.95, "reward_scaling": 1.0,
    "policy_hidden_sizes": (32, 32, 32, 32), "value_hidden_sizes": (256,) * 5}
"""Brax's published inverted-pendulum settings (unroll 5, discount 0.97, learning rate 3e-4,
entropy cost 1e-2, 4 epochs; its default clipping 0.3, GAE lambda 0.95 and networks), with 8
minibatches and without reward scaling."""

PPO_LOCOMOTION = PPO_INVERTED_PENDULUM | {"reward_scaling": 10.0}
"""Brax's published ant settings (the pendulum's plus reward scaling 10), with 8 minibatches of
the CPU's env count (Brax: 32 of 4,096). Brax publishes SAC, not PPO, for hopper and walker2d;
these are its nearest published PPO settings for a locomotion task."""


PPO_PLAYGROUND_DM_CONTROL = PPO_INVERTED_PENDULUM | {
    "unroll_length": 30, "minibatches": 32, "epochs": 16, "discount": 0.995,
    "learning_rate": 1e-3, "entropy_cost": 1e-2, "reward_scaling": 10.0}
"""MuJoCo Playground's published PPO settings for the DM Control suite (Zakka et al. 2025, table
XII; ``mujoco_playground.config.dm_control_suite_params.brax_ppo_config``: unroll 30, 32
minibatches, 16 epochs, discount 0.995, learning rate 1e-3, entropy cost 1e-2, reward scaling
10, Brax's default networks, clipping and GAE lambda), with the CPU's env count (Playground:
2,048 envs, minibatches of 1,024)."""


PPO_HALFCHEETAH = PPO_LOCOMOTION | {
    "unroll_length": 20, "epochs": 8, "discount": 0.95, "entropy_cost": 1e-3,
    "reward_scaling": 1.0}
"""Brax's published halfcheetah settings (``notebooks/training.ipynb``: unroll 20, 8 epochs,
discount 0.95, learning rate 3e-4, entropy cost 1e-3, no reward scaling; 32 minibatches of 512
of its 2,048 envs), with 8 minibatches of the CPU's env count."""


PPO_HUMANOID = PPO_LOCOMOTION | {
    "unroll_length": 10, "epochs": 8, "entropy_cost": 1e-3, "reward_scaling": 0.1}
"""Brax's published humanoid settings (``notebooks/training.ipynb``: unroll 10, 8 epochs,
discount 0.97, learning rate 3e-4, entropy cost 1e-3, reward scaling 0.1; 32 minibatches of
1,024 of its 2,048 envs), with 8 minibatches of the CPU's env count."""


def ppo_settings(env_name: str) -> dict:
    """The PPO configuration both implementations run on ``env_name``."""
    if env_name.startswith(envs.playground.PREFIX):
        return PPO_PLAYGROUND_DM_CONTROL
    if env_name == "halfcheetah":
        return PPO_HALFCHEETAH
    if env_name == "humanoid":
        return PPO_HUMANOID
    return PPO_INVERTED_PENDULUM if "pendulum" in env_name else PPO_LOCOMOTION


BRAX_INITIAL_LOG_STD = float(np.log(np.log(2.0) + 1e-3))
"""Brax's PPO policy starts with std softplus(0) + 0.001; diffpg's starts there too."""


def learner_horizon(learner: str, env_name: str, default: int) -> int:
    """The steps per rollout a learner runs: its own ``horizon=`` option, else PPO's unroll
    length for ``ppo`` and ``brax_ppo``, else ``default`` (``--horizon``)."""
    estimator, options = parse_spec(learner)
    unroll = ppo_settings(env_name)["unroll_length"] if estimator.endswith("ppo") else default
    return int(options.get("horizon", unroll))


class OutOfTime(Exception):
    """A learner's wall-clock budget ran out: its curve stops at the evaluation that passed it."""


def stop_past(deadline: float | None) -> None:
    """Raise ``OutOfTime`` once ``time.perf_counter()`` is past ``deadline`` (None: never)."""
    if deadline is not None and time.perf_counter() > deadline:
        raise OutOfTime


def run_diffpg(learner: str, env_name: str, backend: str | None, num_envs: int, horizon: int,
               steps: int, evals: int, seeds: int, out: Path,
               deadline: float | None = None) -> list[dict]:
    """A diffpg learner: an estimator spec ``name`` or ``name:key=value,...`` (its settings, or
    training settings such as ``init_log_std``). Its run folder (settings, metrics, the last
    checkpoint, for ``diffpg eval`` and ``diffpg video``) is ``out/runs/<learner>``. With a
    ``deadline`` (``time.perf_counter()``), the run stops at the first evaluation past it (its
    schedule still the one of ``steps``)."""
    estimator, options = parse_spec(learner)
    trainer_fields = {field.name for field in dataclasses.fields(TrainSettings)}
    overrides = {"backend": backend} | {k: v for k, v in options.items() if k in trainer_fields}
    options = {k: v for k, v in options.items() if k not in trainer_fields}
    PPO = ppo_settings(env_name)
    # A learner's own horizon (e.g. shac:horizon=64) sets its env steps per update: the budget
    # of env steps is kept, not the number of updates.
    horizon = learner_horizon(learner, env_name, horizon)
    options.pop("horizon", None)
    updates = max(steps // (num_envs * horizon), evals)
    per_call = max(updates // evals, 1)
    if estimator == "ppo":
        overrides |= {"minibatches": PPO["minibatches"], "epochs": PPO["epochs"],
                      "learning_rate": PPO["learning_rate"],
                      "final_learning_rate": PPO["learning_rate"],
                      "hidden_sizes": PPO["policy_hidden_sizes"],
                      "init_log_std": BRAX_INITIAL_LOG_STD, "discount": PPO["discount"]}
        options |= {k: PPO[k] for k in ("entropy_cost", "clip_ratio", "gae_lambda")}
        options["critic_hidden_sizes"] = PPO["value_hidden_sizes"]
        if PPO["reward_scaling"] != 1.0:
            raise SystemExit(f"error: diffpg's ppo has no reward scaling; {env_name}'s PPO "
                             f"settings scale rewards by {PPO['reward_scaling']}")
    settings = settings_for(env=env_name, estimator=estimator, num_envs=num_envs,
                            horizon=horizon, updates=per_call * evals, updates_per_call=per_call,
                            eval_envs=16, seeds=seeds, estimator_options=options, **overrides)
    curve = []
    started = time.perf_counter()
    def record(row):
        curve.append({
            "env_steps": row["env_steps"], "seconds": time.perf_counter() - started,
            "reward": row["eval/episode_reward"],
            "ci95": row.get("eval/episode_reward_ci95", 0.0),
            "seeds": [row[f"eval/episode_reward/seed_{i}"] for i in range(seeds)]
            if seeds > 1 else [row["eval/episode_reward"]]})
        report_progress(learner, curve[-1])
        stop_past(deadline)

    try:
        train(settings, out / "runs" / run_folder_name(learner), on_log=record)
    except OutOfTime:
        pass
    return curve


def run_folder_name(learner: str) -> str:
    """``learner`` in the characters a folder name keeps everywhere."""
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", re.sub("[\"']", "", learner.replace(":", "-")))


def report_progress(learner: str, point: dict) -> None:
    """One line per evaluation on stderr, so that a long benchmark shows where it is."""
    print(f"{learner}: {float(point['reward']):,.0f} at {int(point['env_steps']):,} env steps "
          f"({point['seconds']:.0f} s)", file=sys.stderr, flush=True)


def run_brax(algorithm: str, env_name: str, backend: str | None, num_envs: int, horizon: int,
             steps: int, evals: int, seeds: int) -> list[dict]:
    """Brax's trainer once per seed; the curve is the mean over seeds (seconds: summed)."""
    runs = [run_brax_seed(algorithm, env_name, backend, num_envs, horizon, steps, evals, seed)
            for seed in range(seeds)]
    return [mean_point([run[i] for run in runs]) for i in range(min(map(len, runs)))]


def mean_point(points: list[dict]) -> dict:
    rewards = [p["reward"] for p in points]
    return {"env_steps": points[0]["env_steps"], "seconds": sum(p["seconds"] for p in points),
            "reward": float(np.mean(rewards)), "ci95": mean_confidence_half_width(rewards),
            "seeds": rewards}


def run_brax_seed(algorithm: str, env_name: str, backend: str | None, num_envs: int,
                  horizon: int, steps: int, evals: int, seed: int,
                  deadline: float | None = None) -> list[dict]:
    """Brax's trainer on one seed (stopped at the first evaluation past ``deadline``)."""
    try:
        return _run_brax_seed(algorithm, env_name, backend, num_envs, horizon, steps, evals,
                              seed, deadline)
    except OutOfTime as stopped:
        return stopped.args[0]


def _run_brax_seed(algorithm: str, env_name: str, backend: str | None, num_envs: int,
                   horizon: int, steps: int, evals: int, seed: int,
                   deadline: float | None) -> list[dict]:
    # Brax's own env (on diffpg's backend), or Playground's adapted
    env = envs.make(env_name, backend=backend).unwrapped.as_brax_env()
    episode_length = envs.default_episode_length(env_name)
    curve = []
    started = time.perf_counter()
    policy_updates = max(steps // (num_envs * horizon), evals)
    # Brax's PPO reports env steps; its APG reports epochs of round(updates / evals) updates.
    steps_per_report = (round(policy_updates / evals) * num_envs * horizon
                        if algorithm == "brax_apg" else 1)

    def progress(step, metrics):
        curve.append({"env_steps": int(step) * steps_per_report,
                      "seconds": time.perf_counter() - started,
                      "reward": float(metrics["eval/episode_reward"])})
        report_progress(f"{algorithm} seed {seed}", curve[-1])
        try:
            stop_past(deadline)
        except OutOfTime:
            raise OutOfTime(curve) from None

    if algorithm == "brax_apg":
        from brax.training.agents.apg import train as apg

        apg.train(environment=env, episode_length=episode_length, policy_updates=policy_updates,
                  horizon_length=horizon, num_envs=num_envs, num_evals=evals + 1,
                  num_eval_envs=16, learning_rate=2e-3, normalize_observations=True,
                  progress_fn=progress, seed=seed)
    else:
        import functools

        from brax.training.agents.ppo import networks as ppo_networks
        from brax.training.agents.ppo import train as ppo

        PPO = ppo_settings(env_name)

        # One batch of num_envs environments x unroll_length steps per iteration, cut into
        # minibatches of environments: the layout of diffpg's ppo with the same settings.
        network = functools.partial(ppo_networks.make_ppo_networks,
                                    policy_hidden_layer_sizes=PPO["policy_hidden_sizes"],
                                    value_hidden_layer_sizes=PPO["value_hidden_sizes"])
        ppo.train(environment=env, num_timesteps=steps, episode_length=episode_length,
                  num_envs=num_envs, batch_size=num_envs // PPO["minibatches"],
                  num_minibatches=PPO["minibatches"], unroll_length=PPO["unroll_length"],
                  num_updates_per_batch=PPO["epochs"], discounting=PPO["discount"],
                  learning_rate=PPO["learning_rate"], entropy_cost=PPO["entropy_cost"],
                  clipping_epsilon=PPO["clip_ratio"], gae_lambda=PPO["gae_lambda"],
                  reward_scaling=PPO["reward_scaling"], normalize_observations=True, network_factory=network,
                  deterministic_eval=True, num_evals=evals + 1, num_eval_envs=16,
                  progress_fn=progress, seed=seed)
    return curve


def configured_backend(env_name: str) -> str | None:
    """The backend ``diffpg train --env env_name`` runs on, so Brax's trainers run there too."""
    return config_for(env_name, default_estimator(env_name)).trainer.get("backend")


def main() -> None:
    common.supply_brax_trainer_api()
    parser = common.parser("bench_learning", __doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="GPU size: ant, 2048 envs")
    parser.add_argument("--env", default=None)
    parser.add_argument("--num-envs", type=int, default=None)
    parser.add_argument("--backend", default=None,
                        help="Brax physics backend of every learner (default: the env's "
                             "configured one, else its measured default)")
    parser.add_argument("--horizon", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="env steps per learner")
    parser.add_argument("--evals", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per learner (diffpg: vmapped; Brax: one run each)")
    parser.add_argument("--learners", nargs="+", default=[
        "shac", "reinforce", "critic_backprop", "brax_apg", "brax_ppo"])
    arguments = parser.parse_args()
    env_name = arguments.env or ("ant" if arguments.gpu else "inverted_pendulum")
    num_envs = arguments.num_envs or (2048 if arguments.gpu else 64)
    steps = arguments.steps or (50_000_000 if arguments.gpu else 200_000)
    backend = arguments.backend or configured_backend(env_name)
    out = common.prepare_output(arguments.out, arguments.overwrite)

    curves = {}
    for learner in arguments.learners:
        sizes = (num_envs, arguments.horizon, steps, arguments.evals, arguments.seeds)
        if learner.startswith("brax_"):
            curves[learner] = run_brax(learner, env_name, backend, *sizes)
        else:
            curves[learner] = run_diffpg(learner, env_name, backend, *sizes, out)
        print(learner, [(c["env_steps"], round(c["seconds"]), round(c["reward"], 1))
                        for c in curves[learner]], flush=True)

    rows = []
    for learner, curve in curves.items():
        final = curve[-1]
        rows.append({"learner": learner, "final_reward": final["reward"],
                     "final_ci95": final.get("ci95", 0.0),
                     "final_per_seed": " ".join(f"{r:.0f}" for r in final.get("seeds", [])),
                     "final_iqm": interquartile_mean(final.get("seeds") or [final["reward"]]),
                     "final_iqm_interval": "[{:.0f}, {:.0f}]".format(
                         *interquartile_mean_interval(final.get("seeds") or [final["reward"]])),
                     "best_reward": max(c["reward"] for c in curve),
                     "env_steps": final["env_steps"], "seconds": final["seconds"]})
    targets = {}
    if "shac" in curves and "brax_ppo" in curves:
        ppo_final = curves["brax_ppo"][-1]
        reached = [c for c in curves["shac"] if c["reward"] >= ppo_final["reward"]]
        if reached:
            targets["shac_steps_to_ppo_final / ppo_steps (target <= 0.1)"] = (
                reached[0]["env_steps"] / ppo_final["env_steps"])
            targets["shac_seconds_to_ppo_final / ppo_seconds (target < 1)"] = (
                reached[0]["seconds"] / ppo_final["seconds"])
        else:
            targets["shac reaches PPO's final reward"] = 0.0
    if "shac" in curves and "brax_apg" in curves:
        targets["shac_final - apg_final (target > 0)"] = (curves["shac"][-1]["reward"]
                                                          - curves["brax_apg"][-1]["reward"])
    horizons = {learner: learner_horizon(learner, env_name, arguments.horizon)
                for learner in curves}
    header = (f"{env_name} ({backend or 'default'} backend), {num_envs} envs, horizon " + ", ".join(
        f"{h} ({learner})" for learner, h in horizons.items()) + f", ~{steps} env steps each, "
              f"{arguments.seeds} seed(s); rewards are means over seeds, bands their 95% CI")
    table = common.format_table(rows, ["learner", "final_reward", "final_ci95", "final_iqm",
                                       "final_iqm_interval", "final_per_seed",
                                       "best_reward", "env_steps", "seconds"])
    print(header)
    print(table)
    for name, value in targets.items():
        print(f"{name}: {value:.3g}")
    common.write_json(out / "results.json", {"env": env_name, "backend": backend, "num_envs": num_envs,
                                             "curves": curves, "rows": rows,
                                             "targets": targets})
    plot(curves, out / "learning.png", header)
    (out / "report.md").write_text(f"# Learning\n\n{header}\n\n{table}\n\n" + "\n".join(
        f"- {k}: {v:.3g}" for k, v in targets.items()) + "\n\n![](learning.png)\n")


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    common.draw_curves(curves, axes[0], axes[1])
    axes[0].set(xlabel="env steps", ylabel="eval episode return")
    axes[1].set(xlabel="wall-clock incl. compilation (s)")
    axes[0].legend(fontsize=8)
    figure.suptitle(textwrap.fill(title, 130), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
