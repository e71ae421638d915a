"""S7: SHAC's short-horizon surrogate smooths the loss along a parameter direction (SHAC paper,
Xu et al. 2022, Fig. 2), on a Brax environment.

Along one random, filter-normalised direction ``d`` (each parameter leaf scaled to the norm of the
corresponding policy leaf), with the policy noise and the start states held fixed (common random
numbers), this evaluates

* the full-episode objective ``J(theta + a d) = mean_b sum_{t<T} gamma^t r_t`` (what plain BPTT
  differentiates, T = the episode length), and
* SHAC's surrogate for one window of ``window`` steps from states reached mid-episode:
  ``mean_b [sum_{t<h} gamma^t r_t + gamma^h V(s_h)]`` with SHAC's value critic, first fitted to
  the fixed policy by running the SHAC estimator (its critic updates) for ``--critic-fits`` windows,

and the gradient norms of both at ``a = 0``. Jaggedness is measured by the roughness
``mean |second difference| / (max - min)`` of each curve on the same grid (0 for a straight line,
large for a curve that is not smooth at the grid's scale).

    python experiments/s7_loss_smoothing.py                   # hopper, CPU, ~4 minutes
    python experiments/s7_loss_smoothing.py --env ant --num-envs 64   # on a GPU
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from common import format_table, parser, prepare_output, write_json
from jax.flatten_util import ravel_pytree

from diffpg import envs, estimators, returns
from diffpg.acting import unroll
from diffpg.critics import make_mlp_value_function
from diffpg.estimators.shac import window_return
from diffpg.normalization import init_statistics
from diffpg.policy import make_gaussian_mlp_policy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def roughness(values: np.ndarray) -> float:
    """``mean |second difference| / (max - min)`` of a curve on an even grid."""
    span = float(np.max(values) - np.min(values))
    return float(np.mean(np.abs(np.diff(values, 2))) / max(span, 1e-12))


def parse_arguments():
    """The command line: the env, the episode and window lengths, the grid and the sizes."""
    arguments = parser("s7_loss_smoothing", __doc__.split("\n\n")[0])
    arguments.add_argument("--env", default="hopper")
    arguments.add_argument("--backend", default=None)
    arguments.add_argument("--episode-length", type=int, default=1000)
    arguments.add_argument("--window", type=int, default=32)
    arguments.add_argument("--num-envs", type=int, default=8)
    arguments.add_argument("--points", type=int, default=41, help="grid points along d")
    arguments.add_argument("--scale", type=float, default=0.5, help="grid spans a in [-scale, scale]")
    arguments.add_argument("--critic-fits", type=int, default=60)
    arguments.add_argument("--discount", type=float, default=0.99)
    return arguments.parse_args()


def filter_normalised_direction(params, key):
    """A random direction with the tree structure of ``params``: each leaf ``N(0, 1)``, scaled
    to the norm of the corresponding parameter leaf."""
    leaves, treedef = jax.tree.flatten(params)
    random_leaves = [jax.random.normal(k, x.shape) for k, x in
                     zip(jax.random.split(key, len(leaves)), leaves, strict=True)]
    return jax.tree.unflatten(treedef, [
        r * jnp.linalg.norm(x) / jnp.maximum(jnp.linalg.norm(r), 1e-12)
        for r, x in zip(random_leaves, leaves, strict=True)])


def fit_shac_critic(shac, shac_state, params, stats, starts, key, fits: int):
    """SHAC's critic for the fixed policy, fitted by ``fits`` estimate-and-update rounds on
    windows that continue through the episode. Returns SHAC's state, the env states where the
    windows stopped (mid-episode) and the critic loss of every round ``[fits]``."""
    def fit(carry, step_key):
        state, env_state = carry
        key_estimate, key_update = jax.random.split(step_key)
        estimate = shac.estimate(params, stats, state, env_state, key_estimate)
        state, learned = shac.update(params, stats, state, estimate.batch, key_update)
        return (state, estimate.env_state), learned["critic_loss"]

    (shac_state, mid_states), critic_losses = jax.jit(
        lambda c, k: jax.lax.scan(fit, c, jax.random.split(k, fits)))(
        (shac_state, starts), key)
    return shac_state, mid_states, critic_losses


def curves_along(objectives: dict, params, direction, alphas) -> tuple[dict, dict, dict]:
    """For each named objective ``J``: ``J(params + a direction)`` at every ``a`` of ``alphas``
    (one vmapped program), the norm of its gradient at ``a = 0``, and the seconds both took."""
    timings, curves, grad_norms = {}, {}, {}
    for name, objective in objectives.items():
        started = time.perf_counter()

        def at(alpha, objective=objective):
            return objective(jax.tree.map(lambda x, d: x + alpha * d, params, direction))

        curves[name] = np.asarray(jax.jit(jax.vmap(at))(alphas))
        gradient = jax.jit(jax.grad(objective))(params)
        grad_norms[name] = float(jnp.linalg.norm(ravel_pytree(gradient)[0]))
        timings[name] = time.perf_counter() - started
    return curves, grad_norms, timings


def plot(path, args, alphas, curves: dict) -> None:
    """One panel per objective: its curve along the direction, with its roughness."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (name, curve) in zip(axes, curves.items(), strict=True):
        axis.plot(np.asarray(alphas), curve, marker=".")
        axis.set(xlabel="step a along the direction d", ylabel="objective",
                 title=f"{name} (roughness {roughness(curve):.3g})")
        axis.grid(True, alpha=0.3)
    figure.suptitle(f"{args.env}: {args.num_envs} envs, episode {args.episode_length}, "
                    f"fixed noise and start states")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    args = parse_arguments()
    out = prepare_output(args.out, args.overwrite)

    env = envs.make(args.env, episode_length=args.episode_length, backend=args.backend)
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size, hidden_sizes=(64, 64))
    key = jax.random.PRNGKey(args.seed)
    key_params, key_states, key_direction, key_noise, key_critic = jax.random.split(key, 5)
    params = policy.init(key_params)
    stats = init_statistics(env.observation_size)
    starts = jax.vmap(env.reset)(jax.random.split(key_states, args.num_envs))
    direction = filter_normalised_direction(params, key_direction)

    def full_objective(p):
        _, tr = unroll(env, policy, p, stats, starts, key_noise, args.episode_length)
        weights = returns.segment_discounts(tr.done, args.discount)
        return jnp.mean(jnp.sum(weights * tr.reward, axis=0))

    shac = estimators.make("shac", env, policy, horizon=args.window, discount=args.discount)
    shac_state = shac.init(key_critic, params)
    started = time.perf_counter()
    shac_state, mid_states, critic_losses = fit_shac_critic(shac, shac_state, params, stats,
                                                            starts, key_critic, args.critic_fits)
    critic_seconds = time.perf_counter() - started
    value_function = make_mlp_value_function(env.observation_size,
                                             shac.settings.critic_hidden_sizes)
    target = shac_state.target_params

    def surrogate(p):
        end, tr = unroll(env, policy, p, stats, mid_states, key_noise, args.window)
        zeros = jnp.zeros(tr.reward.shape)
        next_value = value_function.apply(target, tr.next_obs, zeros)
        end_value = value_function.apply(target, end.obs, zeros[-1])
        totals, _, _ = window_return(tr.reward, tr.done, tr.truncation, next_value, end_value,
                                     jnp.ones(tr.reward.shape[1]), args.discount, 1.0)
        return jnp.mean(totals)

    alphas = jnp.linspace(-args.scale, args.scale, args.points)
    curves, grad_norms, timings = curves_along(
        {"full_episode_bptt": full_objective, f"shac_window_{args.window}": surrogate},
        params, direction, alphas)
    rows = [{"objective": name, "roughness": roughness(curve), "min": float(curve.min()),
             "max": float(curve.max()), "grad_norm_at_0": grad_norms[name],
             "finite": bool(np.all(np.isfinite(curve))), "seconds": timings[name]}
            for name, curve in curves.items()]
    table = format_table(rows, ["objective", "roughness", "min", "max", "grad_norm_at_0", "finite",
                                "seconds"])
    print(table)
    plot(out / "loss_along_direction.png", args, alphas, curves)
    write_json(out / "results.json", {
        "settings": vars(args) | {"out": str(args.out)}, "alphas": np.asarray(alphas),
        "curves": curves, "rows": rows, "critic_losses": np.asarray(critic_losses),
        "critic_fit_seconds": critic_seconds})
    (out / "report.md").write_text(
        f"# S7: loss along a parameter direction, {args.env}\n\n{table}\n\n"
        f"Critic fitted by {args.critic_fits} SHAC windows in {critic_seconds:.0f} s (final TD loss "
        f"{float(critic_losses[-1]):.3g}).\n\n![loss](loss_along_direction.png)\n")


if __name__ == "__main__":
    main()
