"""Critic backprop: the pathwise gradient through a learned action-value function (SAC/DDPG style).

With the reparameterised action ``a_t = f_theta(s_t, eps_t)`` (``tanh(mean + std * eps)`` for a
squashed policy) the policy gradient theorem reads (Heess et al. 2015, SVG(0))::

    grad J = E[ sum_t w_t  d/dtheta Q_t(s_t, f_theta(s_t, eps_t)) ]

with the gradient taken through the action only (states and ``eps`` held fixed), ``Q_t`` the value
of taking ``a`` at ``s_t`` with the rest of the horizon to go, and ``w`` the episode-wise discounts.
The states and noise are those of a fresh rollout of the current policy; no gradient flows through
the dynamics. With the true ``Q`` this is exact; with a learned one it is biased by the critic's
error in ``dQ/da``. ``deterministic=True`` differentiates through the mean action instead (DDPG).

The critic is trained by ``update``, after the gradient is taken, by TD with a target network:
``y = r + gamma (1 - term) Q_target(s', f_theta(s', eps'))`` with fresh noise ``eps'`` (a
semi-gradient, not a gradient of any loss), then Polyak averaging. The learned critic
ignores the time left, as SAC's does. Its data is either the estimate's own rollout
(``replay_capacity=0``: on-policy, what a comparison on fixed states wants) or, as in SAC and DDPG,
minibatches drawn from a replay buffer of the last ``replay_capacity`` transitions (off-policy:
the training default, ``diffpg.train``). The policy gradient itself is always taken on the fresh
rollout's states, so it estimates ``grad J`` of the current policy in both cases.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffpg import returns
from diffpg.acting import Transitions, unroll
from diffpg.critics import (
    CriticState,
    QFunction,
    fit_mean_squared_error,
    init_critic_state,
    make_critic_optimizer,
    make_mlp_q_function,
    regression_step,
    update_target,
)
from diffpg.envs.core import Environment, SettingError, State
from diffpg.estimators.base import (
    Batch,
    Estimate,
    Estimator,
    check_critic_fit,
    check_positive_int,
    check_unit_interval,
)
from diffpg.estimators.registry import register
from diffpg.normalization import RunningStatistics, normalize
from diffpg.policy import Params, Policy
from diffpg.replay import ReplayBuffer, ReplayData, add, init_replay, sample


@dataclasses.dataclass(frozen=True)
class CriticBackpropSettings:
    """The pathwise gradient through a learned Q(s, a) with the reparameterised action (SAC/DDPG
    style)."""

    horizon: int = 32
    """Steps simulated per estimate."""
    discount: float = 0.99
    """gamma, the discount of the objective J = E[sum_t gamma^t r_t]."""
    deterministic: bool = False
    """Differentiate through the mean action (DDPG) instead of the sampled one (SAC)."""
    critic_hidden_sizes: tuple[int, ...] = (64, 64)
    critic_learning_rate: float = 1e-3
    """Adam learning rate of the critic(s)."""
    critic_betas: tuple[float, float] = (0.9, 0.999)
    critic_iterations: int = 8
    """Passes over the batch per critic fit."""
    critic_minibatches: int = 4
    """Minibatches per pass of a critic fit (one Adam step each)."""
    target_critic_keep: float = 0.9
    """target <- keep * target + (1 - keep) * critic after each estimate's critic fit."""
    finite_horizon: bool = False
    """Learn the finite-horizon Q of the objective: the critic sees the steps left and TD targets
    stop bootstrapping at the horizon (for comparisons). False: SAC's time-independent critic."""
    replay_capacity: int = 0
    """Transitions kept for the critic; 0: fit on each estimate's own rollout (on-policy)."""
    replay_batch_size: int = 256
    """Transitions per critic step drawn from the buffer (with replay, each fit takes
    critic_iterations x critic_minibatches steps)."""

    def __post_init__(self):
        check_positive_int("horizon", self.horizon)
        if not isinstance(self.replay_capacity, int) or self.replay_capacity < 0:
            raise SettingError(f"replay_capacity={self.replay_capacity!r} must be an integer >= 0 "
                               "(0: no replay buffer)")
        check_positive_int("replay_batch_size", self.replay_batch_size)
        if self.replay_capacity and self.replay_batch_size > self.replay_capacity:
            # A draw no larger than the buffer is also no larger in memory than the buffer,
            # which the run's memory check counts (diffpg.training.check_state_memory).
            raise SettingError(f"replay_batch_size={self.replay_batch_size} is more transitions "
                               f"than the buffer keeps (replay_capacity={self.replay_capacity}); "
                               f"allowed: 1..{self.replay_capacity}")
        if self.replay_capacity and self.finite_horizon:
            raise SettingError("finite_horizon=True needs each transition's steps left, which the "
                               "replay buffer does not keep; allowed: replay_capacity=0 with it")
        check_unit_interval("discount", self.discount)
        check_critic_fit(self)


class CriticBackpropState(NamedTuple):
    """The Q critic (with its target copy) and, with ``replay_capacity``, the replay buffer."""

    critic: CriticState
    replay: ReplayBuffer | None


def reparameterised_action(policy: Policy, deterministic: bool, params: Params,
                           obs: jax.Array, noise: jax.Array) -> jax.Array:
    """``f_theta(s, eps)``: the policy's action for standard-normal ``noise`` (its mode when
    ``deterministic``), differentiable in ``params``."""
    if deterministic:
        return policy.mode(params, obs)
    return policy.to_action(policy.raw_from_noise(params, obs, noise))


def q_targets(q_function: QFunction, policy: Policy, settings: CriticBackpropSettings,
              params: Params, critic: CriticState, next_obs: jax.Array, reward: jax.Array,
              termination: jax.Array, steps_left: jax.Array, key: jax.Array) -> jax.Array:
    """``r + gamma (1 - term) Q_target(s', f_theta(s', eps'))`` on normalised ``next_obs``, with
    fresh noise ``eps'`` (nothing after the objective's last step with a finite horizon)."""
    next_noise = jax.random.normal(key, next_obs.shape[:-1] + (policy.action_size,))
    next_action = reparameterised_action(policy, settings.deterministic, params, next_obs,
                                         next_noise)
    next_q = q_function.apply(critic.target_params, next_obs, next_action, steps_left - 1)
    continues = 1.0 - termination
    if settings.finite_horizon:
        continues = continues * (steps_left > 1)
    return reward + settings.discount * continues * next_q


def finite_rows(batch: ReplayData) -> tuple[ReplayData, jax.Array]:
    """The replay minibatch with its non-finite rows zeroed, and which rows were finite ``[N]``:
    a stored blow-up would stay in the buffer for a long time, so such rows are left out of the
    loss instead of skipping steps."""
    valid = jnp.ones_like(batch.reward, dtype=bool)
    for leaf in batch:
        valid &= jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
    return jax.tree.map(
        lambda x: jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0), batch), valid


def fit_q_on_replay(q_function: QFunction, optimizer, settings: CriticBackpropSettings,
                    targets_of, obs_stats: RunningStatistics, critic: CriticState, replay,
                    key: jax.Array) -> tuple[CriticState, jax.Array]:
    """``critic_iterations x critic_minibatches`` critic steps on minibatches drawn from the
    buffer, with ``targets_of(critic, next_obs, reward, termination, steps_left, key)`` (the
    target critic's TD targets); returns the critic and the mean loss."""

    def loss_fn(p, data):
        obs, action, targets, valid = data
        prediction = q_function.apply(p, obs, action, jnp.zeros_like(targets))
        squared = jnp.where(valid, jnp.square(prediction - targets), 0.0)
        return jnp.sum(squared) / jnp.maximum(jnp.sum(valid), 1)

    def one_step(carry, step_key):
        critic_params, opt_state = carry
        key_sample, key_next = jax.random.split(step_key)
        batch, valid = finite_rows(sample(replay, key_sample, settings.replay_batch_size))
        obs, next_obs = normalize(obs_stats, batch.obs), normalize(obs_stats, batch.next_obs)
        targets = jax.lax.stop_gradient(targets_of(
            critic, next_obs, batch.reward, batch.termination, jnp.zeros_like(batch.reward),
            key_next))
        critic_params, opt_state, loss = regression_step(
            loss_fn, optimizer, critic_params, opt_state, (obs, batch.action, targets, valid))
        return (critic_params, opt_state), loss

    steps = settings.critic_iterations * settings.critic_minibatches
    (critic_params, opt_state), losses = jax.lax.scan(
        one_step, (critic.params, critic.opt_state), jax.random.split(key, steps))
    return critic._replace(params=critic_params, opt_state=opt_state), jnp.mean(losses)


def make_critic_backprop(
    env: Environment,
    policy: Policy,
    settings: CriticBackpropSettings = CriticBackpropSettings(),
    q_function: QFunction | None = None,
) -> Estimator:
    """Build the critic-backprop estimator; ``q_function`` replaces the learned MLP Q."""
    if q_function is None:
        q_function = make_mlp_q_function(
            policy.observation_size, policy.action_size, settings.critic_hidden_sizes,
            time_scale=settings.horizon if settings.finite_horizon else None,
        )
    optimizer = make_critic_optimizer(settings.critic_learning_rate, settings.critic_betas)

    action_from = functools.partial(reparameterised_action, policy, settings.deterministic)

    def init(key: jax.Array, policy_params: Params) -> CriticBackpropState:
        del policy_params
        critic = init_critic_state(q_function.init(key), optimizer)
        replay = None
        if settings.replay_capacity:
            replay = init_replay(settings.replay_capacity, policy.observation_size,
                                 policy.action_size)
        return CriticBackpropState(critic, replay)

    def td_targets(params, critic, next_obs, reward, termination, steps_left, key):
        return q_targets(q_function, policy, settings, params, critic, next_obs, reward,
                         termination, steps_left, key)

    def fit_on_rollout(params, obs_stats, critic, tr: Transitions, key):
        key_next, key_fit = jax.random.split(key)
        obs, next_obs = normalize(obs_stats, tr.obs), normalize(obs_stats, tr.next_obs)
        steps_left = jnp.broadcast_to(steps_left_per_step, tr.reward.shape)
        targets = td_targets(params, critic, next_obs, tr.reward, tr.termination, steps_left,
                             key_next)
        return fit_mean_squared_error(
            critic, q_function.apply, (obs, policy.to_action(tr.raw_action), steps_left),
            targets, optimizer, key_fit, settings.critic_iterations, settings.critic_minibatches,
        )

    steps_left_per_step = settings.horizon - np.arange(settings.horizon)[:, None]  # [T, 1]

    def estimate(params: Params, obs_stats: RunningStatistics, state: CriticBackpropState,
                 env_state: State, key: jax.Array) -> Estimate:
        end_state, tr = unroll(env, policy, jax.lax.stop_gradient(params), obs_stats, env_state,
                               key, settings.horizon)
        obs = normalize(obs_stats, tr.obs)
        weights = returns.segment_discounts(tr.done, settings.discount)
        steps_left = jnp.broadcast_to(steps_left_per_step, tr.reward.shape)
        critic_params = jax.lax.stop_gradient(state.critic.params)
        num_envs = tr.reward.shape[1]

        def surrogate(p):
            q = q_function.apply(critic_params, obs, action_from(p, obs, tr.noise), steps_left)
            return jnp.sum(weights * q) / num_envs

        grad = jax.grad(surrogate)(params)
        objective = jnp.mean(jnp.sum(weights * tr.reward, axis=0))
        return Estimate(grad, Batch(tr), end_state, {"objective": objective})

    def update(params, obs_stats, state: CriticBackpropState, batch: Batch, key):
        tr = batch.transitions
        if state.replay is None:
            critic, loss = fit_on_rollout(params, obs_stats, state.critic, tr, key)
            replay = None
        else:
            flat = ReplayData(tr.obs, policy.to_action(tr.raw_action), tr.reward,
                              tr.termination, tr.next_obs)
            replay = add(state.replay, jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]),
                                                    flat))
            critic, loss = fit_q_on_replay(
                q_function, optimizer, settings, functools.partial(td_targets, params),
                obs_stats, state.critic, replay, key)
        critic = update_target(critic, settings.target_critic_keep)
        return CriticBackpropState(critic, replay), {"critic_loss": loss}

    return Estimator(init, estimate, update, settings)


register("critic_backprop", CriticBackpropSettings, make_critic_backprop, family="critic",
         comparison=lambda horizon: {"finite_horizon": True},
         # Off-policy critic fitted on a replay buffer, as SAC and DDPG train it.
         training={"replay_capacity": 1 << 17, "replay_batch_size": 256,
                   "critic_iterations": 16})
