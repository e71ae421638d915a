"""The alpha-order estimator (Suh et al., ICML 2022, "Do differentiable simulators give better
policy gradients?"): an inverse-variance-weighted mix of the first-order (BPTT) and zeroth-order
(REINFORCE) estimates, with a fallback to the zeroth-order one when the first looks biased.

From ``n`` rollouts, differentiated through the dynamics (first order, ``F_i``) and scored
(zeroth order, ``Z_i``, REINFORCE with the chosen baseline), with ``var_F``, ``var_Z`` the traces of
the covariance of the two batch means::

    alpha = var_Z / (var_F + var_Z)                     (minimises the variance of the mix)
    alpha = 0  if  |mean F - mean Z| > confidence_sigmas * sqrt(var_F + var_Z)
               or  any F_i is not finite                (first order looks biased: Suh's fallback)
    grad  = alpha * mean F + (1 - alpha) * mean Z

Stiff or discontinuous dynamics make first-order estimates biased or wildly variable (Suh et al.'s
"empirical bias"); the test above catches a first-order mean the zeroth-order one disagrees with.
The mix is not exactly unbiased (alpha depends on the same samples).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from diffpg import returns
from diffpg.acting import unroll
from diffpg.envs.core import Environment, State
from diffpg.estimators.base import (
    Batch,
    Estimate,
    Estimator,
    check_choice,
    check_positive,
    check_positive_int,
    check_unit_interval,
    learns_nothing,
)
from diffpg.estimators.registry import register
from diffpg.estimators.reinforce import ReinforceSettings, score_function_gradient
from diffpg.normalization import RunningStatistics
from diffpg.policy import Params, Policy


@dataclasses.dataclass(frozen=True)
class AlphaOrderSettings:
    """Inverse-variance mix of BPTT and REINFORCE, falling back to REINFORCE when the first-order
    mean disagrees (Suh et al. 2022)."""

    horizon: int = 32
    """Steps simulated per estimate."""
    discount: float = 0.99
    """gamma, the discount of the objective J = E[sum_t gamma^t r_t]."""
    baseline: str = "leave_one_out"
    """Baseline of the zeroth-order part: none, batch_mean or leave_one_out."""
    confidence_sigmas: float = 3.0
    """Fall back to zeroth order when the two means differ by more than this many noise sigmas."""

    def __post_init__(self):
        check_positive_int("horizon", self.horizon)
        check_unit_interval("discount", self.discount)
        check_choice("baseline", self.baseline, ("none", "batch_mean", "leave_one_out"))
        check_positive("confidence_sigmas", self.confidence_sigmas)


def combine(first_order: jax.Array, zeroth_order: jax.Array, confidence_sigmas: float):
    """Mix per-rollout samples ``[n, P]`` of the two estimators (see the module docstring).

    Returns ``(grad [P], alpha, var_first, var_zeroth, fell_back)``.
    """
    num = first_order.shape[0]
    finite = jnp.all(jnp.isfinite(first_order))
    first_order = jnp.where(finite, first_order, 0.0)
    mean_first, mean_zeroth = first_order.mean(0), zeroth_order.mean(0)
    var_first = jnp.sum(jnp.var(first_order, axis=0, ddof=1)) / num
    var_zeroth = jnp.sum(jnp.var(zeroth_order, axis=0, ddof=1)) / num
    alpha = var_zeroth / jnp.maximum(var_first + var_zeroth, 1e-30)
    gap = jnp.linalg.norm(mean_first - mean_zeroth)
    biased = jnp.logical_or(gap > confidence_sigmas * jnp.sqrt(var_first + var_zeroth), ~finite)
    alpha = jnp.where(biased, 0.0, alpha)
    grad = alpha * mean_first + (1.0 - alpha) * mean_zeroth
    return grad, alpha, var_first, var_zeroth, biased


def make_alpha_order(
    env: Environment, policy: Policy, settings: AlphaOrderSettings = AlphaOrderSettings()
) -> Estimator:
    """Build the alpha-order estimator (see the module docstring)."""
    zeroth_settings = ReinforceSettings(horizon=settings.horizon, discount=settings.discount,
                                        baseline=settings.baseline)

    def init(key: jax.Array, policy_params: Params) -> None:
        del key, policy_params

    def estimate(params: Params, obs_stats: RunningStatistics, state: None, env_state: State,
                 key: jax.Array) -> Estimate:
        del state
        num = jax.tree.leaves(env_state)[0].shape[0]

        def one_rollout(p, start, rollout_key):
            start = jax.tree.map(lambda x: x[None], start)
            end, tr = unroll(env, policy, p, obs_stats, start, rollout_key, settings.horizon)
            weights = returns.segment_discounts(tr.done, settings.discount)
            return jnp.sum(weights * tr.reward), (end, tr)

        first_tree, (end_state, tr) = jax.vmap(
            jax.grad(one_rollout, has_aux=True), (None, 0, 0)
        )(params, env_state, jax.random.split(key, num))
        # [n, T, 1, ...] -> [T, n, ...]
        tr = jax.tree.map(lambda x: jnp.moveaxis(x[:, :, 0], 0, 1), tr)
        tr = jax.lax.stop_gradient(tr)
        end_state = jax.tree.map(lambda x: x[:, 0], end_state)
        zeroth_tree, objective = score_function_gradient(
            policy, params, obs_stats, tr, zeroth_settings, per_rollout=True
        )
        flat = jax.vmap(lambda g: ravel_pytree(g)[0])
        _, unravel = ravel_pytree(params)
        grad, alpha, var_first, var_zeroth, fell_back = combine(
            flat(first_tree), flat(zeroth_tree), settings.confidence_sigmas)
        metrics = {"objective": jnp.mean(objective), "alpha": alpha,
                   "first_order_variance": var_first, "zeroth_order_variance": var_zeroth,
                   "fell_back": fell_back.astype(jnp.float32)}
        return Estimate(unravel(grad), Batch(tr), jax.lax.stop_gradient(end_state), metrics)

    return Estimator(init, estimate, learns_nothing, settings)


register("alpha_order", AlphaOrderSettings, make_alpha_order, family="mixture")
