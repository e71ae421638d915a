"""REINFORCE: the score-function (likelihood-ratio) estimator, its variance-reduction family, and PPO.

For the objective ``J = E[sum_t w_t r_t]`` (``w`` from ``returns.segment_discounts``)::

    grad J = E[ sum_t grad log pi(u_t | s_t) * A_t ]

with the advantage ``A_t`` one of:

* ``advantage="monte_carlo"``: ``A_t = psi_t - rho_{0:t} b_t`` where

  - ``psi_t`` is the episode's total discounted return (``reward_to_go=False``) or, by causality,
    only the rewards from ``t`` on (``reward_to_go=True``), both weighted by ``w`` from
    the episode's start so that the estimate is of ``grad J`` itself;
  - ``b_t`` is a baseline that must not depend on ``u_t`` (then ``E[g_t b_t] = 0``): ``none``;
    ``batch_mean`` (mean of ``psi_t`` over the batch: it contains the sample's own return, so the
    estimate is scaled by exactly ``1 - 1/n``, a bias kept for study); ``leave_one_out`` (mean
    over the *other* rollouts of the pool: unbiased, RLOO); ``value`` (``w_t V(s_t, steps left)``
    from a learned critic, fitted by ``update`` after the gradient is taken: unbiased);
    ``optimal`` (per parameter coordinate ``p``, ``b*_t[p] = E[g_t[p]^2 psi_t] / E[g_t[p]^2]``
    with ``g = grad log pi`` (Greensmith et al. 2004), estimated leave-one-out so it stays
    unbiased; costs per-sample scores, memory ``O(T * n * num_params)``; optimal only under the
    simplification that treats each step apart, and can lose to ``leave_one_out``);
  - ``rho_{0:t} = prod_{t' <= t} pi_theta(u_t') / pi_behaviour(u_t')``: per-decision importance
    weights for data collected by an older policy, with
    ``psi_t = sum_{t' >= t} rho_{0:t'} w_t' r_t'``; all ``rho = 1`` for fresh data
    (``score_function_gradient(..., behaviour_log_prob=...)``; ``experiments/s5_stale_batch.py``).

* ``advantage="gae"``: generalised advantage estimation (Schulman et al. 2016) with the learned
  value critic ``V(s)``: ``A_t = G^lambda_t - V(s_t)``, the TD(lambda) return (bootstrapped by
  ``V`` at the horizon and at time-limit truncations, 0 at termination) minus the value, with
  the undiscounted state weighting of practical actor-critic methods (no ``w_t``: biased for the
  discounted objective, Thomas 2014, and lower in variance). Optionally normalised over the
  (mini)batch. With ``finite_horizon`` (comparisons) the objective ends at the horizon instead:
  the critic sees the steps left, the targets stop at the horizon and ``A_t`` carries ``w_t``,
  so that with the true value the estimate is of ``grad J_T`` exactly.

``entropy_cost`` adds ``entropy_cost * grad sum_t H(pi(.|s_t))`` (Gaussian entropy of the raw
action) to the gradient.

Reusing a batch (``reuse``, several optimiser steps on one batch in training): the gradient at
newer parameters ``theta`` of PPO's clipped surrogate (Schulman et al. 2017), the practical form
of the seeds' importance weights for stale data::

    sum_t min(r_t A_t, clip(r_t, 1 - clip_ratio, 1 + clip_ratio) A_t),
    r_t = pi_theta(u_t | s_t) / pi_behaviour(u_t | s_t)

averaged over the batch's environments; at the collecting parameters (``r = 1``) it is the
estimate itself. ``ppo`` is this estimator registered with PPO's settings (GAE, a value critic,
normalised advantages) and training loop (epochs of minibatch steps on each batch).

The pool of a leave-one-out baseline is the group of ``rollouts_per_state`` rollouts that start from
the same state (RLOO/GRPO groups) when that is above 1, else the whole batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffpg import returns
from diffpg.acting import Transitions, repeat_states, unroll
from diffpg.critics import (
    CriticState,
    ValueFunction,
    explained_variance,
    fit_mean_squared_error,
    init_critic_state,
    make_critic_optimizer,
    make_mlp_value_function,
)
from diffpg.envs.core import Environment, SettingError, State
from diffpg.estimators.base import (
    Batch,
    Estimate,
    Estimator,
    check_choice,
    check_critic_fit,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_unit_interval,
    learns_nothing,
)
from diffpg.estimators.registry import register
from diffpg.normalization import RunningStatistics, normalize
from diffpg.policy import Params, Policy

BASELINES = ("none", "batch_mean", "leave_one_out", "value", "optimal")
ADVANTAGES = ("monte_carlo", "gae")


@dataclasses.dataclass(frozen=True)
class ScoreFunctionSettings:
    """Every setting of the score-function family (ReinforceSettings and PpoSettings
    differ only in their defaults; neither is an instance of the other)."""

    horizon: int = 32
    """Steps simulated per estimate (T)."""
    discount: float = 0.99
    """gamma of the objective sum_t gamma^t r_t."""
    reward_to_go: bool = True
    """Weight each score by the rewards from its step on (True) or by the whole return (False)."""
    baseline: str = "leave_one_out"
    """One of: none, batch_mean, leave_one_out, value, optimal (see the module docstring)."""
    advantage: str = "monte_carlo"
    """monte_carlo: the return (reward_to_go) minus the baseline; gae: GAE(gae_lambda) from the
    value critic (needs baseline=value)."""
    gae_lambda: float = 0.95
    """lambda of GAE (advantage=gae) and of its critic's TD(lambda) targets."""
    normalize_advantages: bool = False
    """Standardise the advantages over the (mini)batch (PPO's practice; biases the gradient)."""
    finite_horizon: bool = False
    """advantage=gae: the objective ends at the horizon (comparisons: the critic sees the steps
    left, no bootstrap after the horizon, advantages weighted by w_t). False: PPO's training."""
    clip_ratio: float = 0.2
    """epsilon of the clipped importance ratio when a batch is reused (training epochs > 1)."""
    entropy_cost: float = 0.0
    """Weight of the policy's entropy added to the objective (0: the plain gradient)."""
    rollouts_per_state: int = 1
    """k rollouts from each start state; above 1 they form the leave-one-out pools."""
    critic_hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layers of the value critic's MLP (baseline='value')."""
    critic_learning_rate: float = 1e-3
    """Adam learning rate of the value critic."""
    critic_betas: tuple[float, float] = (0.7, 0.95)
    """Adam's beta1 and beta2 for the value critic."""
    critic_iterations: int = 8
    """Passes over the batch per fit of the value critic."""
    critic_minibatches: int = 4
    """Minibatches per pass of a value-critic fit (one Adam step each)."""

    def __post_init__(self):
        check_positive_int("horizon", self.horizon)
        check_unit_interval("discount", self.discount)
        check_choice("baseline", self.baseline, BASELINES)
        check_choice("advantage", self.advantage, ADVANTAGES)
        if self.advantage == "gae" and self.baseline != "value":
            raise SettingError(f"advantage='gae' needs the value critic: baseline='value', not "
                               f"baseline={self.baseline!r}")
        check_unit_interval("gae_lambda", self.gae_lambda)
        check_positive("clip_ratio", self.clip_ratio)
        check_non_negative("entropy_cost", self.entropy_cost)
        check_positive_int("rollouts_per_state", self.rollouts_per_state)
        check_critic_fit(self)


@dataclasses.dataclass(frozen=True)
class ReinforceSettings(ScoreFunctionSettings):
    """The score-function estimator (REINFORCE) with its baselines, reward-to-go and GAE."""


@dataclasses.dataclass(frozen=True)
class PpoSettings(ScoreFunctionSettings):
    """Proximal policy optimisation: GAE advantages from a value critic, normalised, and each
    batch reused for several epochs with the clipped importance ratio (Schulman et al. 2017)."""

    baseline: str = "value"
    """One of: none, batch_mean, leave_one_out, value, optimal (see diffpg.estimators.reinforce)."""
    advantage: str = "gae"
    """monte_carlo: the return minus the baseline; gae: GAE(gae_lambda) from the value critic."""
    normalize_advantages: bool = True
    """Standardise the advantages over the (mini)batch (PPO's practice; biases the gradient)."""
    clip_ratio: float = 0.3
    """epsilon of the clipped importance ratio when a batch is reused (Brax's PPO default)."""


class ReinforceExtras(NamedTuple):
    """Per-step data of a REINFORCE batch, ``[T, B]`` each."""

    log_prob: jax.Array  # log pi_behaviour(u_t | s_t) of the collecting policy
    advantage: jax.Array  # A_t of the module docstring (before any normalisation)
    value_target: jax.Array  # the value critic's regression target (0 without a critic)


def score_function_gradient(
    policy: Policy,
    params: Params,
    obs_stats: RunningStatistics,
    transitions: Transitions,
    settings: ScoreFunctionSettings,
    value_baseline: jax.Array | None = None,
    behaviour_log_prob: jax.Array | None = None,
    per_rollout: bool = False,
) -> tuple[Params, jax.Array]:
    """The Monte-Carlo REINFORCE estimate of ``grad J`` from a batch of ``n`` rollouts ``[T, n]``.

    ``value_baseline [T, n]``: ``V(s_t)`` for ``baseline='value'``. ``behaviour_log_prob [T, n]``:
    ``log pi_behaviour(u_t | s_t)`` of the policy that collected the data, to reweight stale data
    per decision (requires ``reward_to_go``); ``None`` means the data is from ``params`` itself.
    Returns the gradient (tree of ``params``) and the per-rollout objective ``sum_t w_t r_t [n]``.
    With ``per_rollout=True`` the gradient has a leading axis ``[n]``: each rollout's term, whose
    mean is the estimate (terms share their baselines, so they are not independent).
    """
    obs = normalize(obs_stats, transitions.obs)
    weights = returns.segment_discounts(transitions.done, settings.discount)
    if settings.baseline == "optimal":
        step_ratio, psi = _ratio_and_return(policy, params, obs, transitions, settings, weights,
                                            behaviour_log_prob)
        pool = _pool_size(settings, transitions.reward.shape[1])
        grad = _optimal_baseline_gradient(policy, params, obs, transitions, psi, step_ratio, pool,
                                          per_rollout)
    else:
        coefficient = monte_carlo_advantage(policy, params, obs, transitions, settings, weights,
                                            value_baseline, behaviour_log_prob)
        grad = _score_gradient(policy, params, obs, transitions.raw_action, coefficient,
                               per_rollout)
    return grad, jnp.sum(weights * transitions.reward, axis=0)


def monte_carlo_advantage(policy, params, obs, transitions, settings, weights, value_baseline=None,
                          behaviour_log_prob=None) -> jax.Array:
    """``A_t = psi_t - rho_{0:t} b_t`` ``[T, n]`` for the baselines other than ``optimal``."""
    step_ratio, psi = _ratio_and_return(policy, params, obs, transitions, settings, weights,
                                        behaviour_log_prob)
    pool = _pool_size(settings, transitions.reward.shape[1])
    baseline = _baseline(settings.baseline, psi, weights, value_baseline, pool)
    return jax.lax.stop_gradient(psi - step_ratio * baseline)


def _ratio_and_return(policy, params, obs, transitions, settings, weights, behaviour_log_prob):
    """Per-decision ratios ``rho_{0:t}`` and ``psi_t`` (module docstring), ``[T, n]`` each."""
    weighted_reward = weights * transitions.reward
    if behaviour_log_prob is None:
        step_ratio = jnp.ones_like(weighted_reward)
    else:
        if not settings.reward_to_go:
            raise SettingError("importance weights need reward_to_go=True (per-decision weights)")
        log_ratio = policy.log_prob(jax.lax.stop_gradient(params), obs, transitions.raw_action)
        log_ratio = log_ratio - behaviour_log_prob
        step_ratio = jnp.exp(returns.episode_cumsum(log_ratio, transitions.done))
    if settings.reward_to_go:
        psi = returns.reward_to_go(step_ratio * weighted_reward, transitions.done)
    else:
        psi = returns.episode_total(weighted_reward, transitions.done)
    return step_ratio, psi


def _score_gradient(policy, params, obs, raw_action, coefficient, per_rollout=False) -> Params:
    """``(1/n) sum_b sum_t coefficient_t grad log pi(u_t | s_t)``; per rollout ``[n, ...]``."""
    num_rollouts = coefficient.shape[1]
    if per_rollout:
        def rollout_term(p, obs_i, raw_i, coefficient_i):
            return jnp.sum(coefficient_i * policy.log_prob(p, obs_i, raw_i))

        return jax.vmap(jax.grad(rollout_term), (None, 1, 1, 1))(params, obs, raw_action,
                                                                 coefficient)
    return jax.grad(lambda p: jnp.sum(coefficient * policy.log_prob(p, obs, raw_action))
                    / num_rollouts)(params)


def _pool_size(settings: ScoreFunctionSettings, num_rollouts: int) -> int:
    pool = settings.rollouts_per_state if settings.rollouts_per_state > 1 else num_rollouts
    if settings.baseline in ("leave_one_out", "optimal") and pool < 2:
        raise SettingError(
            f"baseline={settings.baseline!r} needs at least 2 rollouts per pool, got {pool}: "
            "use a batch of 2 or more states or rollouts_per_state >= 2"
        )
    if settings.baseline == "batch_mean" and num_rollouts < 2:
        raise SettingError("baseline='batch_mean' of 1 rollout is its own return, so every "
                           "estimate is 0; use a batch of 2 or more states or another baseline")
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
            raise SettingError("baseline='value' needs value_baseline")
        return weights * value_baseline
    raise SettingError(f"baseline={kind!r} is not allowed; allowed values: {list(BASELINES)}")


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


def _standardize(advantage: jax.Array) -> jax.Array:
    return (advantage - jnp.mean(advantage)) / (jnp.std(advantage) + 1e-8)


def entropy_gradient(policy: Policy, params: Params, obs: jax.Array, entropy_cost: float
                     ) -> Params:
    """``entropy_cost * grad (1/n) sum_b sum_t H(pi(.|s_t))`` for ``obs [T, n, obs]``."""
    def total_entropy(p):
        _, std = policy.distribution(p, obs)
        return jnp.sum(jnp.log(std)) / obs.shape[1]  # Gaussian entropy up to a constant

    return jax.tree.map(lambda g: entropy_cost * g, jax.grad(total_entropy)(params))


def gae_advantage(tr: Transitions, value: jax.Array, next_value: jax.Array,
                  weights: jax.Array, settings: ScoreFunctionSettings
                  ) -> tuple[jax.Array, jax.Array]:
    """GAE advantages and their value targets ``[T, n]``: the TD(lambda) return ``G^lambda_t``
    from the critic's ``next_value`` (0 after the objective's last step with a finite horizon)
    and ``A_t = G^lambda_t - V(s_t)``, weighted by ``w_t`` for the finite-horizon objective."""
    if settings.finite_horizon:  # nothing is left after the objective's last step
        next_value = next_value.at[-1].set(0.0)
    target = returns.td_lambda_targets(tr.reward, next_value, tr.termination, tr.done,
                                       settings.discount, settings.gae_lambda)
    advantage = target - value
    return (weights * advantage if settings.finite_horizon else advantage), target


def clipped_surrogate_gradient(policy: Policy, params: Params, obs: jax.Array,
                               raw_action: jax.Array, old_log_prob: jax.Array,
                               advantage: jax.Array, clip_ratio: float
                               ) -> tuple[Params, jax.Array]:
    """PPO's gradient at ``params`` of ``(1/n) sum min(rho A, clip(rho, 1 -+ eps) A)`` with
    ``rho = pi_params(u | s) / pi_old(u | s)``, and the share of ratios outside the clip."""
    def surrogate(p):
        ratio = jnp.exp(policy.log_prob(p, obs, raw_action) - old_log_prob)
        clipped = jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
        return jnp.sum(jnp.minimum(ratio * advantage, clipped * advantage)) / obs.shape[1]

    ratio = jnp.exp(policy.log_prob(params, obs, raw_action) - old_log_prob)
    return jax.grad(surrogate)(params), jnp.mean(jnp.abs(ratio - 1.0) > clip_ratio)


def make_value_baseline(policy: Policy, settings: ScoreFunctionSettings) -> ValueFunction:
    """The value critic's MLP. The Monte-Carlo baseline's target is the return to the end of the
    horizon (no bootstrap), which depends on the steps left: that critic sees them. GAE's critic
    is the bootstrapped, time-independent V(s), unless the objective ends at the horizon."""
    timeless = settings.advantage == "gae" and not settings.finite_horizon
    return make_mlp_value_function(policy.observation_size, settings.critic_hidden_sizes,
                                   time_scale=None if timeless else settings.horizon)


def fit_value_baseline(value_function: ValueFunction, optimizer, settings: ScoreFunctionSettings,
                     steps_left: jax.Array, obs_stats: RunningStatistics, critic: CriticState,
                     batch: Batch, key: jax.Array) -> tuple[CriticState, dict]:
    """Regress the value critic on the batch's targets (``ReinforceExtras.value_target``), the
    steps left ``steps_left [T, 1]`` as its time input; how much of their variance it explained
    before fitting is a metric."""
    obs = normalize(obs_stats, batch.transitions.obs)
    steps = jnp.broadcast_to(steps_left, obs.shape[:-1])
    targets = batch.extras.value_target
    explained = explained_variance(value_function.apply(critic.params, obs, steps), targets)
    critic, loss = fit_mean_squared_error(
        critic, value_function.apply, (obs, steps), targets, optimizer,
        key, settings.critic_iterations, settings.critic_minibatches)
    return critic, {"value_loss": loss, "critic_explained_variance": explained}


def reused_batch_gradient(policy: Policy, settings: ScoreFunctionSettings, params: Params,
                          obs_stats: RunningStatistics, batch: Batch) -> tuple[Params, dict]:
    """PPO's clipped surrogate at ``params`` on a batch collected earlier (its log-probabilities
    and advantages in ``ReinforceExtras``), with the entropy term."""
    tr, extras = batch
    obs = normalize(obs_stats, tr.obs)
    advantage = (_standardize(extras.advantage) if settings.normalize_advantages
                 else extras.advantage)
    grad, clipped_share = clipped_surrogate_gradient(
        policy, params, obs, tr.raw_action, extras.log_prob, advantage, settings.clip_ratio)
    if settings.entropy_cost:
        grad = jax.tree.map(jnp.add, grad,
                            entropy_gradient(policy, params, obs, settings.entropy_cost))
    return grad, {"clipped_ratio_share": clipped_share}


def make_reinforce(
    env: Environment,
    policy: Policy,
    settings: ScoreFunctionSettings = ReinforceSettings(),
    value_function: ValueFunction | None = None,
) -> Estimator:
    """Build the REINFORCE estimator (see the module docstring for the estimate).

    ``value_function`` replaces the learned MLP value critic (e.g. an exact one in tests).
    """
    uses_value = settings.baseline == "value"
    gae = settings.advantage == "gae"
    if value_function is None:
        value_function = make_value_baseline(policy, settings)
    optimizer = make_critic_optimizer(settings.critic_learning_rate, settings.critic_betas)
    steps_left = settings.horizon - np.arange(settings.horizon)[:, None]  # [T, 1]

    def init(key: jax.Array, policy_params: Params) -> CriticState | None:
        del policy_params
        return init_critic_state(value_function.init(key), optimizer) if uses_value else None

    def value_of(critic, obs, after_step: bool = False):
        """``V [T, n]`` of the states ``obs [T, n, obs]`` reached before (or after) each step."""
        steps = steps_left - 1 if after_step else steps_left
        return value_function.apply(critic.params, obs, jnp.broadcast_to(steps, obs.shape[:-1]))

    def advantage_and_target(params, obs_stats, critic, tr, obs, weights):
        """The advantages ``[T, n]`` the scores are weighted by, and the critic's targets."""
        if gae:
            return gae_advantage(tr, value_of(critic, obs),
                                 value_of(critic, normalize(obs_stats, tr.next_obs), True),
                                 weights, settings)
        if uses_value:  # the Monte-Carlo return from each step to the end of the horizon
            return (monte_carlo_advantage(policy, params, obs, tr, settings, weights,
                                          value_of(critic, obs)),
                    returns.reward_to_go(tr.reward, tr.done, settings.discount))
        return (monte_carlo_advantage(policy, params, obs, tr, settings, weights),
                jnp.zeros_like(tr.reward))

    def estimate(params: Params, obs_stats: RunningStatistics, critic: CriticState | None,
                 env_state: State, key: jax.Array) -> Estimate:
        start = repeat_states(env_state, settings.rollouts_per_state)
        data_params = jax.lax.stop_gradient(params)
        final_state, tr = unroll(env, policy, data_params, obs_stats, start, key,
                                 settings.horizon)
        obs = normalize(obs_stats, tr.obs)
        weights = returns.segment_discounts(tr.done, settings.discount)
        log_prob = policy.log_prob(data_params, obs, tr.raw_action)
        if settings.baseline == "optimal":  # per coordinate: not one number per step
            grad, _ = score_function_gradient(policy, params, obs_stats, tr, settings)
            advantage, value_target = jnp.zeros_like(tr.reward), jnp.zeros_like(tr.reward)
        else:
            advantage, value_target = advantage_and_target(params, obs_stats, critic, tr, obs,
                                                           weights)
            coefficient = _standardize(advantage) if settings.normalize_advantages else advantage
            grad = _score_gradient(policy, params, obs, tr.raw_action,
                                   jax.lax.stop_gradient(coefficient))
            if settings.entropy_cost:
                grad = jax.tree.map(jnp.add, grad, entropy_gradient(policy, params, obs,
                                                                    settings.entropy_cost))
        end_state = jax.tree.map(lambda x: x[:: settings.rollouts_per_state], final_state)
        extras = jax.lax.stop_gradient(ReinforceExtras(log_prob, advantage, value_target))
        objective = jnp.mean(jnp.sum(weights * tr.reward, axis=0))
        return Estimate(grad, Batch(tr, extras), end_state, {"objective": objective})

    def update(params, obs_stats, critic, batch, key):
        del params
        return fit_value_baseline(value_function, optimizer, settings, steps_left, obs_stats,
                                  critic, batch, key)

    def reuse(params, obs_stats, critic, batch, key):
        del critic, key
        return reused_batch_gradient(policy, settings, params, obs_stats, batch)

    can_reuse = settings.baseline != "optimal" and settings.rollouts_per_state == 1
    return Estimator(init, estimate, update if uses_value else learns_nothing, settings,
                     reuse if can_reuse else None)


register("reinforce", ReinforceSettings, make_reinforce,
         # On-policy actor with a learned value baseline on reward-to-go (A2C-like).
         training={"baseline": "value", "reward_to_go": True},
         # Leave-one-out REINFORCE is unbiased on any env and learns nothing first.
         reference=True, family="score function")
register("ppo", PpoSettings, make_reinforce, family="score function",
         # For comparisons: GAE for the finite-horizon objective, advantages not standardised
         # (unbiased with the true value; a learned critic's error is its bias).
         comparison=lambda horizon: {"finite_horizon": True, "normalize_advantages": False},
         # The settings of Brax's published PPO runs (discount 0.97, entropy cost 1e-2, Adam at a
         # constant 3e-4, no gradient clipping, 4 epochs of minibatch steps on each batch), with
         # the batch cut into 4 minibatches of environments.
         training={"entropy_cost": 1e-2, "horizon": 16, "discount": 0.97},
         trainer={"learning_rate": 3e-4, "final_learning_rate": 3e-4, "betas": (0.9, 0.999),
                  "grad_clip": None, "epochs": 4, "minibatches": 4})
