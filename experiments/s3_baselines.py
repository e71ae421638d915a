"""Finding S3: REINFORCE baselines ordered by variance, and which of them are unbiased.

Claim under test: variance(none) > variance(batch_mean) > variance(learned value) >= variance(optimal),
all unbiased except ``batch_mean``, whose estimate is scaled by exactly ``1 - 1/n`` (the batch mean
contains the sample's own return); ``leave_one_out`` is its unbiased version (RLOO).

Design (one policy, fixed start states, only the action noise random):

* LQR (``diffpg.envs.make("lqr")``, linear-Gaussian policy): the reference is the exact gradient of the
  closed-form ``J_T`` (``diffpg.compare.exact_gradient``), so a bias is measured against truth.
* Pendulum swing-up (``diffpg.envs.make("pendulum")``, tanh-squashed MLP policy): no closed form; the
  reference is the mean of many BPTT estimates (pathwise, unbiased on these smooth dynamics, and an
  estimator different from every one tested), with its standard error folded into ``bias_noise``.
* For each baseline, ``K`` independent estimates of ``B`` rollouts (``common.sample_gradients``; the
  learned value baselines are first fitted for ``--value-warmup`` estimates on the fixed policy and
  then held at that fit while sampling), then ``diffpg.stats.gradient_statistics``.
* The learned value baseline ``value`` is the library's MLP ``V(obs, steps_left / T)``: its
  target, the return to the end of the window, depends on the time left.
* ``scale = <mean, ref> / |ref|^2`` (with its standard error) tests the ``1 - 1/n`` factor directly;
  a sweep over ``n`` on the LQR checks it for batch_mean and leave_one_out.

Usage::

    python experiments/s3_baselines.py [--out runs/s3_baselines] [--quick]
"""

from __future__ import annotations

import time

import jax
import matplotlib
import numpy as np
from common import format_table, parser, prepare_output, sample_gradients, write_json
from jax.flatten_util import ravel_pytree

from diffpg import envs, estimators
from diffpg.compare import exact_gradient
from diffpg.normalization import init_statistics
from diffpg.policy import make_gaussian_mlp_policy, make_linear_gaussian_policy
from diffpg.stats import bootstrap_interval, gradient_statistics, reference_from_samples, variance_trace

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "s3_baselines"
BASELINE_ROWS = ("none", "batch_mean", "leave_one_out", "value", "optimal")
COLUMNS = ["env", "baseline", "variance_trace", "var_vs_none", "var_ci_low", "var_ci_high",
           "snr", "relative_bias", "bias_noise_rel", "bias_resolved", "scale", "scale_se",
           "expected_scale", "cosine_to_reference"]


def build_estimator(env, policy, baseline: str, horizon: int, discount: float):
    """REINFORCE with reward-to-go and ``baseline``."""
    return estimators.make("reinforce", env, policy, horizon=horizon, discount=discount,
                           baseline=baseline)


def scale_factor(samples: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``<mean, ref> / |ref|^2`` and its standard error (1 for an unbiased estimator)."""
    samples = np.asarray(samples, np.float64)
    projections = samples @ reference / float(reference @ reference)
    return float(projections.mean()), float(projections.std(ddof=1) / np.sqrt(len(projections)))


def chunk_size(baseline: str, horizon: int, num_states: int, num_params: int) -> int:
    """Estimates per vmapped chunk, keeping the batched intermediates near 0.5 GB."""
    per_sample = num_params if baseline == "optimal" else 8
    if baseline.startswith("value"):
        per_sample += 4 * 64
    return max(1, int(5e8 / (12 * horizon * num_states * per_sample)))


def value_fit_quality(estimator, params, start_states, key, warmup) -> dict:
    """The value loss after the same warm-up ``sample_gradients`` runs (same keys), and the variance
    of the targets it regresses, so the fit can be judged (fraction of variance explained)."""
    key_init, key_warm, key_samples = jax.random.split(key, 3)
    state = estimator.init(key_init, params)
    stats = init_statistics(start_states.obs.shape[-1])

    def warm_step(state, step_key):
        key_estimate, key_update = jax.random.split(step_key)
        batch = estimator.estimate(params, stats, state, start_states, key_estimate).batch
        return estimator.update(params, stats, state, batch, key_update)[0], None

    state, _ = jax.jit(lambda s, k: jax.lax.scan(warm_step, s, jax.random.split(k, warmup)))(
        state, key_warm)
    key_estimate, key_update = jax.random.split(key_samples)
    batch = jax.jit(estimator.estimate)(params, stats, state, start_states, key_estimate).batch
    metrics = jax.jit(estimator.update)(params, stats, state, batch, key_update)[1]
    return {"value_loss_after_warmup": float(metrics["value_loss"])}


def run_env(env_name: str, args, key) -> tuple[list[dict], dict]:
    horizon, num_states = args.horizon, args.num_states
    if env_name == "lqr":
        env = envs.make("lqr")
        policy = make_linear_gaussian_policy(env.observation_size, env.action_size,
                                             init_gain_scale=0.5)
        num_estimates = args.estimates
    else:
        env = envs.make(env_name)
        policy = make_gaussian_mlp_policy(env.observation_size, env.action_size,
                                          hidden_sizes=(32, 32))
        horizon = args.pendulum_horizon
        num_estimates = args.pendulum_estimates
    key_params, key_states, key_ref, key_run = jax.random.split(key, 4)
    params = policy.init(key_params)
    start_states = jax.vmap(env.reset)(jax.random.split(key_states, num_states))

    started = time.perf_counter()
    if env_name == "lqr":
        reference = np.asarray(ravel_pytree(exact_gradient(
            env, params, start_states, horizon, args.discount))[0], np.float64)
        reference_se = np.zeros_like(reference)
        reference_kind = "exact (closed form)"
    else:
        bptt = estimators.make("bptt", env, policy, horizon=horizon, discount=args.discount)
        ref_samples, _ = sample_gradients(bptt, params, start_states, key_ref,
                                          args.reference_estimates, 0)
        reference, reference_se = reference_from_samples(ref_samples)
        reference_kind = f"mean of {args.reference_estimates} BPTT estimates"
    reference_norm = float(np.linalg.norm(reference))
    meta = {"env": env_name, "horizon": horizon, "num_states": num_states,
            "num_estimates": num_estimates, "discount": args.discount,
            "num_params": int(reference.size), "reference": reference_kind,
            "reference_norm": reference_norm,
            "reference_relative_se": float(np.linalg.norm(reference_se) / reference_norm),
            "reference_seconds": time.perf_counter() - started}

    rows = []
    for index, baseline in enumerate(BASELINE_ROWS):
        started = time.perf_counter()
        estimator = build_estimator(env, policy, baseline, horizon, args.discount)
        warmup = args.value_warmup if baseline.startswith("value") else 0
        key_b = jax.random.fold_in(key_run, index)
        chunk = chunk_size(baseline, horizon, num_states, reference.size)
        samples, timing = sample_gradients(estimator, params, start_states, key_b,
                                                   num_estimates, warmup, chunk)
        stats = gradient_statistics(samples, reference, reference_se)
        low, high = bootstrap_interval(samples, variance_trace)
        scale, scale_se = scale_factor(samples, reference)
        expected = 1.0 - 1.0 / num_states if baseline == "batch_mean" else 1.0
        row = {"env": env_name, "baseline": baseline, **stats,
               "var_ci_low": low, "var_ci_high": high,
               "bias_noise_rel": stats["bias_noise"] / reference_norm,
               "scale": scale, "scale_se": scale_se, "expected_scale": expected,
               "scale_z_vs_expected": (scale - expected) / max(scale_se, 1e-30),
               "warmup": warmup, "chunk": min(chunk, num_estimates), **timing,
               "seconds": time.perf_counter() - started}
        if baseline == "batch_mean":  # unbiased for (1 - 1/n) grad J?
            scaled = gradient_statistics(samples, expected * reference, expected * reference_se)
            row["bias_vs_scaled_reference"] = scaled["bias"]
            row["bias_vs_scaled_resolved"] = scaled["bias_resolved"]
        if warmup:
            row |= value_fit_quality(estimator, params, start_states, key_b, warmup)
        rows.append(row)
        print(f"  {env_name} {baseline}: {row['seconds']:.1f}s", flush=True)
    none_variance = rows[0]["variance_trace"]
    for row in rows:
        row["var_vs_none"] = row["variance_trace"] / none_variance
    return rows, meta


def batch_size_sweep(args, key) -> list[dict]:
    """LQR: the mean estimate's scale factor against n for batch_mean and leave_one_out."""
    env = envs.make("lqr")
    policy = make_linear_gaussian_policy(env.observation_size, env.action_size, init_gain_scale=0.5)
    key_params, key_states, key_run = jax.random.split(key, 3)
    params = policy.init(key_params)
    all_states = jax.vmap(env.reset)(jax.random.split(key_states, max(args.sweep_sizes)))
    rows = []
    for n in args.sweep_sizes:
        states = jax.tree.map(lambda x, n=n: x[:n], all_states)
        reference = np.asarray(ravel_pytree(exact_gradient(
            env, params, states, args.horizon, args.discount))[0], np.float64)
        for index, baseline in enumerate(("batch_mean", "leave_one_out")):
            estimator = estimators.make("reinforce", env, policy, horizon=args.horizon,
                                        discount=args.discount, baseline=baseline)
            samples, _ = sample_gradients(estimator, params, states,
                                          jax.random.fold_in(key_run, 10 * n + index),
                                          args.sweep_estimates, 0)
            scale, scale_se = scale_factor(samples, reference)
            expected = 1.0 - 1.0 / n if baseline == "batch_mean" else 1.0
            rows.append({"n": n, "baseline": baseline, "scale": scale, "scale_se": scale_se,
                         "expected_scale": expected,
                         "z_vs_expected": (scale - expected) / scale_se,
                         "z_vs_one": (scale - 1.0) / scale_se})
    return rows


def ordering_checks(rows: list[dict]) -> list[dict]:
    """Pairwise variance comparisons of the claimed ordering, with 90% bootstrap intervals."""
    by_name = {row["baseline"]: row for row in rows}
    claims = [("none", ">", "batch_mean"), ("batch_mean", ">", "value"),
              ("value", ">=", "optimal"), ("none", ">", "leave_one_out")]
    checks = []
    for left, relation, right in claims:
        a, b = by_name[left], by_name[right]
        ratio = a["variance_trace"] / b["variance_trace"]
        separated = a["var_ci_low"] > b["var_ci_high"]
        reversed_ = a["var_ci_high"] < b["var_ci_low"]
        verdict = "holds" if separated else ("reversed" if reversed_ else "not resolved")
        if relation == ">=" and not reversed_:
            verdict = "holds" if separated or ratio >= 1 else "holds (within noise)"
        checks.append({"env": rows[0]["env"], "claim": f"Var[{left}] {relation} Var[{right}]",
                       "ratio": ratio, "verdict": verdict})
    return checks


def plot(path, env_rows: dict[str, list[dict]], sweep: list[dict]) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    names = list(BASELINE_ROWS)
    x = np.arange(len(names))
    width = 0.8 / max(len(env_rows), 1)
    for offset, (env_name, rows) in enumerate(env_rows.items()):
        shift = (offset - (len(env_rows) - 1) / 2) * width
        ratio = np.array([r["var_vs_none"] for r in rows])
        none_var = rows[0]["variance_trace"]
        err = np.array([[r["variance_trace"] - r["var_ci_low"], r["var_ci_high"] - r["variance_trace"]]
                        for r in rows]).T / none_var
        axes[0].bar(x + shift, ratio, width, yerr=err, capsize=3, label=env_name)
        rel = np.array([r["relative_bias"] for r in rows])
        noise = np.array([2 * r["bias_noise_rel"] for r in rows])
        axes[1].bar(x + shift, rel, width, label=f"{env_name}: |mean - ref| / |ref|")
        axes[1].scatter(x + shift, noise, marker="_", s=200, color="black", zorder=3,
                        label="2 x noise level (bias below it: not resolved)" if offset == 0 else None)
        batch_mean = next(r for r in rows if r["baseline"] == "batch_mean")
        axes[1].scatter([names.index("batch_mean") + shift], [1 - batch_mean["expected_scale"]],
                        marker="*",
                        s=120, color="red", zorder=4,
                        label="predicted batch_mean bias 1/n" if offset == 0 else None)
    axes[0].set_yscale("log")
    axes[0].set_xticks(x, names, rotation=20)
    axes[0].set_ylabel("variance trace / variance trace of 'none'")
    axes[0].set_xlabel("baseline")
    axes[0].set_title("Variance of one estimate (90% bootstrap CI)")
    axes[0].legend()
    axes[1].set_yscale("log")
    axes[1].set_xticks(x, names, rotation=20)
    axes[1].set_ylabel("relative bias |mean - ref| / |ref|")
    axes[1].set_xlabel("baseline")
    axes[1].set_title("Bias against the reference gradient")
    axes[1].legend(fontsize=8)
    for baseline, marker in (("batch_mean", "o"), ("leave_one_out", "s")):
        pts = [r for r in sweep if r["baseline"] == baseline]
        axes[2].errorbar([r["n"] for r in pts], [r["scale"] for r in pts],
                         yerr=[2 * r["scale_se"] for r in pts], marker=marker, capsize=3,
                         linestyle="none", label=f"{baseline} (measured, 2 SE)")
    grid = np.linspace(min(r["n"] for r in sweep), max(r["n"] for r in sweep), 100)
    axes[2].plot(grid, 1 - 1 / grid, color="red", label="1 - 1/n (batch_mean prediction)")
    axes[2].axhline(1.0, color="gray", linestyle="--", label="1 (unbiased)")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("rollouts per batch n (LQR)")
    axes[2].set_ylabel("scale = <mean estimate, exact> / |exact|^2")
    axes[2].set_title("batch_mean shrinks the gradient by 1 - 1/n")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_arguments():
    """The command line (``--quick``: small sizes, for a smoke test); ``sweep_sizes`` as a tuple
    of ints."""
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--envs", default="lqr,pendulum", help="comma-separated: lqr and/or pendulum")
    p.add_argument("--horizon", type=int, default=16, help="LQR horizon T (and the sweep's)")
    p.add_argument("--pendulum-horizon", type=int, default=32)
    p.add_argument("--discount", type=float, default=0.99)
    p.add_argument("--num-states", type=int, default=16, help="rollouts per estimate n = B")
    p.add_argument("--estimates", type=int, default=40000, help="K estimates per baseline (LQR)")
    p.add_argument("--pendulum-estimates", type=int, default=2000)
    p.add_argument("--reference-estimates", type=int, default=4000, help="BPTT reference (pendulum)")
    p.add_argument("--value-warmup", type=int, default=300)
    p.add_argument("--sweep-sizes", default="2,4,8")
    p.add_argument("--sweep-estimates", type=int, default=20000)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = p.parse_args()
    args.sweep_sizes = tuple(int(s) for s in args.sweep_sizes.split(","))
    if args.quick:
        args.estimates = args.pendulum_estimates = args.reference_estimates = 200
        args.sweep_estimates, args.value_warmup = 200, 20
    return args


def result_tables(all_rows: list[dict], checks: list[dict], sweep: list[dict],
                  metas: list[dict]) -> dict[str, str]:
    """The markdown tables of the report: ``rows`` (every env and baseline), ``checks`` (the
    claimed ordering), ``sweep`` (batch_mean's factor against n), ``value`` (the learned value
    baselines' fit) and ``setups``."""
    value_rows = [r for r in all_rows if "value_loss_after_warmup" in r]
    return {
        "rows": format_table(all_rows, COLUMNS),
        "checks": format_table(checks, ["env", "claim", "ratio", "verdict"]),
        "sweep": format_table(sweep, ["n", "baseline", "scale", "scale_se", "expected_scale",
                                      "z_vs_expected", "z_vs_one"]),
        "value": format_table(value_rows, ["env", "baseline", "warmup", "value_loss_after_warmup"]),
        "setups": format_table(metas, ["env", "horizon", "num_states", "num_estimates",
                                       "num_params", "reference", "reference_norm",
                                       "reference_relative_se"]),
    }


def report_text(args, tables: dict[str, str], seconds: float) -> str:
    """``report.md``: the claim, the setups, what the columns mean and ``result_tables``."""
    return f"""# S3: baselines, variance and bias

Claim: Var[none] > Var[batch_mean] > Var[learned value] >= Var[optimal]; all unbiased except
batch_mean, whose expectation is exactly (1 - 1/n) grad J (n = rollouts in the batch: the batch
mean contains the sample's own return); leave_one_out (RLOO) is the unbiased version.

Setups (fixed policy and start states; only the action noise is random between estimates):

{tables["setups"]}

Every estimate is REINFORCE with reward-to-go over n = {args.num_states} rollouts. `value` is the
library's learned value baseline (MLP of the observation and the steps left), fitted for
{args.value_warmup} estimates on the fixed policy
first and frozen while sampling. `optimal` is the library's per-coordinate, per-time-step constant
baseline (leave-one-out estimate). Columns: `variance_trace` (trace of the covariance of one
estimate) with a 90% bootstrap interval, `var_vs_none` (ratio to no baseline), `snr`
(|mean| / sqrt(variance_trace)), `relative_bias` (|mean - ref| / |ref|), `bias_noise_rel` (the
relative bias that sampling noise alone gives; a bias is resolved above twice it), `scale`
(<mean, ref>/|ref|^2 +- scale_se; `expected_scale` is 1 - 1/n for batch_mean, else 1).

{tables["rows"]}

Claimed ordering, pair by pair (verdict from non-overlapping 90% bootstrap intervals):

{tables["checks"]}

batch_mean's factor against n (LQR, exact reference, {args.sweep_estimates} estimates each):

{tables["sweep"]}

Value fit after warm-up (mean squared error of the value regression on a fresh batch):

{tables["value"]}

Plot: `baselines.png`. Total time {seconds:.0f} s.
"""


def main() -> None:
    args = parse_arguments()
    out = prepare_output(args.out, args.overwrite)
    started = time.perf_counter()
    key = jax.random.PRNGKey(args.seed)

    env_rows, metas, checks = {}, [], []
    for index, env_name in enumerate(args.envs.split(",")):
        print(f"{env_name}: ...", flush=True)
        rows, meta = run_env(env_name, args, jax.random.fold_in(key, index))
        env_rows[env_name], metas = rows, metas + [meta]
        checks += ordering_checks(rows)
    print("batch-size sweep ...", flush=True)
    sweep = batch_size_sweep(args, jax.random.fold_in(key, 100))
    plot(out / "baselines.png", env_rows, sweep)

    all_rows = [row for rows in env_rows.values() for row in rows]
    tables = result_tables(all_rows, checks, sweep, metas)
    seconds = time.perf_counter() - started
    print(tables["rows"], "\n\n" + tables["checks"] + "\n\n" + tables["sweep"])
    write_json(out / "results.json", {
        "finding": "S3", "settings": {k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
        "setups": metas, "rows": all_rows, "ordering_checks": checks, "batch_size_sweep": sweep,
        "seconds": seconds})
    (out / "report.md").write_text(report_text(args, tables, seconds))
    print(f"wrote {out} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
