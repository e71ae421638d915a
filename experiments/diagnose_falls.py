"""Why a locomotion run collapses: which fall ends its episodes, what the critic expects before a
fall, and whether one update that raises the short-window objective lowers the episode return.

Trains one run (``diffpg.training`` with the env's configuration and the learner's settings, as
``diffpg train`` would) and every ``--probe-every`` updates probes the current policy:

* **fall census**: ``--census-envs`` episodes of the raw task (no time limit, the stochastic
  policy) from fresh starts, for one episode length; for each episode that ends by a fall, which
  healthy bound it crossed (``env.health_margins`` and ``env.health_bound_names``: the torso's
  height below its minimum, ``height_low``, a *sink*, or above its maximum, ``height_high``, a
  *jump* (the ant's 0.2 m and 1.0 m); for hopper and walker2d also its pitch below or above its
  range, ``pitch_low`` or ``pitch_high``) and the torso's uprightness there (the world-z
  component of its local z axis: 1 upright, -1 on its back);
* **critic before a fall**: the critic's value ``V(s_{t_f - k})`` k steps before each fall
  (k = 1, 8, 32) against the discounted reward actually collected from there to the fall
  (``sum_j gamma^j r``; the fall's value is 0), and the same on steps that no fall follows
  within 32 steps (where the realised sum is truncated at 32 steps and bootstrapped with V,
  a one-sided check); an over-estimate before falls means the bootstrap at a window's end
  hides the fall from the actor;
* **one update, common random numbers**: from the run's current state, one more update, then
  the short-window objective of the same batch states and noise (SHAC's ``J`` of one window of
  ``horizon`` steps) and the deterministic evaluation return of the same start states, before
  and after. A rise of the first with a fall of the second is the gradient optimising what the
  task does not reward.

Prints one line per probe, then the table, and writes ``results.json`` and ``report.md``::

    python experiments/diagnose_falls.py --env ant --updates 1950 --probe-every 150
    python experiments/diagnose_falls.py --env ant --sizes gpu --updates 150 --probe-every 10
    python experiments/diagnose_falls.py --env hopper --updates 488 --probe-every 122 --updates-per-call 61
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from diffpg import envs  # noqa: E402
from diffpg.critics import make_mlp_value_function, make_value_ensemble  # noqa: E402
from diffpg.normalization import normalize  # noqa: E402
from diffpg.options import parse_spec  # noqa: E402
from diffpg.training import TrainSettings, make_trainer, settings_for  # noqa: E402

LOOKBACK = (1, 8, 32)
"""Steps before a fall at which the critic's value is compared with what followed."""


def torso_uprightness(pipeline_state) -> jax.Array:
    """World-z component of the torso's local z axis, from its quaternion (w, x, y, z)."""
    w, x, y, z = (pipeline_state.x.rot[0, i] for i in range(4))
    del w, z
    return 1.0 - 2.0 * (x * x + y * y)


def census(raw_env, policy, params, obs_stats, value, discount, key, num_envs, steps):
    """One episode of ``steps`` steps per env on the raw task, stochastic policy.

    Returns per env ``[N]``: whether it fell, the step of the fall, the margins at the fall
    ``[N, k]``, the torso's uprightness there, and ``value_before``/``realised_before``
    ``[N, len(LOOKBACK)]`` (NaN where the fall came earlier than the look-back), plus
    ``value_alive``/``realised_alive``: the same on steps no fall follows within 32 steps.
    """
    key_reset, key_noise = jax.random.split(key)
    starts = jax.vmap(raw_env.reset)(jax.random.split(key_reset, num_envs))

    def step(state, step_key):
        obs = state.obs
        mean, std = policy.distribution(params, normalize(obs_stats, obs))
        action = policy.to_action(mean + std * jax.random.normal(step_key, mean.shape))
        next_state = jax.vmap(raw_env.step)(state, action)
        margins = jax.vmap(raw_env.health_margins)(next_state)
        upright = jax.vmap(torso_uprightness)(next_state.pipeline_state)
        return next_state, (value(obs), next_state.reward, next_state.done, margins, upright)

    _, (values, rewards, dones, margins, upright) = jax.lax.scan(
        step, starts, jax.random.split(key_noise, steps))
    fell = jnp.any(dones > 0, axis=0)
    fall_step = jnp.where(fell, jnp.argmax(dones > 0, axis=0), steps - 1)
    alive = jnp.arange(steps)[:, None] <= fall_step[None, :]
    rewards = jnp.where(alive, rewards, 0.0)
    # discounted reward-to-go inside the first episode (0 after a fall)
    def backward(carry, inputs):
        reward, keep = inputs
        carry = reward + discount * carry * keep
        return carry, carry

    not_last = jnp.concatenate([alive[1:], jnp.zeros_like(alive[:1])], axis=0)
    _, to_go = jax.lax.scan(backward, jnp.zeros(num_envs), (rewards, not_last), reverse=True)
    columns = jnp.arange(num_envs)

    def before(series, k):
        index = fall_step - k + 1  # the state k steps before the one the fall reached
        return jnp.where(fell & (index >= 0), series[jnp.maximum(index, 0), columns], jnp.nan)

    value_before = jnp.stack([before(values, k) for k in LOOKBACK], axis=1)
    realised_before = jnp.stack([before(to_go, k) for k in LOOKBACK], axis=1)
    # steps with 32 more steps inside the episode: realised 32-step sum + gamma^32 V(s_{t+32})
    horizon = LOOKBACK[-1]
    partial = to_go[:-horizon] - discount**horizon * to_go[horizon:]
    far_from_fall = (jnp.arange(steps - horizon)[:, None] + horizon) < fall_step[None, :]
    far_from_fall &= ~fell[None, :] | ((fall_step[None, :] - jnp.arange(steps - horizon)[:, None])
                                       > 2 * horizon)
    realised_alive = partial + discount**horizon * values[horizon:]
    return {
        "fell": fell, "fall_step": fall_step,
        "on_back_step_share": jnp.sum(alive & (upright < 0)) / jnp.sum(alive),
        "reward_per_step": jnp.sum(rewards) / jnp.sum(alive),
        "margins": margins[fall_step, columns], "upright": upright[fall_step, columns],
        "value_before": value_before, "realised_before": realised_before,
        "value_alive": jnp.sum(jnp.where(far_from_fall, values[:-horizon], 0.0))
        / jnp.maximum(jnp.sum(far_from_fall), 1),
        "realised_alive": jnp.sum(jnp.where(far_from_fall, realised_alive, 0.0))
        / jnp.maximum(jnp.sum(far_from_fall), 1),
    }


def critic_value_function(settings, observation_size):
    """The run's critic as ``(critic params, obs) -> V`` (SHAC's, or an ensemble's minimum)."""
    estimator_settings = settings.resolved_estimator_settings
    value_function = make_mlp_value_function(observation_size,
                                             estimator_settings.critic_hidden_sizes)
    members = getattr(estimator_settings, "critic_members", 1)
    if members > 1:
        value_function = make_value_ensemble(value_function, members)
    return value_function


def parse_arguments():
    """The command line: env, learner, sizes, the training length and the probes' schedule."""
    parser = common.parser(Path(__file__).stem, __doc__.split("\n\n")[0])
    parser.add_argument("--env", default="ant")
    parser.add_argument("--learner", default="shac", help="estimator spec, as bench_learning's")
    parser.add_argument("--sizes", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--updates", type=int, default=1950)
    parser.add_argument("--updates-per-call", type=int, default=25)
    parser.add_argument("--probe-every", type=int, default=150, help="updates between probes")
    parser.add_argument("--census-envs", type=int, default=64)
    return parser.parse_args()


def run_settings(args) -> TrainSettings:
    """The run's settings: the env's configuration for the learner's estimator at ``--sizes``,
    with the learner spec's options (its training settings among them) and the run's length."""
    estimator, options = parse_spec(args.learner)
    trainer_fields = {field.name for field in dataclasses.fields(TrainSettings)}
    training = {k: options.pop(k) for k in list(options) if k in trainer_fields}
    return settings_for(args.env, estimator, options, sizes=args.sizes, updates=args.updates,
                        updates_per_call=args.updates_per_call, seed=args.seed, **training)


def make_probe(settings: TrainSettings, trainer, raw_env, census_envs: int):
    """The jitted probe ``(state, key) -> dict`` of the module docstring: ``census``'s arrays
    (the critic's value from its target parameters) and, for one more update from ``state``
    (common random numbers), the window objective per step (``J / horizon``) and the
    deterministic evaluation return, before and after."""
    # The run's own trainer where its calls hold one update: the same program, traced once.
    one_step = (trainer if settings.updates_per_call == 1 else
                make_trainer(dataclasses.replace(settings, updates_per_call=1)))
    value_function = critic_value_function(settings, raw_env.observation_size)
    discount = settings.resolved_estimator_settings.discount
    horizon = settings.horizon

    estimate = jax.jit(trainer.estimator.estimate)  # traced once for both window objectives

    @jax.jit
    def probe(state, key):
        key_census, key_eval, key_window = jax.random.split(key, 3)

        def value(obs):
            return value_function.apply(state.estimator_state.critic.target_params
                                        if hasattr(state.estimator_state, "critic")
                                        else state.estimator_state.target_params,
                                        normalize(state.obs_stats, obs), None)

        found = census(raw_env, trainer.policy, state.params, state.obs_stats, value, discount,
                       key_census, census_envs, raw_env.default_episode_length)
        after, _ = one_step.run_updates(state)

        def window_objective(s):
            return estimate(s.params, state.obs_stats, state.estimator_state, state.env_state,
                            key_window).metrics["objective"] / horizon

        found |= {"window_before": window_objective(state), "window_after": window_objective(after),
                  "return_before": trainer.evaluate(state, key_eval)["eval/episode_reward"],
                  "return_after": trainer.evaluate(after, key_eval)["eval/episode_reward"]}
        return found

    return probe


def probe_row(found: dict, state, seconds: float, bound_names: tuple[str, ...]) -> dict:
    """One probe's row: the run's progress, the census's shares and means over the episodes
    that fell (None where none fell), the critic's values and the one update's before/after."""
    fell = found["fell"]
    crossed = np.argmin(found["margins"], axis=1)[fell]
    row = {"update": int(state.update), "env_steps": int(state.env_steps),
           "seconds": round(seconds, 1),
           "eval_return": float(found["return_before"]),
           "fall_share": float(fell.mean()),
           "mean_fall_step": float(found["fall_step"][fell].mean()) if fell.any() else None,
           "upright_at_fall": float(found["upright"][fell].mean()) if fell.any() else None,
           "on_back_share_of_falls": float(np.mean(found["upright"][fell] < 0))
           if fell.any() else None,
           "on_back_step_share": float(found["on_back_step_share"]),
           "reward_per_step": float(found["reward_per_step"]),
           "value_alive": float(found["value_alive"]),
           "realised_alive": float(found["realised_alive"])}
    for i, name in enumerate(bound_names):
        row[f"falls_{name}"] = float(np.mean(crossed == i)) if fell.any() else None
    for i, k in enumerate(LOOKBACK):
        row[f"value_{k}_before_fall"] = float(np.nanmean(found["value_before"][:, i])) \
            if fell.any() else None
        row[f"realised_{k}_before_fall"] = float(np.nanmean(found["realised_before"][:, i])) \
            if fell.any() else None
    row |= {k: float(found[k]) for k in ("window_before", "window_after", "return_before",
                                          "return_after")}
    return row


def progress_line(row: dict, bound_names: tuple[str, ...]) -> str:
    """One probe's row as the line printed while the run trains."""
    return (f"update {row['update']:5d}  steps {row['env_steps']:>9,}  eval {row['eval_return']:7.0f}"
            f"  falls {row['fall_share']:.2f} ("
            + ", ".join(f"{name} {row[f'falls_{name}']}" for name in bound_names)
            + f", on back {row['on_back_share_of_falls']}; steps on "
            f"back {row['on_back_step_share']:.2f})"
            f"  V/realised 1 before fall {row['value_1_before_fall']}/"
            f"{row['realised_1_before_fall']}  one update: window "
            f"{row['window_after'] - row['window_before']:+.3f}, return "
            f"{row['return_after'] - row['return_before']:+.0f}")


def table_columns(bound_names: tuple[str, ...]) -> list[str]:
    """The columns of the printed and reported table."""
    return ["update", "env_steps", "eval_return", "fall_share",
            *(f"falls_{name}" for name in bound_names), "on_back_share_of_falls",
            "on_back_step_share",
            "reward_per_step", "value_8_before_fall",
            "realised_8_before_fall", "value_alive", "realised_alive", "window_before",
            "window_after", "return_before", "return_after"]


def main() -> None:
    args = parse_arguments()
    out = common.prepare_output(args.out, args.overwrite)
    if args.probe_every % args.updates_per_call or args.updates % args.probe_every:
        raise SystemExit("error: --probe-every must be a multiple of --updates-per-call and "
                         "divide --updates")

    settings = run_settings(args)
    trainer = make_trainer(settings)
    raw_env = envs.make_raw(args.env, backend=settings.backend)
    probe = make_probe(settings, trainer, raw_env, args.census_envs)
    bound_names = raw_env.health_bound_names()
    rows, state, started = [], trainer.init_run(), time.perf_counter()
    key = jax.random.PRNGKey(args.seed + 1000)
    for call in range(args.updates // args.updates_per_call + 1):
        if call:
            state, metrics = trainer.run_updates(state)
        if call * args.updates_per_call % args.probe_every:
            continue
        found = jax.tree.map(np.asarray, probe(state, jax.random.fold_in(key, call)))
        rows.append(probe_row(found, state, time.perf_counter() - started, bound_names))
        print(progress_line(rows[-1], bound_names), flush=True)

    table = common.format_table(rows, table_columns(bound_names))
    print(table)
    common.write_json(out / "results.json", {
        "settings": settings.to_json(), "bounds": bound_names, "lookback": LOOKBACK,
        "census_envs": args.census_envs, "rows": rows})
    (out / "report.md").write_text(f"# Falls during training: {args.env}, {args.learner}\n\n"
                                   f"{__doc__}\n\n{table}\n")


if __name__ == "__main__":
    main()
