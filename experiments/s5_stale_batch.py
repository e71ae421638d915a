"""Finding S5: several gradient steps on one batch bias REINFORCE unless the data is importance-weighted.

Claim under test (a common intuition about reusing a batch): the score-function
estimate is unbiased only while the data comes from the policy being differentiated. After steps on
the same batch, the unweighted estimate ``sum_t grad log pi_theta(u_t|s_t) (psi_t - b_t)`` at the new
``theta`` is biased; with per-decision importance weights ``rho_{0:t} = prod pi_theta / pi_theta0``
(``diffpg.estimators.reinforce.score_function_gradient(..., behaviour_log_prob=...)``) it is unbiased, at the
price of a variance that grows as ``theta`` moves away from ``theta_0``.

Design (LQR, linear-Gaussian policy, fixed start states, exact gradient as the reference):

* ``N`` independent batches, each ``B`` rollouts of ``T`` steps with ``theta_0``.
* Step ``k = 0..m``: at ``theta_k`` compute (a) the unweighted and (b) the importance-weighted
  estimate on the stale batch, and the exact ``grad J(theta_k)`` (``diffpg.compare.exact_gradient``); bias
  ``= |mean_batches(estimate - exact)|`` with ``noise = sqrt(sum_p Var_p / N)`` (resolved above
  2 x noise), relative to ``|mean exact|``.
* Three ways of choosing ``theta_1..theta_m``:

  - ``fixed path``: Adam on the *exact* gradient, the same path for every batch. ``theta_k`` does not
    depend on the batch, so the importance-weighted estimate must be unbiased at every step: the
    clean test of the claim.
  - ``IS-driven``: each batch takes its own Adam steps with its own importance-weighted estimate (the
    realistic multi-epoch loop). ``theta_k`` now depends on the batch it is evaluated on, so even
    the weighted estimate need not be unbiased (the data picked the point it is evaluated at).
  - ``naive``: the same loop driven by the unweighted estimate.

* The weighted estimate's variance (trace over the ``N`` batches) and the effective sample size of the
  trajectory weights ``(sum w)^2 / (B sum w^2)`` show the price of the correction; ``top_share``
  (the largest single batch's share of the summed squared deviations) flags steps where the
  heavy-tailed weights leave the mean and its standard error to one or a few batches, so that
  "not resolved" there is no evidence of unbiasedness.

Usage::

    python experiments/s5_stale_batch.py [--out runs/s5_stale_batch] [--quick]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from common import format_table, parser, prepare_output, write_json
from jax.flatten_util import ravel_pytree

from diffpg import envs
from diffpg.acting import unroll
from diffpg.compare import exact_gradient
from diffpg.estimators.reinforce import ReinforceSettings, score_function_gradient
from diffpg.normalization import init_statistics
from diffpg.policy import make_linear_gaussian_policy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "s5_stale_batch"
MODES = ("fixed_path", "is_driven", "naive")
MODE_LABELS = {"fixed_path": "fixed path (Adam on the exact gradient)",
               "is_driven": "IS-driven loop (each batch's own weighted steps)",
               "naive": "naive loop (each batch's own unweighted steps)"}


def make_problem(args):
    env = envs.make("lqr")
    policy = make_linear_gaussian_policy(env.observation_size, env.action_size, init_gain_scale=0.5)
    key = jax.random.PRNGKey(args.seed)
    key_params, key_states, key_batches = jax.random.split(key, 3)
    params0 = policy.init(key_params)
    states = jax.vmap(env.reset)(jax.random.split(key_states, args.num_states))
    return env, policy, params0, states, key_batches


def build(args, env, policy, params0, states):
    """Jitted per-batch functions; every gradient is returned flattened ``[P]``."""
    stats = init_statistics(env.observation_size)
    settings = ReinforceSettings(horizon=args.horizon, discount=args.discount,
                                 baseline=args.baseline, reward_to_go=True)
    optimizer = optax.adam(args.learning_rate)
    _, unravel = ravel_pytree(params0)

    def flat(tree):
        return ravel_pytree(tree)[0]

    def exact(params):
        return flat(exact_gradient(env, params, states, args.horizon, args.discount))

    def collect(key):
        _, data = unroll(env, policy, params0, stats, states, key, args.horizon)
        return data, policy.log_prob(params0, data.obs, data.raw_action)

    def estimates(params, data, behaviour_log_prob):
        unweighted, _ = score_function_gradient(policy, params, stats, data, settings)
        weighted, _ = score_function_gradient(policy, params, stats, data, settings,
                                              behaviour_log_prob=behaviour_log_prob)
        return flat(unweighted), flat(weighted)

    def effective_sample_fraction(params, data, behaviour_log_prob):
        log_w = jnp.sum(policy.log_prob(params, data.obs, data.raw_action) - behaviour_log_prob, 0)
        w = jax.nn.softmax(log_w)
        return 1.0 / (jnp.sum(w * w) * w.shape[0])

    def adam_path(gradient_fn, params, steps):
        """``theta_0..theta_steps`` of Adam ascent on ``gradient_fn`` (flat params)."""
        def step(carry, _):
            flat_params, opt_state = carry
            grad = gradient_fn(flat_params)
            updates, opt_state = optimizer.update(-grad, opt_state, flat_params)
            new = optax.apply_updates(flat_params, updates)
            return (new, opt_state), flat_params

        flat0 = flat(params)
        (last, _), path = jax.lax.scan(step, (flat0, optimizer.init(flat0)), None, length=steps)
        return jnp.concatenate([path, last[None]], 0)  # [steps + 1, P]

    fixed_path = jax.jit(lambda: adam_path(lambda p: exact(unravel(p)), params0, args.steps))()

    def per_batch(key):
        data, blp = collect(key)

        def at(flat_params):
            params = unravel(flat_params)
            unweighted, weighted = estimates(params, data, blp)
            return {"unweighted": unweighted, "weighted": weighted, "exact": exact(params),
                    "ess": effective_sample_fraction(params, data, blp),
                    "distance": jnp.linalg.norm(flat_params - flat(params0))}

        out = {"fixed_path": jax.vmap(at)(fixed_path)}
        for mode, which in (("is_driven", 1), ("naive", 0)):
            path = adam_path(lambda p, which=which: estimates(unravel(p), data, blp)[which],
                             params0, args.steps)
            out[mode] = jax.vmap(at)(path)
        return out

    def all_batches(keys):
        return jax.lax.map(per_batch, keys, batch_size=args.chunk)

    return jax.jit(all_batches), fixed_path


def bias_statistics(estimates: np.ndarray, exact: np.ndarray) -> dict:
    """``estimates, exact [N, P]`` (per batch; ``exact`` may differ between batches)."""
    estimates, exact = np.asarray(estimates, np.float64), np.asarray(exact, np.float64)
    diff = estimates - exact
    num = diff.shape[0]
    bias = float(np.linalg.norm(diff.mean(0)))
    noise = float(np.sqrt(diff.var(0, ddof=1).sum() / num))
    exact_norm = float(np.linalg.norm(exact.mean(0)))
    squared = np.sum(np.square(diff - diff.mean(0)), axis=1)
    return {"top_share": float(squared.max() / squared.sum()), "bias": bias, "bias_noise": noise,
            "bias_resolved": bool(bias > 2 * noise),
            "relative_bias": bias / exact_norm, "relative_noise": noise / exact_norm,
            "variance_trace": float(estimates.var(0, ddof=1).sum())}


def summarise(results: dict, steps: int) -> list[dict]:
    rows = []
    for mode in MODES:
        r = results[mode]
        base_var = {}
        for k in range(steps + 1):
            row = {"mode": mode, "step": k,
                   "distance": float(np.mean(r["distance"][:, k])),
                   "ess_fraction": float(np.mean(r["ess"][:, k])),
                   "exact_norm": float(np.linalg.norm(np.mean(r["exact"][:, k], 0)))}
            for kind in ("unweighted", "weighted"):
                s = bias_statistics(r[kind][:, k], r["exact"][:, k])
                base_var.setdefault(kind, s["variance_trace"])
                row |= {f"{kind}_{name}": value for name, value in s.items()}
                row[f"{kind}_var_growth"] = s["variance_trace"] / base_var[kind]
            rows.append(row)
    return rows


def plot(path, rows: list[dict], num_batches: int) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, mode in zip(axes[:2], ("fixed_path", "is_driven"), strict=True):
        mode_rows = [r for r in rows if r["mode"] == mode]
        steps = np.array([r["step"] for r in mode_rows])
        for kind, color in (("unweighted", "tab:red"), ("weighted", "tab:blue")):
            bias = np.array([r[f"{kind}_relative_bias"] for r in mode_rows])
            noise = np.array([r[f"{kind}_relative_noise"] for r in mode_rows])
            label = "no importance weights" if kind == "unweighted" else "per-decision IS weights"
            ax.plot(steps, bias, marker="o", color=color, label=f"{label}: |mean bias|")
            ax.fill_between(steps, 1e-3, 2 * noise, color=color, alpha=0.15,
                            label=f"{label}: 2 x noise (below: unresolved)")
        if mode == "is_driven":
            naive = [r for r in rows if r["mode"] == "naive"]
            ax.plot(steps, [r["unweighted_relative_bias"] for r in naive], marker="x",
                    linestyle="--", color="tab:orange",
                    label="naive loop (driven by unweighted): unweighted bias")
        ax.set_yscale("log")
        ax.set_ylim(1e-3, None)
        ax.set_xlabel("optimizer steps taken on the same batch (k)")
        ax.set_ylabel("|mean(estimate - exact grad J(theta_k))| / |grad J| (log)")
        ax.set_title(MODE_LABELS[mode], fontsize=10)
        ax.legend(fontsize=7)
    fixed = [r for r in rows if r["mode"] == "fixed_path"]
    steps = [r["step"] for r in fixed]
    axes[2].plot(steps, [r["weighted_var_growth"] for r in fixed], marker="o", color="tab:blue",
                 label="IS-weighted: variance trace / step-0 value")
    axes[2].plot(steps, [r["unweighted_var_growth"] for r in fixed], marker="o", color="tab:red",
                 label="unweighted: variance trace / step-0 value")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("optimizer steps taken on the same batch (k), fixed path")
    axes[2].set_ylabel("variance growth (log)")
    twin = axes[2].twinx()
    twin.plot(steps, [r["ess_fraction"] for r in fixed], marker="s", color="gray", linestyle=":",
              label="effective sample size / B")
    twin.plot(steps, [r["weighted_top_share"] for r in fixed], marker="^", color="black",
              linestyle="--", label="largest batch's share of the IS variance")
    twin.set_ylabel("ESS / B;  top-batch share of variance")
    twin.set_ylim(0, 1.05)
    lines = axes[2].get_legend_handles_labels()
    twin_lines = twin.get_legend_handles_labels()
    axes[2].legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], fontsize=8, loc="center left")
    axes[2].set_title(f"Price of the correction ({num_batches} batches)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--discount", type=float, default=0.99)
    p.add_argument("--num-states", type=int, default=16, help="rollouts per batch B")
    p.add_argument("--batches", type=int, default=32000, help="independent batches N")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps m on each batch")
    p.add_argument("--learning-rate", type=float, default=0.005, help="Adam learning rate")
    p.add_argument("--baseline", default="leave_one_out", help="REINFORCE baseline of both estimates")
    p.add_argument("--chunk", type=int, default=2000, help="batches vmapped at once")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = p.parse_args()
    if args.quick:
        args.batches, args.chunk = 400, 200
    out = prepare_output(args.out, args.overwrite)
    started = time.perf_counter()
    env, policy, params0, states, key_batches = make_problem(args)
    run_batches, fixed_path = build(args, env, policy, params0, states)
    keys = jax.random.split(key_batches, args.batches)
    results = jax.tree.map(np.asarray, jax.block_until_ready(run_batches(keys)))
    run_seconds = time.perf_counter() - started
    rows = summarise(results, args.steps)
    plot(out / "stale_batch.png", rows, args.batches)

    columns = ["step", "distance", "ess_fraction", "exact_norm", "unweighted_relative_bias",
               "unweighted_relative_noise", "unweighted_bias_resolved", "weighted_relative_bias",
               "weighted_relative_noise", "weighted_bias_resolved", "weighted_var_growth",
               "weighted_top_share"]
    tables = {mode: format_table([r for r in rows if r["mode"] == mode], columns) for mode in MODES}
    seconds = time.perf_counter() - started
    for mode in MODES:
        print(f"\n{MODE_LABELS[mode]}\n{tables[mode]}")
    _, unravel = ravel_pytree(params0)
    write_json(out / "results.json", {
        "finding": "S5", "settings": {k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
        "theta_0": jax.tree.map(np.asarray, params0),
        "fixed_path": [jax.tree.map(np.asarray, unravel(t)) for t in fixed_path],
        "rows": rows, "seconds": seconds, "run_seconds": run_seconds})
    sections = "\n\n".join(f"### {MODE_LABELS[mode]}\n\n{tables[mode]}" for mode in MODES)
    (out / "report.md").write_text(f"""# S5: several steps on one batch, with and without importance weights

LQR (horizon T = {args.horizon}, discount {args.discount}), linear-Gaussian policy, B =
{args.num_states} fixed start states, N = {args.batches} independent batches collected with
theta_0, m = {args.steps} Adam steps (learning rate {args.learning_rate}) per batch. Both estimates
are REINFORCE with reward-to-go and the `{args.baseline}` baseline, computed by
`score_function_gradient` on the stale batch: unweighted, and with per-decision importance weights
(`behaviour_log_prob` = log pi_theta_0 of the batch's actions). The reference at every step is the
exact gradient of the closed-form return at theta_k.

Columns: `distance` = mean |theta_k - theta_0|; `ess_fraction` = mean effective sample size of the
trajectory weights over B; `*_relative_bias` = |mean(estimate - exact)| / |mean exact|;
`*_relative_noise` = the same for pure sampling noise (sqrt(sum Var / N) / |exact|), a bias is
resolved above twice it; `weighted_var_growth` = variance trace of the weighted estimate over
its step-0 value; `weighted_top_share` = the largest single batch's share of the weighted
estimate's summed squared deviations (near 1: one batch decides the mean and its error bar).

{sections}

Plot: `stale_batch.png`. Total time {seconds:.0f} s.
""")
    print(f"wrote {out} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
