"""Finding S4: at a fixed budget of n*k environment steps, does a policy-gradient estimate behave like
n independent samples (trajectories) or like n*k (steps)?

Setting: the LQR (double integrator, ``Q = I``, ``R = 0.1``) started *at rest at the origin*
(``init_mean = 0``, ``init_std = 0``: every trajectory starts from the same state, so the only
randomness is the policy's action noise and "n trajectories" are n i.i.d. samples), a linear
Gaussian policy with a fixed stabilising gain ``K = [[-1, -1.5]]`` (closed-loop eigenvalues of
modulus 0.925: a correlation time of about 13 steps), bias 0, ``log_std = -1``. The process driven
by the action noise is close to stationary after ~2 correlation times.

The objective must not change with the batch shape for the comparison to be honest, so both designs
use the **per-step average** objective (discount 1)::

    J_k = E[(1/k) sum_{t<k} r_t]        estimate: (estimator's grad of E[(1/n) sum_b sum_t r_t]) / k

* design (a), fixed horizon ``k = --fixed-k``, ``n`` = 2, 4, ..., 64 trajectories: the objective is
  fixed; trajectories are independent, so the variance should fall as ``1/n`` (slope -1 in log-log);
* design (b), fixed budget ``N = n*k = --budget``, ``k`` = 1, 2, ..., N/2 (``n = N/k`` >= 2 for the
  leave-one-out baseline). If every step were an independent sample, ``Var`` would be flat in ``k``
  (``∝ 1/(nk) = 1/N``); if only trajectories count, ``Var ∝ 1/n = k/N`` (slope +1 in ``k``). The
  fitted slope ``beta`` of ``log Var`` against ``log k`` says where an estimator sits; the effective
  number of independent samples is then ``n_eff ∝ n k^(1 - beta)``. The objective ``J_k`` still
  depends on ``k`` through the start-up transient (the first ~25 steps start from rest), which is why
  the exact gradient of each ``J_k`` (``diffpg.compare.exact_gradient``) is reported too: the
  variance is compared to it via ``Var / |grad J_k|^2`` (relative variance), which removes the
  change of the gradient's scale with ``k``.

Estimators (``diffpg.estimators``): REINFORCE with reward-to-go and a leave-one-out baseline (the
library's default), REINFORCE weighting every score by the *whole* return (``reward_to_go=False``,
leave-one-out baseline: "reinforce all the actions that led to the win", the case where one return
multiplies every score), and BPTT (pathwise). Statistics: ``diffpg.stats.gradient_statistics``
of ``--num-estimates`` independent estimates against the exact gradient.

Run: ``python experiments/s4_batch_shape.py [--out DIR] [--overwrite]``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from common import format_table, parser, prepare_output, sample_gradients, write_json
from jax.flatten_util import ravel_pytree

from diffpg import envs, estimators
from diffpg.compare import exact_gradient
from diffpg.policy import make_linear_gaussian_policy
from diffpg.stats import bootstrap_interval, gradient_statistics, variance_trace

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "s4_batch_shape"
GAIN = [[-1.0, -1.5]]
VARIANTS = {
    "reinforce_rtg": ("reinforce", {"reward_to_go": True, "baseline": "leave_one_out"}),
    "reinforce_total": ("reinforce", {"reward_to_go": False, "baseline": "leave_one_out"}),
    "bptt": ("bptt", {}),
}


def measure(env, policy, params, variant, n, k, key, num_estimates):
    """Statistics of ``num_estimates`` per-step-average gradient estimates from n trajectories of k."""
    name, overrides = VARIANTS[variant]
    estimator = estimators.make(name, env, policy, horizon=k, discount=1.0, **overrides)
    start_states = jax.vmap(env.reset)(jax.random.split(jax.random.fold_in(key, 7), n))
    samples, timing = sample_gradients(estimator, params, start_states, key, num_estimates, 0)
    samples = samples / k
    exact = np.asarray(ravel_pytree(exact_gradient(env, params, start_states, k, 1.0))[0],
                       np.float64) / k
    stats = gradient_statistics(samples, exact, np.zeros_like(exact))
    low, high = bootstrap_interval(samples, variance_trace)
    exact_sq = float(exact @ exact)
    return stats | timing | {
        "n": n, "k": k, "budget": n * k, "exact_norm": float(np.sqrt(exact_sq)),
        "variance_trace_interval": (low, high),
        "relative_variance": stats["variance_trace"] / exact_sq,
        "variance_times_n": stats["variance_trace"] * n,
        "variance_times_budget": stats["variance_trace"] * n * k,
    }


def slope(x, y):
    """Least-squares slope of log y against log x (nan with fewer than 2 points)."""
    if len(x) < 2:
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def parse_arguments():
    """The command line: the budget and horizon of the two designs, the sizes."""
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=512, help="N = n*k steps per estimate (design b)")
    p.add_argument("--fixed-k", type=int, default=32, help="horizon of design (a)")
    p.add_argument("--max-n", type=int, default=64, help="largest n of design (a)")
    p.add_argument("--num-estimates", type=int, default=512, help="K independent estimates")
    p.add_argument("--init-log-std", type=float, default=-1.0)
    return p.parse_args()


def make_problem(args, longest: int):
    """The LQR started at rest at the origin (episodes of ``longest`` steps), the linear policy
    with the fixed gain ``GAIN``, and the closed loop's spectral radius ``max |eig(A + B K)|``."""
    env = envs.make("lqr", episode_length=longest, init_mean=[0.0, 0.0], init_std=0.0)
    policy = make_linear_gaussian_policy(env.observation_size, env.action_size,
                                         init_log_std=args.init_log_std)
    params = policy.init(jax.random.PRNGKey(args.seed))
    params = params | {"gain": jnp.asarray(GAIN, jnp.float32)}
    closed_loop = np.asarray(env.unwrapped.A + env.unwrapped.B @ params["gain"])
    spectral_radius = float(np.max(np.abs(np.linalg.eigvals(closed_loop))))
    return env, policy, params, spectral_radius


def run_designs(args, env, policy, params, ns_a: list[int], ks_b: list[int],
                started: float) -> tuple[dict, dict]:
    """Every variant's ``measure`` rows: design (a) at each ``n`` of ``ns_a`` with
    ``k = --fixed-k``, design (b) at each ``k`` of ``ks_b`` with ``n = --budget / k``."""
    key = jax.random.PRNGKey(args.seed)
    design_a, design_b = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    for index, variant in enumerate(VARIANTS):
        for n in ns_a:
            design_a[variant].append(measure(env, policy, params, variant, n, args.fixed_k,
                                             jax.random.fold_in(key, 1000 * index + n),
                                             args.num_estimates))
        for k in ks_b:
            design_b[variant].append(measure(env, policy, params, variant, args.budget // k, k,
                                             jax.random.fold_in(key, 10**6 + 1000 * index + k),
                                             args.num_estimates))
        print(f"{variant} done ({time.perf_counter() - started:.0f} s)", flush=True)
    return design_a, design_b


def summarise(design_a: dict, design_b: dict) -> dict:
    """Per variant the log-log slopes: (a) of the variance against n; (b) ``beta`` of the
    variance against k (over all k, k <= 16 and k >= 32) and of the relative variance; and
    whether any bias was resolved."""
    summary = {}
    for variant in VARIANTS:
        a, b = design_a[variant], design_b[variant]
        summary[variant] = {
            "a_slope_log_var_vs_log_n": slope([r["n"] for r in a], [r["variance_trace"] for r in a]),
            "b_beta_log_var_vs_log_k": slope([r["k"] for r in b], [r["variance_trace"] for r in b]),
            "b_beta_relative_variance": slope([r["k"] for r in b],
                                              [r["relative_variance"] for r in b]),
            "b_beta_k_ge_32": slope([r["k"] for r in b if r["k"] >= 32],
                                    [r["variance_trace"] for r in b if r["k"] >= 32]),
            "b_beta_k_le_16": slope([r["k"] for r in b if r["k"] <= 16],
                                    [r["variance_trace"] for r in b if r["k"] <= 16]),
            "any_bias_resolved": any(r["bias_resolved"] for r in a + b),
        }
    return summary


def tables_text(args, design_a: dict, design_b: dict, summary: dict) -> str:
    """The three markdown tables (design a, design b, the slopes) with their titles."""
    columns_a = ["estimator", "n", "k", "var", "var*n", "rel. var", "bias resolved"]
    rows_a = [{"estimator": v, "n": r["n"], "k": r["k"], "var": r["variance_trace"],
               "var*n": r["variance_times_n"], "rel. var": r["relative_variance"],
               "bias resolved": r["bias_resolved"]} for v in VARIANTS for r in design_a[v]]
    columns_b = ["estimator", "n", "k", "|grad J_k|", "var", "var*n", "var*N", "rel. var",
                 "bias resolved"]
    rows_b = [{"estimator": v, "n": r["n"], "k": r["k"], "|grad J_k|": r["exact_norm"],
               "var": r["variance_trace"], "var*n": r["variance_times_n"],
               "var*N": r["variance_times_budget"], "rel. var": r["relative_variance"],
               "bias resolved": r["bias_resolved"]} for v in VARIANTS for r in design_b[v]]
    columns_s = ["estimator", "(a) slope vs n", "(b) beta", "(b) beta k<=16", "(b) beta k>=32",
                 "(b) beta rel. var", "any bias resolved"]
    rows_s = [{"estimator": v, "(a) slope vs n": s["a_slope_log_var_vs_log_n"],
               "(b) beta": s["b_beta_log_var_vs_log_k"], "(b) beta k<=16": s["b_beta_k_le_16"],
               "(b) beta k>=32": s["b_beta_k_ge_32"],
               "(b) beta rel. var": s["b_beta_relative_variance"],
               "any bias resolved": s["any_bias_resolved"]} for v, s in summary.items()]
    return (f"Design (a): fixed k = {args.fixed_k}, vary n\n\n{format_table(rows_a, columns_a)}\n\n"
            f"Design (b): fixed budget N = n*k = {args.budget}\n\n"
            f"{format_table(rows_b, columns_b)}\n\nSummary (log-log slopes)\n\n"
            f"{format_table(rows_s, columns_s)}")


def plot(path, args, design_a: dict, design_b: dict, summary: dict, ks_b: list[int]) -> None:
    """Two log-log panels: (a) the variance against n with the 1/n line through the first
    point; (b) the relative variance against k with the lines of "steps count" (flat) and
    "trajectories count" (slope 1) through reinforce_rtg's first point."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"reinforce_rtg": "C0", "reinforce_total": "C1", "bptt": "C3"}
    ax = axes[0]
    for v in VARIANTS:
        ns = np.array([r["n"] for r in design_a[v]])
        var = np.array([r["variance_trace"] for r in design_a[v]])
        ci = np.array([r["variance_trace_interval"] for r in design_a[v]])
        ax.errorbar(ns, var, yerr=[var - ci[:, 0], ci[:, 1] - var], color=colors[v], marker="o",
                    capsize=3, label=f"{v} (slope {summary[v]['a_slope_log_var_vs_log_n']:.2f})")
        ax.plot(ns, var[0] * ns[0] / ns, color=colors[v], ls=":", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="n trajectories (k fixed)",
           ylabel="variance trace of one estimate",
           title=f"(a) fixed k = {args.fixed_k}: dotted = 1/n")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    ax = axes[1]
    for v in VARIANTS:
        ks = np.array([r["k"] for r in design_b[v]])
        rel = np.array([r["relative_variance"] for r in design_b[v]])
        ax.plot(ks, rel, color=colors[v], marker="o",
                label=f"{v} (beta {summary[v]['b_beta_relative_variance']:.2f})")
    anchor_k = np.array(ks_b, float)
    ref = np.array([r["relative_variance"] for r in design_b["reinforce_rtg"]])[0]
    ax.plot(anchor_k, np.full_like(anchor_k, ref), "k--", lw=1, label="∝ 1/(nk): steps count")
    ax.plot(anchor_k, ref * anchor_k, "k:", lw=1, label="∝ 1/n: trajectories count")
    ax.set(xscale="log", yscale="log", xlabel=f"k steps per trajectory (n = {args.budget}/k)",
           ylabel="Var / |grad J_k|^2", title=f"(b) fixed budget n*k = {args.budget}")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_arguments()
    out = prepare_output(args.out, args.overwrite)
    started = time.perf_counter()

    ks_b = [2**i for i in range(20) if 2**i <= args.budget // 2]
    ns_a = [2**i for i in range(1, 20) if 2**i <= args.max_n]
    env, policy, params, spectral_radius = make_problem(args, max(max(ks_b), args.fixed_k))
    design_a, design_b = run_designs(args, env, policy, params, ns_a, ks_b, started)
    summary = summarise(design_a, design_b)
    seconds = time.perf_counter() - started
    write_json(out / "results.json", {
        "finding": "S4", "env": "lqr (start at rest at the origin)", "gain": GAIN,
        "closed_loop_spectral_radius": spectral_radius,
        "objective": "per-step average J_k = E[(1/k) sum_{t<k} r_t], discount 1",
        "settings": vars(args) | {"out": str(args.out)}, "design_a_fixed_k": design_a,
        "design_b_fixed_budget": design_b, "summary": summary, "seconds": seconds})

    tables = tables_text(args, design_a, design_b, summary)
    print(tables)
    print(f"total {seconds:.0f} s")
    plot(out / "variance_vs_batch_shape.png", args, design_a, design_b, summary, ks_b)
    (out / "report.md").write_text(
        f"# S4: batch shape at a fixed step budget (LQR from rest, per-step-average objective)\n\n"
        f"Closed-loop spectral radius {spectral_radius:.3f}. `var` = variance_trace of one "
        f"estimate of grad J_k; `rel. var` = var / |grad J_k|^2 (exact LQR gradient); bias "
        f"against the exact gradient.\n\n{tables}\n\nPlot: variance_vs_batch_shape.png. "
        f"Run time {seconds:.0f} s.\n")


if __name__ == "__main__":
    main()
