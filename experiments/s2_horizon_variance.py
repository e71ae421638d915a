"""Finding S2: BPTT's gradient variance grows exponentially with the horizon on an unstable system,
while SHAC's stays bounded by its window.

Setting: the analytic ``pendulum`` (200-step episodes, no reset inside the horizons used), an MLP
Gaussian policy (32, 32) at its initialisation, and start states near the *upright* unstable
equilibrium (``theta_0 ~ U(-0.1, 0.1)``, ``omega_0 = 0``): the pendulum falls and then swings at
about the separatrix energy, passing close to the saddle again and again, so nearby trajectories
separate fast (the most "chaotic" start the analytic envs offer; from the default hanging start
the closed loop is nearly linear and stable). For every horizon ``T`` in 1, 2, 4, ..., 128 every
estimator targets the same finite-horizon objective ``J_T = E[(1/B) sum_b sum_{t<T} gamma^t r_t]``
(settings from ``diffpg.estimators.comparison_settings``: SHAC with ``finite_horizon=True`` and a
window of ``--window`` steps bootstrapped by its critic, warmed up for ``--warmup`` estimates on
the fixed policy):

* ``bptt``: backprop through all ``T`` steps;
* ``shac``: backprop through windows of ``--window`` steps (for ``T <= window`` SHAC is one window
  without a bootstrap, i.e. exactly BPTT: that row reuses BPTT's samples);
* ``reinforce`` (reward-to-go, leave-one-out baseline): unbiased reference, ``--reference-estimates``
  estimates, whose mean and standard error are the reference for the others' bias.

Statistics from ``diffpg.stats.gradient_statistics``. BPTT's growth is summarised by a
least-squares fit of ``log variance_trace`` against ``T`` (rate per step, exponential model) and
against ``log T`` (power-law model), each with its R^2. A diagnostic of the dynamics themselves:
the median over starts of ``log ||d x_t / d x_0||`` (closed loop, policy noise fixed), the
finite-time growth of perturbations that BPTT multiplies through.

With ``--env double_pendulum`` (chaotic: a sustained positive Lyapunov exponent) the starts are
the env's own (both rods released horizontal, ``diffpg.dynamics``), the episode is as long as the
longest horizon, and the report adds the measured largest Lyapunov exponent: of the unforced
pendulum (``diffpg.dynamics.largest_lyapunov_exponent`` over the longest horizon, median over
the starts) and of the closed loop (the slope of the median ``log ||d x_T / d x_0||`` against
``T``), beside BPTT's and SHAC's log-variance slopes. ``--split`` sets where the early and late
fits meet.

Run: ``python experiments/s2_horizon_variance.py [--env double_pendulum --max-horizon 512]
[--out DIR] [--overwrite]``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from common import format_table, parser, prepare_output, sample_gradients, write_json
from jax.flatten_util import ravel_pytree

from diffpg import envs, estimators
from diffpg.compare import CompareSettings
from diffpg.dynamics import env_step_function, largest_lyapunov_exponent
from diffpg.normalization import init_statistics
from diffpg.policy import make_gaussian_mlp_policy
from diffpg.stats import bootstrap_interval, gradient_statistics, reference_from_samples, variance_trace

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "s2_horizon_variance"
ENVS = ("pendulum", "double_pendulum")


def upright_starts(env, key, num):
    """``num`` start states of the wrapped pendulum near the upright equilibrium (``omega = 0``)."""
    states = jax.vmap(env.reset)(jax.random.split(key, num))
    theta = jax.random.uniform(jax.random.fold_in(key, 1), (num,), minval=-0.1, maxval=0.1)
    x = jnp.stack([theta, jnp.zeros(num)], axis=1).astype(states.pipeline_state.dtype)
    obs = jax.vmap(lambda s: env.unwrapped.init_state(s).obs)(x)
    info = states.info | {"first_pipeline_state": x, "first_obs": obs, "terminal_obs": obs}
    return states.replace(pipeline_state=x, obs=obs, info=info)


def state_jacobian_growth(env, policy, params, start_states, key, steps):
    """``log ||d x_t / d x_0||_2`` for t = 1..steps per start state ``[B, steps]`` (fixed noise)."""

    def trajectory(x0, noise_key):
        def run(x_start):
            base = env.unwrapped.init_state(x_start)

            def step(carry, k):
                x, state = carry
                mean, std = policy.distribution(params, state.obs)
                raw = mean + std * jax.random.normal(k, mean.shape, mean.dtype)
                nxt = env.unwrapped.step(state, policy.to_action(raw))
                return (nxt.pipeline_state, nxt), nxt.pipeline_state

            _, xs = jax.lax.scan(step, (x_start, base), jax.random.split(noise_key, steps))
            return xs

        jac = jax.jacfwd(run)(x0)  # [steps, n, n]
        return jnp.log(jnp.linalg.norm(jac, ord=2, axis=(1, 2)))

    keys = jax.random.split(key, start_states.pipeline_state.shape[0])
    return np.asarray(jax.jit(jax.vmap(trajectory))(start_states.pipeline_state, keys))


def shac_samples_and_critic(estimator, params, start_states, key, num_estimates, warmup):
    """``sample_gradients`` for SHAC plus the critic loss during its warm-up (same keys)."""
    key_init, key_warm, _ = jax.random.split(key, 3)
    state = estimator.init(key_init, params)
    stats = init_statistics(start_states.obs.shape[-1])

    def warm_step(state, step_key):
        key_estimate, key_update = jax.random.split(step_key)
        out = estimator.estimate(params, stats, state, start_states, key_estimate)
        state, learned = estimator.update(params, stats, state, out.batch, key_update)
        return state, (learned["critic_loss"], out.metrics["objective"])

    _, (losses, objectives) = jax.jit(lambda s, k: jax.lax.scan(warm_step, s, jax.random.split(k, warmup)))(
        state, key_warm)
    samples, timing = sample_gradients(estimator, params, start_states, key, num_estimates, warmup)
    return samples, timing, np.asarray(losses), float(np.mean(np.asarray(objectives)))


def fit_line(x, y):
    """Least squares ``y = a + b x``: returns (b, a, R^2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    residual = y - (a + b * x)
    r2 = 1.0 - residual.var() / max(y.var(), 1e-300)
    return float(b), float(a), float(r2)


class Setup(NamedTuple):
    """What every horizon shares: the env, the policy at its initialisation, the start states
    ``[B]``, the comparison's settings (objective and sizes), the horizons and the keys."""

    env: object
    policy: object
    params: dict
    start_states: object
    compare: CompareSettings
    horizons: list[int]
    upright: bool
    key_run: jax.Array
    key_lyapunov: jax.Array


def parse_arguments():
    """The command line: the env, the longest horizon, SHAC's window and the sizes."""
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--max-horizon", type=int, default=128)
    p.add_argument("--window", type=int, default=8, help="SHAC's backprop window")
    p.add_argument("--num-envs", type=int, default=16, help="start states per estimate (B)")
    p.add_argument("--num-estimates", type=int, default=128, help="K estimates of bptt and shac")
    p.add_argument("--reference-estimates", type=int, default=512, help="K of reinforce")
    p.add_argument("--warmup", type=int, default=200, help="SHAC critic warm-up estimates")
    p.add_argument("--discount", type=float, default=0.99)
    p.add_argument("--init-log-std", type=float, default=-1.0)
    p.add_argument("--env", choices=ENVS, default="pendulum")
    p.add_argument("--split", type=int, default=32,
                   help="horizon where the early and late exponential fits of BPTT meet")
    return p.parse_args()


def make_setup(args) -> Setup:
    """The env (the pendulum from upright starts; the double pendulum from its own resets, its
    episode as long as the longest horizon), the MLP policy and the horizons 1, 2, 4, ... up to
    ``--max-horizon``."""
    upright = args.env == "pendulum"
    horizons = [2**i for i in range(20) if 2**i <= args.max_horizon]
    episode_length = None if upright else max(horizons)
    env = envs.make(args.env, episode_length=episode_length)
    compare = CompareSettings(env=args.env, horizon=max(horizons), discount=args.discount,
                              episode_length=episode_length, num_envs=args.num_envs,
                              num_estimates=args.num_estimates, critic_warmup=args.warmup,
                              reference_estimates=args.reference_estimates, seed=args.seed)
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size,
                                      hidden_sizes=compare.hidden_sizes,
                                      init_log_std=args.init_log_std)
    key = jax.random.PRNGKey(args.seed)
    key_params, key_states, key_run, key_lyapunov = jax.random.split(key, 4)
    params = policy.init(key_params)
    start_states = (upright_starts(env, key_states, args.num_envs) if upright else
                    jax.vmap(env.reset)(jax.random.split(key_states, args.num_envs)))
    return Setup(env, policy, params, start_states, compare, horizons, upright, key_run,
                 key_lyapunov)


def dynamics_growth(setup: Setup) -> tuple[np.ndarray, dict]:
    """The median over starts of ``log ||d x_t / d x_0||`` for t = 1..max horizon ``[T_max]``,
    and the largest Lyapunov exponents: of the unforced env (per second and per step, median
    and range over the starts) and of the closed loop (the slope of that median against t,
    with its fit's R^2)."""
    env, longest = setup.env, max(setup.horizons)
    log_jac = state_jacobian_growth(env, setup.policy, setup.params, setup.start_states,
                                    setup.key_lyapunov, longest)
    jac_median = np.median(log_jac, axis=0)
    dt = env.unwrapped.dt
    unforced = np.asarray(jax.jit(jax.vmap(lambda x0: largest_lyapunov_exponent(
        env_step_function(env.unwrapped), x0, jnp.zeros((longest, env.action_size)),
        dt)))(setup.start_states.pipeline_state))
    closed_loop_rate, _, closed_loop_r2 = fit_line(np.arange(1, longest + 1), jac_median)
    lyapunov = {"unforced_per_second_median": float(np.median(unforced)),
                "unforced_per_second_range": [float(unforced.min()), float(unforced.max())],
                "unforced_per_step_median": float(np.median(unforced) * dt),
                "closed_loop_per_step": closed_loop_rate, "closed_loop_fit_r2": closed_loop_r2}
    return jac_median, lyapunov


def shac_statistics(setup: Setup, args, horizon: int, key, reference, reference_se) -> dict:
    """SHAC's gradient statistics at ``horizon > window`` against the reference, with its
    critic's warm-up loss: first, mean of the last 10, their root over ``|J_T|``, and a
    thinned history."""
    shac_est = estimators.make("shac", setup.env, setup.policy, **estimators.comparison_settings(
        "shac", horizon, setup.compare.discount, window=min(args.window, horizon)))
    shac_samples, timing, losses, objective = shac_samples_and_critic(
        shac_est, setup.params, setup.start_states, key, args.num_estimates, args.warmup)
    statistics = gradient_statistics(shac_samples, reference, reference_se) | timing
    statistics["variance_trace_interval"] = bootstrap_interval(shac_samples, variance_trace)
    return statistics | {"same_as_bptt": False,
                         "critic_loss_first": float(losses[0]),
                         "critic_loss_last": float(np.mean(losses[-10:])),
                         "objective_mean": objective,
                         "critic_rmse_over_abs_objective": float(
                             np.sqrt(np.mean(losses[-10:])) / max(abs(objective), 1e-12)),
                         "critic_loss_history": losses[:: max(1, len(losses) // 50)]}


def measure_horizon(setup: Setup, args, horizon: int, jac_median: np.ndarray) -> dict:
    """Every estimator at one horizon ``T``: REINFORCE's ``--reference-estimates`` estimates
    (their mean and standard error are the reference), then BPTT's and SHAC's
    ``--num-estimates`` against it (SHAC at ``T <= window`` is BPTT: its samples reused).
    Returns the horizon's entry of ``results.json``."""
    key_h = jax.random.fold_in(setup.key_run, horizon)
    env, policy, params, starts = setup.env, setup.policy, setup.params, setup.start_states
    entry = {"horizon": horizon, "log_state_jacobian_median": float(jac_median[horizon - 1])}
    ref_est = estimators.make("reinforce", env, policy, **estimators.comparison_settings(
        "reinforce", horizon, setup.compare.discount))
    ref_samples, ref_timing = sample_gradients(ref_est, params, starts,
                                               jax.random.fold_in(key_h, 0),
                                               args.reference_estimates, 0)
    reference, reference_se = reference_from_samples(ref_samples)
    per = {"reinforce": gradient_statistics(ref_samples) | ref_timing}
    per["reinforce"]["variance_trace_interval"] = bootstrap_interval(ref_samples, variance_trace)

    bptt_est = estimators.make("bptt", env, policy, **estimators.comparison_settings(
        "bptt", horizon, setup.compare.discount))
    bptt_samples, timing = sample_gradients(bptt_est, params, starts,
                                            jax.random.fold_in(key_h, 1),
                                            args.num_estimates, 0)
    per["bptt"] = gradient_statistics(bptt_samples, reference, reference_se) | timing
    per["bptt"]["variance_trace_interval"] = bootstrap_interval(bptt_samples, variance_trace)

    if horizon <= args.window:  # one window, no bootstrap: the estimator is BPTT exactly
        per["shac"] = dict(per["bptt"]) | {"same_as_bptt": True}
    else:
        per["shac"] = shac_statistics(setup, args, horizon, jax.random.fold_in(key_h, 2),
                                      reference, reference_se)
    return entry | {"reference_norm": float(np.linalg.norm(reference)),
                    "reference_se_norm": float(np.linalg.norm(reference_se)),
                    "shac_window": min(args.window, horizon), "estimators": per}


TABLE_COLUMNS = ["T", "log|dx_T/dx_0|", "bptt var", "bptt |g|", "shac var", "shac |g|",
                 "reinforce var", "reinforce |g|", "bptt bias res.", "shac bias res.",
                 "shac critic loss", "critic rmse/|J|"]


def table_row(entry: dict) -> dict:
    """One horizon's row of the table (``TABLE_COLUMNS``)."""
    per = entry["estimators"]
    row = {"T": entry["horizon"], "log|dx_T/dx_0|": entry["log_state_jacobian_median"]}
    for name in ("bptt", "shac", "reinforce"):
        row[f"{name} var"] = per[name]["variance_trace"]
        row[f"{name} |g|"] = per[name]["mean_norm"]
    row["bptt bias res."] = per["bptt"]["bias_resolved"]
    row["shac bias res."] = per["shac"].get("bias_resolved")
    row["shac critic loss"] = per["shac"].get("critic_loss_last", "=bptt")
    row["critic rmse/|J|"] = per["shac"].get("critic_rmse_over_abs_objective", "=bptt")
    return row


def series(results: list[dict], name: str, key: str = "variance_trace") -> np.ndarray:
    """Estimator ``name``'s statistic ``key`` at every horizon ``[len(horizons)]``."""
    return np.array([r["estimators"][name][key] for r in results], float)


def variance_fits(results: list[dict], horizons: list[int], window: int, split: int,
                  jac_median: np.ndarray, lyapunov: dict) -> tuple[dict, tuple[float, float]]:
    """The summary of ``results.json``: least-squares fits of ``log variance_trace`` against
    ``T`` (rate per step) and ``log T`` (power law) for BPTT over all horizons, up to and from
    ``split``, and for SHAC from its window on; BPTT's local rates, the ratio of their variances
    at the longest horizon, the state Jacobian's growth and the Lyapunov exponents. Also the
    early BPTT fit's (rate, intercept), for the plot."""
    log_var_bptt = np.log(series(results, "bptt"))
    rate, _, r2_exp = fit_line(horizons, log_var_bptt)
    power, _, r2_pow = fit_line(np.log(horizons), log_var_bptt)
    local_rates = np.diff(log_var_bptt) / np.diff(horizons)
    early = [i for i, h in enumerate(horizons) if h <= split]
    rate_early, early_intercept, r2_early = fit_line(np.array(horizons)[early], log_var_bptt[early])
    late = [i for i, h in enumerate(horizons) if h >= split]
    rate_late, _, r2_late = fit_line(np.array(horizons)[late], log_var_bptt[late])
    shac_idx = [i for i, h in enumerate(horizons) if h >= window]
    log_var_shac = np.log(series(results, "shac"))
    shac_rate, _, _ = fit_line(np.array(horizons)[shac_idx], log_var_shac[shac_idx])
    shac_power, _, _ = fit_line(np.log(np.array(horizons)[shac_idx]), log_var_shac[shac_idx])
    summary = {
        "bptt_log_variance_rate_per_step": rate, "bptt_exponential_fit_r2": r2_exp,
        "bptt_log_variance_rate_T_le_32": rate_early, "bptt_exponential_fit_r2_T_le_32": r2_early,
        "bptt_log_variance_rate_T_ge_32": rate_late, "bptt_exponential_fit_r2_T_ge_32": r2_late,
        "bptt_power_law_exponent": power, "bptt_power_law_fit_r2": r2_pow,
        "bptt_local_log_variance_rates": local_rates,
        "shac_log_variance_rate_per_step_T_ge_window": shac_rate,
        "shac_power_law_exponent_T_ge_window": shac_power,
        "shac_variance_max_over_min_T_ge_window": float(
            log_var_shac[shac_idx].max() - log_var_shac[shac_idx].min()),
        "bptt_over_shac_variance_at_max_T": float(series(results, "bptt")[-1]
                                                  / series(results, "shac")[-1]),
        "state_jacobian_log_norm_median": jac_median[[h - 1 for h in horizons]],
        "lyapunov": lyapunov,
    }
    return summary, (rate_early, early_intercept)


def fits_text(summary: dict, horizons: list[int], window: int, split: int) -> str:
    """The fits of ``variance_fits`` as the three sentences printed under the table."""
    lyapunov = summary["lyapunov"]
    return (
        f"Largest Lyapunov exponent: unforced {lyapunov['unforced_per_second_median']:.3g}/s "
        f"({lyapunov['unforced_per_step_median']:.3g}/step; range over starts "
        f"{lyapunov['unforced_per_second_range'][0]:.3g} to "
        f"{lyapunov['unforced_per_second_range'][1]:.3g}/s, over {max(horizons)} steps); "
        f"closed loop {lyapunov['closed_loop_per_step']:.3g}/step "
        f"(R^2 {lyapunov['closed_loop_fit_r2']:.3f}).\n"
        f"BPTT log-variance vs T: rate {summary['bptt_log_variance_rate_per_step']:.3g}/step "
        f"over all T (R^2 {summary['bptt_exponential_fit_r2']:.3f}); "
        f"{summary['bptt_log_variance_rate_T_le_32']:.3g}/step for T<={split} "
        f"(R^2 {summary['bptt_exponential_fit_r2_T_le_32']:.3f}); "
        f"{summary['bptt_log_variance_rate_T_ge_32']:.3g}/step "
        f"for T>={split} (R^2 {summary['bptt_exponential_fit_r2_T_ge_32']:.3f}); power law "
        f"exponent {summary['bptt_power_law_exponent']:.3g} "
        f"(R^2 {summary['bptt_power_law_fit_r2']:.3f}).\n"
        f"SHAC (T >= window {window}): log-variance rate "
        f"{summary['shac_log_variance_rate_per_step_T_ge_window']:.3g}/step, power "
        f"{summary['shac_power_law_exponent_T_ge_window']:.3g}; BPTT/SHAC variance at "
        f"T={horizons[-1]}: {summary['bptt_over_shac_variance_at_max_T']:.3g}.")


def plot(path, results: list[dict], horizons: list[int], summary: dict,
         early_fit: tuple[float, float], window: int, split: int) -> None:
    """Two panels against the horizon: each estimator's variance trace (90% bootstrap interval)
    with BPTT's early exponential fit, and each one's mean gradient norm with the reference's
    and the median ``log ||d x_T / d x_0||`` on a second axis."""
    rate_early, early_intercept = early_fit
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    styles = {"bptt": ("C3", "o"), "shac": ("C0", "s"), "reinforce": ("C2", "^")}
    for name, (color, marker) in styles.items():
        values = series(results, name)
        lo_hi = np.array([r["estimators"][name]["variance_trace_interval"] for r in results])
        label = f"shac (window {window})" if name == "shac" else name
        ax.errorbar(horizons, values, yerr=[values - lo_hi[:, 0], lo_hi[:, 1] - values],
                    color=color, marker=marker, capsize=3, label=label)
    early_h = np.array([h for h in horizons if h <= split])
    ax.plot(early_h, np.exp(early_intercept + rate_early * early_h), "k--", lw=1,
            label=f"bptt exp fit T<={split}: {rate_early:.2f}/step "
                  f"(all T: {summary['bptt_log_variance_rate_per_step']:.2f}/step)")
    ax.set(xscale="log", yscale="log", xlabel="horizon T (steps)",
           ylabel="variance trace of one estimate", title="Gradient variance vs horizon")
    ax.set_xscale("log", base=2)
    ax.axvline(window, color="C0", ls=":", lw=1)
    ax.legend(fontsize=8)
    ax = axes[1]
    for name, (color, marker) in styles.items():
        ax.plot(horizons, series(results, name, "mean_norm"), color=color, marker=marker,
                label=name)
    ax.plot(horizons, [r["reference_norm"] for r in results], "k:", label="|reference| (reinforce)")
    ax.set(yscale="log", xlabel="horizon T (steps)", ylabel="mean gradient norm",
           title="Gradient norm vs horizon")
    ax.set_xscale("log", base=2)
    twin = ax.twinx()
    twin.plot(horizons, summary["state_jacobian_log_norm_median"], color="grey", ls="-.",
              label="median log|dx_T/dx_0|")
    twin.set_ylabel("median log ||dx_T / dx_0|| (closed loop)")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report_text(args, upright: bool, table: str, fits: str, seconds: float) -> str:
    """``report.md``: the table, the fits and what the columns mean."""
    return (
        f"# S2: gradient variance vs horizon ({args.env}, "
        f"{'upright start' if upright else 'released horizontal'})\n\n"
        f"{table}\n\n{fits}\n\n`var` = variance_trace, `|g|` = mean_norm (diffpg.stats); "
        f"bias resolved against the reinforce mean ({args.reference_estimates} estimates); "
        f"shac rows with T <= {args.window} are BPTT (one window, no bootstrap). "
        f"`log|dx_T/dx_0|`: median log spectral norm of the closed-loop state Jacobian; "
        f"`shac critic loss`: mean TD(lambda) regression loss over the last 10 warm-up "
        f"estimates, `critic rmse/|J|` its square root over the mean objective |J_T|.\n\n"
        f"Plot: variance_vs_horizon.png. Run time {seconds:.0f} s.\n")


def main():
    args = parse_arguments()
    out = prepare_output(args.out, args.overwrite)
    started = time.perf_counter()
    setup = make_setup(args)
    horizons = setup.horizons
    jac_median, lyapunov = dynamics_growth(setup)
    rows, results = [], []
    for horizon in horizons:
        results.append(measure_horizon(setup, args, horizon, jac_median))
        rows.append(table_row(results[-1]))
        print(f"T={horizon} done ({time.perf_counter() - started:.0f} s)", flush=True)

    summary, early_fit = variance_fits(results, horizons, args.window, args.split, jac_median,
                                       lyapunov)
    seconds = time.perf_counter() - started
    write_json(out / "results.json", {
        "finding": "S2", "env": args.env, "start": ("upright: theta ~ U(-0.1, 0.1), omega = 0"
                                                     if setup.upright else "the env's reset"),
        "settings": vars(args) | {"out": str(args.out)}, "compare_settings": dataclasses.asdict(
            setup.compare), "num_parameters": int(ravel_pytree(setup.params)[0].shape[0]),
        "horizons": horizons, "results": results, "summary": summary, "seconds": seconds})
    table = format_table(rows, TABLE_COLUMNS)
    fits = fits_text(summary, horizons, args.window, args.split)
    print(table)
    print(fits)
    print(f"total {seconds:.0f} s")
    plot(out / "variance_vs_horizon.png", results, horizons, summary, early_fit, args.window,
         args.split)
    (out / "report.md").write_text(report_text(args, setup.upright, table, fits, seconds))


if __name__ == "__main__":
    main()
