"""REINFORCE: the score-function (likelihood-ratio) estimator and its variance-reduction family.

For the objective ``J = E[sum_t w_t r_t]`` (``w`` from ``returns.segment_discounts``)::

    grad J = E[ sum_t grad log pi(u_t | s_t) * (psi_t - rho_{0:t} b_t) ]

* ``psi_t``: the episode's total discounted return (``reward_to_go=False``) or, by causality, only
  the rewards from ``t`` on (``reward_to_go=True``, seeds/002), both weighted by ``w`` from the
  episode's start so that the estimate is of ``grad J`` itself;
* ``b_t``: a baseline that must not depend on ``u_t`` (seeds/001, appendix B):
  ``none``; ``batch_mean`` (mean of ``psi_t`` over the batch: it contains the sample's own return,
  so the estimate is scaled by exactly ``1 - 1/n``, a bias kept for study); ``leave_one_out``
  (mean over the *other* rollouts of the pool: unbiased, RLOO); ``value`` (``w_t V(s_t, steps
  left)`` from a learned critic fitted after the gradient is taken: unbiased); ``optimal`` (per
  parameter coordinate ``p``, ``b*_t[p] = E[g_t[p]^2 psi_t] / E[g_t[p]^2]`` with
  ``g = grad log pi``, seeds/001 appendix C, estimated leave-one-out so it stays unbiased; costs
  per-sample scores, memory ``O(T * n * num_params)``; it is optimal only under that appendix's
  simplification, one step at a time ignoring correlations between steps, and can lose to
  ``leave_one_out``);
* ``rho_{0:t} = prod_{t' <= t} pi_theta(u_t') / pi_behaviour(u_t')``: per-decision importance
  weights for data collected by an older policy (seeds/002), with
  ``psi_t = sum_{t' >= t} rho_{0:t'} w_t' r_t'``; all ``rho = 1`` for fresh data. They correct the
  estimate at parameters chosen independently of the batch; parameters reached by optimising on
  that same batch keep a bias, and the weights' variance grows fast as the policy moves away
  (``experiments/s5_stale_batch.py`` measures both).

The pool of a leave-one-out baseline is the group of ``rollouts_per_state`` rollouts that start from
the same state (RLOO/GRPO groups) when that is above 1, else the whole batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffpg import returns
from diffpg.critics import (
    ValueFunction,
    fit_mean_squared_error,
    init_critic_state,
    make_critic_optimizer,
    make_mlp_value_function,
)
from diffpg.estimators.base import (
    Estimate,
    Estimator,
    EstimatorState,
    check_choice,
    check_positive,
    check_positive_int,
    check_unit_interval,
    maybe_update_statistics,
)
from diffpg.normalization import RunningStatistics, init_statistics, normalize
from diffpg.policy import Params, Policy
from diffpg.rollout import Transitions, repeat_states, rollout
from envs.core import Environment, State

BASELINES = ("none", "batch_mean", "leave_one_out", "value", "optimal")


@dataclasses.dataclass(frozen=True)
class ReinforceSettings:
    horizon: int = 32
    """Steps simulated per estimate (T)."""
    discount: float = 0.99
    """gamma of the objective sum_t gamma^t r_t."""
    reward_to_go: bool = True
    """Weight each score by the rewards from its step on (True) or by the whole return (False)."""
    baseline: str = "leave_one_out"
    """One of: none, batch_mean, leave_one_out, value, optimal (see the module docstring)."""
    rollouts_per_state: int = 1
    """k rollouts from each start state; above 1 they form the leave-one-out pools."""
    normalize_observations: bool = False
    """Update running observation statistics after each estimate."""
    value_hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layers of the value baseline's MLP (baseline='value')."""
    value_learning_rate: float = 1e-3
    value_iterations: int = 8
    """Passes over the batch per fit of the value baseline."""
    value_minibatches: int = 4

    def __post_init__(self):
        check_positive_int("horizon", self.horizon)
        check_unit_interval("discount", self.discount)
        check_choice("baseline", self.baseline, BASELINES)
        check_positive_int("rollouts_per_state", self.rollouts_per_state)
        check_positive("value_learning_rate", self.value_learning_rate)
        check_positive_int("value_iterations", self.value_iterations)
        check_positive_int("value_minibatches", self.value_minibatches)


def score_function_gradient(
    policy: Policy,
    params: Params,
    obs_stats: RunningStatistics,
    transitions: Transitions,
    settings: ReinforceSettings,
    value_baseline: jax.Array | None = None,
    behaviour_log_prob: jax.Array | None = None,
    per_rollout: bool = False,
) -> tuple[Params, jax.Array]:
    """The REINFORCE estimate of ``grad J`` from a batch of ``n`` rollouts ``[T, n]``.

    ``value_baseline [T, n]``: ``V(s_t)`` for ``baseline='value'``. ``behaviour_log_prob [T, n]``:
    ``log pi_behaviour(u_t | s_t)`` of the policy that collected the data, to reweight stale data
    (requires ``reward_to_go``); ``None`` means the data is from ``params`` itself.
    Returns the gradient (tree of ``params``) and the per-rollout objective ``sum_t w_t r_t [n]``.
    With ``per_rollout=True`` the gradient has a leading axis ``[n]``: each rollout's term, whose
    mean is the estimate (terms share their baselines, so they are not independent).
    """
    num_rollouts = transitions.reward.shape[1]
    pool = _pool_size(settings, num_rollouts)
    obs = normalize(obs_stats, transitions.obs)
    weights = returns.segment_discounts(transitions.done, settings.discount)
    weighted_reward = weights * transitions.reward

    if behaviour_log_prob is None:
        step_ratio = jnp.ones_like(weighted_reward)
    else:
        if not settings.reward_to_go:
            raise ValueError("importance weights need reward_to_go=True (per-decision weights)")
        log_ratio = policy.log_prob(jax.lax.stop_gradient(params), obs, transitions.raw_action)
        log_ratio = log_ratio - behaviour_log_prob
        step_ratio = jnp.exp(returns.episode_cumsum(log_ratio, transitions.done))
    if settings.reward_to_go:
        psi = returns.reward_to_go(step_ratio * weighted_reward, transitions.done)
    else:
        psi = returns.episode_total(weighted_reward, transitions.done)

    def log_prob_fn(p):
        return policy.log_prob(p, obs, transitions.raw_action)  # [T, n]

    if settings.baseline == "optimal":
        grad = _optimal_baseline_gradient(policy, params, obs, transitions, psi, step_ratio, pool,
                                          per_rollout)
    else:
        baseline = _baseline(settings.baseline, psi, weights, value_baseline, pool)
        coefficient = jax.lax.stop_gradient(psi - step_ratio * baseline)
        if per_rollout:
            def rollout_term(p, obs_i, raw_i, coefficient_i):
                return jnp.sum(coefficient_i * policy.log_prob(p, obs_i, raw_i))

            grad = jax.vmap(jax.grad(rollout_term), (None, 1, 1, 1))(
                params, obs, transitions.raw_action, coefficient)
        else:
            grad = jax.grad(lambda p: jnp.sum(coefficient * log_prob_fn(p)) / num_rollouts)(params)
    return grad, jnp.sum(weighted_reward, axis=0)


def _pool_size(settings: ReinforceSettings, num_rollouts: int) -> int:
    pool = settings.rollouts_per_state if settings.rollouts_per_state > 1 else num_rollouts
    if settings.baseline in ("leave_one_out", "optimal") and pool < 2:
        raise ValueError(
            f"baseline={settings.baseline!r} needs at least 2 rollouts per pool, got {pool}: "
            "use a batch of 2 or more states or rollouts_per_state >= 2"
        )
    return pool


def _leave_one_out_sum(values: jax.Array, pool: int) -> jax.Array:
    """For ``values [T, n, ...]``: the sum over the other members of each sample's pool."""
    steps, num = values.shape[:2]
    grouped = values.reshape((steps, num // pool, pool) + values.shape[2:])
    others = jnp.sum(grouped, axis=2, keepdims=True) - grouped
    return others.reshape(values.shape)


def _baseline(kind, psi, weights, value_baseline, pool) -> jax.Array:
    if kind == "none":
        return jnp.zeros_like(psi)
    if kind == "batch_mean":
        return jnp.broadcast_to(jnp.mean(psi, axis=1, keepdims=True), psi.shape)
    if kind == "leave_one_out":
        return _leave_one_out_sum(psi, pool) / (pool - 1)
    if kind == "value":
        if value_baseline is None:
            raise ValueError("baseline='value' needs value_baseline")
        return weights * value_baseline
    raise ValueError(f"baseline={kind!r} is not allowed; allowed values: {list(BASELINES)}")


def _optimal_baseline_gradient(policy, params, obs, transitions, psi, step_ratio, pool,
                               per_rollout) -> Params:
    """Per-coordinate, leave-one-out ``b*_t[p] = sum' g[p]^2 psi / sum' g[p]^2`` (appendix C)."""
    steps, num = psi.shape

    def single_log_prob(p, obs_i, raw_i):
        return policy.log_prob(p, obs_i, raw_i)

    per_sample_score = jax.vmap(jax.vmap(jax.grad(single_log_prob), (None, 0, 0)), (None, 0, 0))
    scores = per_sample_score(params, obs, transitions.raw_action)  # leaves [T, n, *p]

    def coordinate_gradient(score):
        extra = (1,) * (score.ndim - 2)
        psi_b = psi.reshape(psi.shape + extra)
        ratio_b = step_ratio.reshape(psi.shape + extra)
        square = jnp.square(score)
        numerator = _leave_one_out_sum(square * psi_b, pool)
        denominator = _leave_one_out_sum(square, pool)
        safe = denominator > 0
        baseline = jnp.where(safe, numerator / jnp.where(safe, denominator, 1.0), 0.0)
        terms = jnp.sum(score * (psi_b - ratio_b * baseline), axis=0)  # [n, *p]
        return terms if per_rollout else jnp.sum(terms, axis=0) / num

    return jax.tree.map(coordinate_gradient, scores)


def make_reinforce(
    env: Environment,
    policy: Policy,
    settings: ReinforceSettings = ReinforceSettings(),
    value_function: ValueFunction | None = None,
) -> Estimator:
    """Build the REINFORCE estimator (see the module docstring for the estimate).

    ``value_function`` replaces the learned MLP value baseline (e.g. an exact one in tests).
    """
    if value_function is None:
        # The baseline's target is the return to the end of the horizon (no bootstrap), which
        # depends on the steps left: the critic sees them.
        value_function = make_mlp_value_function(
            policy.observation_size, settings.value_hidden_sizes, time_scale=settings.horizon
        )
    optimizer = make_critic_optimizer(settings.value_learning_rate, (0.7, 0.95))
    uses_value = settings.baseline == "value"

    def init(key: jax.Array, policy_params: Params) -> EstimatorState:
        del policy_params
        critic = None
        if uses_value:
            critic = init_critic_state(value_function.init(key), optimizer)
        return EstimatorState(init_statistics(policy.observation_size), critic)

    def estimate(params: Params, state: EstimatorState, env_state: State, key) -> Estimate:
        key_rollout, key_fit = jax.random.split(key)
        start = repeat_states(env_state, settings.rollouts_per_state)
        data_params = jax.lax.stop_gradient(params)
        final_state, transitions = rollout(
            env, policy, data_params, state.obs_stats, start, key_rollout, settings.horizon
        )
        value_baseline, obs = None, normalize(state.obs_stats, transitions.obs)
        steps_left = settings.horizon - jnp.arange(settings.horizon)[:, None]
        if uses_value:
            value_baseline = value_function.apply(state.critic.params, obs, steps_left)
        grad, objective = score_function_gradient(
            policy, params, state.obs_stats, transitions, settings, value_baseline
        )
        metrics = {"objective": jnp.mean(objective)}
        new_state = state
        if uses_value:
            # Monte-Carlo return from each step to the end of the horizon.
            targets = returns.reward_to_go(transitions.reward, transitions.done, settings.discount)
            steps_left_b = jnp.broadcast_to(steps_left, targets.shape)
            critic, loss = fit_mean_squared_error(
                state.critic, value_function.apply, (obs, steps_left_b), targets, optimizer,
                key_fit, settings.value_iterations, settings.value_minibatches,
            )
            new_state = new_state._replace(critic=critic)
            metrics["value_loss"] = loss
        new_state = maybe_update_statistics(
            new_state, transitions.obs, settings.normalize_observations
        )
        end_state = jax.tree.map(
            lambda x: x[:: settings.rollouts_per_state], final_state
        )
        return Estimate(grad, new_state, end_state, metrics)

    return Estimator(init, estimate, settings)

