"""SAPO: SHAC's windowed backpropagation through the simulator for the maximum-entropy objective,
with twin critics and a learned temperature (Xing et al. 2024, "Stabilizing reinforcement learning
in differentiable multiphysics simulation"; ``etaoxing/mineral``).

Each differentiated window's rewards gain the entropy bonus of the action taken,
``r_t + alpha h_t`` with ``h_t = -log pi(a_t | s_t)`` of the action the environment receives,
reparameterised (``u = mean + std * eps``, ``a = tanh(u)`` when the policy squashes)::

    h_t = sum_j [ log std_j + eps_j^2 / 2 + log(2 pi) / 2 + log(1 - tanh(u_j)^2) ]

(the last term only when squashing; it is the change of variables of the tanh), so the entropy's
gradient reaches the log-std, and through the tanh the mean and the dynamics. The bootstrap is the
smallest of ``critic_members`` value critics (no target network: ``target_critic_keep = 0``),
each fitted by ``update`` to the same TD(lambda) targets of the entropy-augmented rewards. The
temperature ``alpha = exp(log_alpha)`` is learned by ``update``: one Adam step on
``alpha (mean h - target_entropy)`` (raising ``alpha`` when the policy's entropy is below the
target, ``-action_size`` by default), unless ``learn_temperature`` is off (comparisons: a fixed
objective).

The estimate is of ``grad (J + alpha H)``, ``H = E[sum_t w_t h_t]``: biased for the task's ``J`` by
design, by ``alpha grad H``. SAPO's other parts are the policy's (a state-dependent std clamped to
``[-5, 2]``, SiLU with LayerNorm), not the estimator's: here it runs with the shared policy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from diffpg.acting import Transitions
from diffpg.critics import (
    CriticState,
    init_critic_state,
)
from diffpg.envs.core import Environment, SettingError, State
from diffpg.estimators.base import (
    Estimate,
    Estimator,
    check_bool,
    check_positive,
)
from diffpg.estimators.registry import register
from diffpg.estimators.shac import (
    EnsembleCriticSettings,
    fit_value_critic,
    largest_window_at_most,
    make_ensemble_critic,
    windowed_gradient,
)
from diffpg.normalization import RunningStatistics, normalize
from diffpg.policy import Params, Policy


@dataclasses.dataclass(frozen=True)
class SapoSettings(EnsembleCriticSettings):
    """Maximum-entropy backpropagation through windows of the simulation, with twin critics and
    a learned temperature (SAPO, Xing et al. 2024)."""

    window: int | None = None
    """Steps a gradient flows through before it is cut; None means the whole horizon."""
    initial_temperature: float = 0.1
    """alpha at the start: the weight of the entropy bonus."""
    learn_temperature: bool = True
    """Adjust alpha towards target_entropy in update; False keeps it fixed."""
    target_entropy: float | None = None
    """Entropy per step the temperature aims for; None: -action_size (SAPO's default)."""
    temperature_learning_rate: float = 5e-3
    """Adam learning rate of the entropy temperature (log alpha)."""

    def __post_init__(self):
        super().__post_init__()  # also checks window against horizon
        check_positive("initial_temperature", self.initial_temperature)
        check_bool("learn_temperature", self.learn_temperature)
        if self.target_entropy is not None and (
                not isinstance(self.target_entropy, int | float)
                or isinstance(self.target_entropy, bool) or not math.isfinite(self.target_entropy)):
            raise SettingError(f"target_entropy={self.target_entropy!r} must be a finite number "
                               "or None")
        check_positive("temperature_learning_rate", self.temperature_learning_rate)


class SapoState(NamedTuple):
    critic: CriticState
    log_temperature: jax.Array  # scalar log alpha
    temperature_optimizer: optax.OptState


def entropy_bonus(policy: Policy, params: Params, obs_stats: RunningStatistics,
                  transitions: Transitions) -> jax.Array:
    """``h_t = -log pi(a_t | s_t)`` ``[T, B]`` of the module docstring, differentiable in
    ``params`` and through the transitions' raw actions."""
    _, std = policy.distribution(params, normalize(obs_stats, transitions.obs))
    per_dim = jnp.log(std) + 0.5 * jnp.square(transitions.noise) + 0.5 * math.log(2.0 * math.pi)
    if policy.squash:
        u = transitions.raw_action  # log(1 - tanh(u)^2), stably
        per_dim = per_dim + 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.sum(per_dim, axis=-1)


def make_sapo(env: Environment, policy: Policy,
              settings: SapoSettings = SapoSettings()) -> Estimator:
    """Build the SAPO estimator (see the module docstring)."""
    shac_settings = settings.as_shac()
    critics, critic_optimizer = make_ensemble_critic(policy.observation_size, settings)
    temperature_optimizer = optax.adam(settings.temperature_learning_rate, b1=0.7, b2=0.95)
    target_entropy = (-float(policy.action_size) if settings.target_entropy is None
                      else settings.target_entropy)

    def init(key: jax.Array, policy_params: Params) -> SapoState:
        del policy_params
        log_temperature = jnp.asarray(math.log(settings.initial_temperature), jnp.float32)
        return SapoState(init_critic_state(critics.init(key), critic_optimizer), log_temperature,
                         temperature_optimizer.init(log_temperature))

    def estimate(params: Params, obs_stats: RunningStatistics, state: SapoState,
                 env_state: State, key: jax.Array) -> Estimate:
        temperature = jax.lax.stop_gradient(jnp.exp(state.log_temperature))
        target = jax.lax.stop_gradient(state.critic.target_params)

        def value(obs, steps_left):
            return critics.apply(target, normalize(obs_stats, obs), steps_left)

        def bonus(p, transitions):
            return temperature * entropy_bonus(policy, p, obs_stats, transitions)

        out = windowed_gradient(env, policy, shac_settings, params, obs_stats, value, env_state,
                                key, reward_bonus=bonus)
        return out._replace(metrics=out.metrics | {"temperature": temperature})

    def update(params, obs_stats, state: SapoState, batch, key):
        tr = batch.transitions
        temperature = jnp.exp(state.log_temperature)
        entropy = jax.lax.stop_gradient(entropy_bonus(policy, params, obs_stats, tr))
        augmented = tr._replace(reward=tr.reward + temperature * entropy)
        critic, metrics = fit_value_critic(critics, critic_optimizer, shac_settings, obs_stats,
                                           state.critic, augmented, key,
                                           predict=critics.apply_each)
        log_temperature, optimizer_state = state.log_temperature, state.temperature_optimizer
        if settings.learn_temperature:
            gap = jnp.mean(entropy) - target_entropy
            step, optimizer_state = temperature_optimizer.update(
                jnp.exp(log_temperature) * gap, optimizer_state)  # d/dlog_alpha of alpha * gap
            log_temperature = optax.apply_updates(log_temperature, step)
        metrics = metrics | {"entropy": jnp.mean(entropy), "temperature": temperature}
        return SapoState(critic, log_temperature, optimizer_state), metrics

    return Estimator(init, estimate, update, settings)


def _comparison(horizon: int) -> dict:
    """The comparison's SAPO: SHAC's, with a fixed temperature (one objective throughout)."""
    return largest_window_at_most(4)(horizon) | {"learn_temperature": False}


register("sapo", SapoSettings, make_sapo, comparison=_comparison, family="pathwise")
