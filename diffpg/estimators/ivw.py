"""IVW-H: a per-step inverse-variance mix of the first-order (pathwise) and zeroth-order
(score-function) gradients (Onoda et al. 2026, arXiv 2604.18161), which stabilises the variance
without detecting discontinuities.

The policy's parameters enter each step ``k`` only through its raw action
``u_k = mean_theta(s_k) + std_theta(s_k) * eps_k``. Writing ``theta_k`` for the copy used at step
``k``, ``grad J = sum_k dJ / dtheta_k``, and each term has two unbiased per-rollout estimates::

    F_k = (dR / du_k) . du_k / dtheta_k          (first order: R = sum_t w_t r_t differentiated
                                                  through the dynamics and the later actions)
    Z_k = grad_theta log pi(u_k | s_k) (psi_k - b_k)   (zeroth order: reward-to-go psi_k = sum_{t >= k}
                                                  w_t r_t, leave-one-out baseline b_k)

``sum_k F_k`` is BPTT's estimate and ``sum_k Z_k`` REINFORCE's on the same rollouts. With
``var_F(k)``, ``var_Z(k)`` the traces of the covariance of the two batch means at step ``k``::

    alpha_k = var_Z(k) / (var_F(k) + var_Z(k))          (minimises each step's variance)
    alpha_k = 0   if any F_k is not finite
    grad    = sum_k alpha_k mean_i F_k,i + (1 - alpha_k) mean_i Z_k,i

Steps where the dynamics stretch perturbations (late in a chaotic rollout, through a stiff
contact) get their score-function term, the others their pathwise term. The mix is unbiased for
any fixed weights, but weights estimated from the same samples are not fixed: they correlate with
the skewed score-function noise (measured on the LQR with 4 rollouts per state: a 2.5% bias). So
the weights are cross-fitted: the start states are split in two halves, and each half's terms are
mixed with the weights of the other half's variances; each half's mix is then unbiased. The price:
a half whose own pathwise terms hold an outlier (a stiff contact) no longer lowers its own weight,
which the same-sample weights do (``cross_fit=False``).
The published paper gives no code; the step split above (by where ``theta`` enters, so that both
estimates of a step are of the same ``dJ / dtheta_k``) and the trace variances are this module's
reading of "a per-step inverse-variance weighting of first- and zeroth-order terms".

Cost: one backward pass through the rollout (for ``dR / du``) plus per-sample policy gradients at
every step (``O(B * num_params)`` memory per step, scanned over the horizon).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from diffpg import returns
from diffpg.acting import StepHook, Transitions, repeat_states, unroll
from diffpg.envs.core import Environment, SettingError, State
from diffpg.estimators.base import (
    Batch,
    Estimate,
    Estimator,
    check_bool,
    check_choice,
    check_positive_int,
    check_unit_interval,
    learns_nothing,
)
from diffpg.estimators.registry import register
from diffpg.estimators.reinforce import ReinforceSettings, monte_carlo_advantage
from diffpg.normalization import RunningStatistics, normalize
from diffpg.policy import Params, Policy


@dataclasses.dataclass(frozen=True)
class IvwSettings:
    """Per-step inverse-variance mix of the pathwise and score-function gradients (IVW-H,
    Onoda et al. 2026)."""

    horizon: int = 32
    """Steps simulated per estimate."""
    discount: float = 0.99
    """gamma, the discount of the objective J = E[sum_t gamma^t r_t]."""
    baseline: str = "leave_one_out"
    """Baseline of the score-function terms: none or leave_one_out."""
    rollouts_per_state: int = 1
    """Rollouts from each start state (the leave-one-out pool when above 1)."""
    cross_fit: bool = True
    """Weight each half of the batch by the other half's variances (unbiased); False: by its
    own (an outlier then lowers its own weight, at the price of a bias)."""

    def __post_init__(self):
        check_positive_int("horizon", self.horizon)
        check_unit_interval("discount", self.discount)
        check_choice("baseline", self.baseline, ("none", "leave_one_out"))
        check_positive_int("rollouts_per_state", self.rollouts_per_state)
        check_bool("cross_fit", self.cross_fit)


class Rollouts(NamedTuple):
    """What the per-step terms are computed from, for ``n`` rollouts of ``T`` steps."""

    transitions: Transitions  # [T, n]
    action_gradient: jax.Array  # [T, n, act]: dR_i / du_k of each rollout's return R_i
    advantage: jax.Array  # [T, n]: psi_k - b_k of the score-function terms
    returns: jax.Array  # [n]: R_i = sum_t w_t r_t
    end_state: State  # [n]


class StepMeans(NamedTuple):
    """Per-step sums over each half ``h`` of the batch, divided by the batch size ``n`` (so the
    halves add up to batch means), ``[2, T, P]`` (flattened parameters), and the traces of the
    covariances of each half's mean ``[2, T]``."""

    first_order: jax.Array  # sum_{i in h} mask_i F_k,i / n (non-finite terms as 0)
    zeroth_order: jax.Array  # sum_{i in h} mask_i Z_k,i / n
    zeroth_order_unmasked: jax.Array  # sum_{i in h} (1 - mask_i) Z_k,i / n
    first_order_variance: jax.Array  # tr Cov of the half's mean of F_k,i (all its rollouts)
    zeroth_order_variance: jax.Array
    first_order_finite: jax.Array  # [2, T] bool: every F_k,i of the half's masked rollouts finite


def _offset_actions(step, state, offset, key):
    """A ``StepHook``: the step with ``offset [B, act]`` added to its raw action, so that the
    return's gradient by the offsets is its total derivative by each raw action."""
    return step(state, key, offset=offset)


def simulate(env: Environment, policy: Policy, params: Params, obs_stats: RunningStatistics,
             start: State, key: jax.Array, horizon: int, discount: float, baseline: str,
             pool: int) -> Rollouts:
    """Roll out from ``start [n]`` and differentiate each return with respect to each raw
    action (one backward pass); the score-function advantages use ``baseline`` over pools of
    ``pool`` consecutive rollouts (the whole batch when ``pool`` is 1)."""
    params = jax.lax.stop_gradient(params)
    num = jax.tree.leaves(start)[0].shape[0]
    offsets = jnp.zeros((horizon, num, policy.action_size))

    def total_return(action_offsets):
        end, tr = unroll(env, policy, params, obs_stats, start, key, horizon,
                         hook=StepHook(action_offsets, _offset_actions))
        weights = returns.segment_discounts(tr.done, discount)
        per_rollout = jnp.sum(weights * tr.reward, axis=0)
        return jnp.sum(per_rollout), (end, tr, weights, per_rollout)

    action_gradient, (end, tr, weights, per_rollout) = jax.grad(total_return, has_aux=True)(
        offsets)
    tr = jax.lax.stop_gradient(tr)
    score_settings = ReinforceSettings(horizon=horizon, discount=discount, baseline=baseline,
                                       rollouts_per_state=pool)
    advantage = monte_carlo_advantage(policy, params, normalize(obs_stats, tr.obs), tr,
                                      score_settings, weights)
    return Rollouts(tr, action_gradient, advantage, jax.lax.stop_gradient(per_rollout),
                    jax.lax.stop_gradient(end))


def step_means(policy: Policy, params: Params, obs_stats: RunningStatistics, rollouts: Rollouts,
               pool: int, mask: jax.Array | None = None) -> StepMeans:
    """The per-rollout terms ``F_k,i`` and ``Z_k,i`` (module docstring), reduced over each half
    of the batch one step at a time. The halves split the start states (groups of ``pool``
    consecutive rollouts) in two; ``mask [n]`` (default all 1) selects the rollouts whose
    first-order terms may be used (``zeroth_order_unmasked`` holds the others' score-function
    terms)."""
    flat, unravel = ravel_pytree(params)
    tr = rollouts.transitions
    num = tr.reward.shape[1]
    num_states = num // pool
    check_two_halves(num_states)
    half = (jnp.arange(num) // pool >= num_states // 2)[None, :]  # [1, n]
    groups = jnp.concatenate([~half, half]).astype(tr.reward.dtype)  # [2, n]
    mask = jnp.ones((num,)) if mask is None else mask

    def first_order_term(p, obs, noise, cotangent):
        return jnp.sum(cotangent * policy.raw_from_noise(unravel(p), obs, noise))

    def zeroth_order_term(p, obs, raw_action, advantage):
        return advantage * policy.log_prob(unravel(p), obs, raw_action)

    per_sample_first = jax.vmap(jax.grad(first_order_term), (None, 0, 0, 0))
    per_sample_zeroth = jax.vmap(jax.grad(zeroth_order_term), (None, 0, 0, 0))

    def variance_of_mean(samples):  # [n, P] -> [2]: each half's
        def one(group):
            size = jnp.sum(group)
            mean = group @ samples / size
            squares = group @ jnp.sum(jnp.square(samples - mean), axis=1)
            return squares / (size - 1) / size

        return jax.vmap(one)(groups)

    def one_step(_, inputs):
        obs, noise, raw_action, cotangent, advantage = inputs
        obs = normalize(obs_stats, obs)
        first = per_sample_first(flat, obs, noise, cotangent)  # [n, P]
        zeroth = per_sample_zeroth(flat, obs, raw_action, advantage)
        finite = jnp.all(jnp.isfinite(first), axis=1)
        first = jnp.where(finite[:, None], first, 0.0)
        usable = jnp.all(jnp.logical_or(finite, mask == 0)[None, :] | (groups == 0), axis=1)
        means = ((groups * mask) @ first / num, (groups * mask) @ zeroth / num,
                 (groups * (1.0 - mask)) @ zeroth / num,
                 variance_of_mean(first), variance_of_mean(zeroth), usable)
        return None, means

    inputs = (tr.obs, tr.noise, tr.raw_action, rollouts.action_gradient, rollouts.advantage)
    _, means = jax.lax.scan(one_step, None, inputs)
    return StepMeans(*(jnp.moveaxis(m, 0, 1) for m in means))  # [T, 2, ...] -> [2, T, ...]


def inverse_variance_mix(means: StepMeans, cross_fit: bool = True) -> tuple[jax.Array, jax.Array]:
    """``grad [P]`` of the module docstring, cross-fitted: each half's terms are mixed with the
    weights ``alpha [2, T]`` the *other* half's variances give (so a weight never depends on the
    noise of the terms it weights, and each half's mix is unbiased); ``cross_fit=False`` uses
    each half's own. The unmasked rollouts' score-function terms are added. Returns
    ``(grad, alpha)``."""
    total = means.first_order_variance + means.zeroth_order_variance
    alpha = means.zeroth_order_variance / jnp.maximum(total, jnp.finfo(total.dtype).tiny)
    alpha = jnp.where(means.first_order_finite, alpha, 0.0)
    finite_both = jnp.all(means.first_order_finite, axis=0)  # a non-finite step falls back in both
    weights = jnp.where(finite_both, alpha[::-1] if cross_fit else alpha, 0.0)[..., None]
    mixed = weights * means.first_order + (1.0 - weights) * means.zeroth_order
    return jnp.sum(mixed + means.zeroth_order_unmasked, axis=(0, 1)), alpha


def check_two_halves(num_states: int) -> None:
    """Refuse a batch of fewer than 2 start states, which cannot be split in two halves for the
    cross-fitted weights (whatever ``rollouts_per_state``)."""
    if num_states < 2:
        raise SettingError(f"the per-step weights are cross-fitted between two halves of the start "
                           f"states: a batch of {num_states} start state(s) needs at least 2 "
                           "(num_envs >= 2)")


def mixed_estimate(env: Environment, policy: Policy, settings, params: Params,
                   obs_stats: RunningStatistics, env_state: State, key: jax.Array,
                   baseline: str, select=None) -> Estimate:
    """One estimate of the per-step mix from ``settings.rollouts_per_state`` rollouts of each of
    the ``B`` states ``env_state`` (``settings``: ``horizon``, ``discount``,
    ``rollouts_per_state``, ``cross_fit``). ``select(params, obs_stats, rollouts) -> (mask [n],
    metrics)``, if given, chooses the rollouts whose first-order terms may enter
    (``step_means``) and adds its own metrics (DDCG's test)."""
    pool = settings.rollouts_per_state
    check_two_halves(jax.tree.leaves(env_state.obs)[0].shape[0])  # (before the pool's own check)
    start = repeat_states(env_state, pool)
    rollouts = simulate(env, policy, params, obs_stats, start, key, settings.horizon,
                        settings.discount, baseline, pool)
    mask, extra_metrics = (None, {}) if select is None else select(params, obs_stats, rollouts)
    means = step_means(policy, params, obs_stats, rollouts, pool, mask)
    grad, alpha = inverse_variance_mix(means, settings.cross_fit)
    end_state = jax.tree.map(lambda x: x[::pool], rollouts.end_state)
    metrics = {"objective": jnp.mean(rollouts.returns), "alpha": jnp.mean(alpha),
               "first_order_variance": jnp.sum(means.first_order_variance),
               "zeroth_order_variance": jnp.sum(means.zeroth_order_variance),
               "non_finite_steps": 1.0 - jnp.mean(means.first_order_finite)}
    return Estimate(ravel_pytree(params)[1](grad), Batch(rollouts.transitions), end_state,
                    metrics | extra_metrics)


def make_ivw(env: Environment, policy: Policy, settings: IvwSettings = IvwSettings()) -> Estimator:
    """Build the IVW-H estimator (see the module docstring)."""

    def init(key: jax.Array, policy_params: Params) -> None:
        del key, policy_params

    def estimate(params: Params, obs_stats: RunningStatistics, state: None, env_state: State,
                 key: jax.Array) -> Estimate:
        del state
        return mixed_estimate(env, policy, settings, params, obs_stats, env_state, key,
                              settings.baseline)

    return Estimator(init, estimate, learns_nothing, settings)


register("ivw", IvwSettings, make_ivw, family="mixture")
