"""The one stochastic policy interface every estimator uses.

A policy is a Gaussian over a *raw* action ``u`` with an optional tanh squashing of the action sent
to the environment::

    u = mean_theta(obs) + std_theta * eps,   eps ~ N(0, I)      (reparameterised sample)
    action = tanh(u) if squash else u

``log_prob(params, obs, u)`` is the Gaussian log-density of the raw action. For a squashed policy the
density of ``action`` differs from it by ``-sum log(1 - tanh(u)^2)``, a term that does not depend on
the parameters once ``u`` is fixed; so scores ``grad log pi`` and importance ratios are the same with
either density, and working with ``u`` avoids ``atanh`` of actions near +-1.

``log_prob`` stops gradients through ``u``: differentiating ``log_prob(sample(params, ...))`` with
respect to ``params`` then gives the score ``grad_theta log pi(u | s)``, never the identically-zero
pathwise derivative of the log-density of its own reparameterised sample (the "zero score-function"
trap of ``sample_and_log_prob`` APIs).

Two constructors share this interface:

* ``make_gaussian_mlp_policy``: MLP mean, state-independent log-std (SHAC's actor).
* ``make_linear_gaussian_policy``: ``mean = gain @ obs + bias``, for the linear-quadratic regulator
  whose expected return has a closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffpg.envs.core import SettingError
from diffpg.networks import MLP, check_activation

Params = Any


class Policy(NamedTuple):
    """A Gaussian policy, as pure functions of explicit parameters.

    Attributes:
      init: ``key -> params``.
      distribution: ``(params, obs [..., obs_size]) -> (mean [..., act], std [..., act])`` of the
        raw action.
      observation_size, action_size: the sizes the policy was built for.
      squash: whether the environment receives ``tanh(u)`` instead of ``u``.
    """

    init: Callable[[jax.Array], Params]
    distribution: Callable[[Params, jax.Array], tuple[jax.Array, jax.Array]]
    observation_size: int
    action_size: int
    squash: bool

    def sample(self, params: Params, obs: jax.Array, key: jax.Array) -> jax.Array:
        """Reparameterised raw action ``u [..., act] = mean + std * eps``; differentiable in params."""
        mean, std = self.distribution(params, obs)
        return mean + std * jax.random.normal(key, mean.shape, mean.dtype)

    def raw_from_noise(self, params: Params, obs: jax.Array, noise: jax.Array) -> jax.Array:
        """``u = mean + std * noise`` for a given standard-normal ``noise`` (pathwise estimators)."""
        mean, std = self.distribution(params, obs)
        return mean + std * noise

    def log_prob(self, params: Params, obs: jax.Array, raw_action: jax.Array) -> jax.Array:
        """``log N(u; mean, std^2)`` summed over action dims, ``[...]``; no gradient through ``u``."""
        raw_action = jax.lax.stop_gradient(raw_action)
        mean, std = self.distribution(params, obs)
        z = (raw_action - mean) / std
        per_dim = -0.5 * jnp.square(z) - jnp.log(std) - 0.5 * math.log(2.0 * math.pi)
        return jnp.sum(per_dim, axis=-1)

    def to_action(self, raw_action: jax.Array) -> jax.Array:
        """The action the environment receives for raw action ``u``."""
        return jnp.tanh(raw_action) if self.squash else raw_action

    def mode(self, params: Params, obs: jax.Array) -> jax.Array:
        """Deterministic action (the mean, squashed if the policy squashes); for evaluation."""
        mean, _ = self.distribution(params, obs)
        return self.to_action(mean)


def make_gaussian_mlp_policy(
    observation_size: int,
    action_size: int,
    hidden_sizes: Sequence[int] = (64, 64),
    activation: str = "elu",
    layer_norm: bool = True,
    squash: bool = True,
    init_log_std: float = -1.0,
) -> Policy:
    """MLP-mean Gaussian with a state-independent log-std initialised at ``init_log_std``.

    Defaults follow SHAC (ELU + LayerNorm, log-std initialised at -1, tanh squashing).
    Parameters: ``{'mean': flax params, 'log_std': [action_size]}``.
    """
    check_activation(activation)
    _check_sizes(observation_size, action_size)
    network = MLP(tuple(hidden_sizes), action_size, activation, layer_norm, output_scale=0.1)

    def init(key: jax.Array) -> Params:
        mean_params = network.init(key, jnp.zeros((observation_size,)))
        return {"mean": mean_params, "log_std": jnp.full((action_size,), init_log_std, dtype=jnp.float32)}

    def distribution(params: Params, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = network.apply(params["mean"], obs)
        std = jnp.broadcast_to(jnp.exp(params["log_std"]), mean.shape)
        return mean, std

    return Policy(init, distribution, observation_size, action_size, squash)


def make_linear_gaussian_policy(
    observation_size: int,
    action_size: int,
    init_log_std: float = -1.0,
    init_gain_scale: float = 0.0,
    squash: bool = False,
) -> Policy:
    """``u = gain @ obs + bias + exp(log_std) * eps``.

    Parameters: ``{'gain': [act, obs], 'bias': [act], 'log_std': [act]}``; the gain starts at
    ``init_gain_scale * N(0, 1) / sqrt(obs)``.
    """
    _check_sizes(observation_size, action_size)

    def init(key: jax.Array) -> Params:
        gain = init_gain_scale * jax.random.normal(key, (action_size, observation_size))
        return {
            "gain": gain / math.sqrt(observation_size),
            "bias": jnp.zeros(action_size),
            "log_std": jnp.full((action_size,), init_log_std, dtype=jnp.float32),
        }

    def distribution(params: Params, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = obs @ params["gain"].T + params["bias"]
        std = jnp.broadcast_to(jnp.exp(params["log_std"]), mean.shape)
        return mean, std

    return Policy(init, distribution, observation_size, action_size, squash)


def _check_sizes(observation_size: int, action_size: int) -> None:
    for name, value in (("observation_size", observation_size), ("action_size", action_size)):
        if not isinstance(value, int) or value <= 0:
            raise SettingError(f"{name}={value!r} must be a positive integer")
