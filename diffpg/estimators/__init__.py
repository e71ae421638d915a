"""Policy-gradient estimators behind one contract.

The contract
------------
An estimator is ``Estimator(init, estimate, settings)``, two pure functions and the frozen settings
they close over (built by ``make(name, env, policy, **settings)``):

* ``init(key, policy_params) -> EstimatorState``: its own state: running observation statistics
  and, where it learns one, a critic with its target copy and optimiser state (``None`` otherwise).
* ``estimate(policy_params, state, env_state, key) -> Estimate(grad, state, env_state, metrics)``:
  from a batch of ``B`` environment states (every leaf has leading axis ``B``) simulate
  ``settings.horizon`` steps and return

  - ``grad``: an estimate of ``grad_theta J(theta)`` with the structure of ``policy_params``, for
    the objective ``J = E[(1/B) sum_b sum_t w_t r_t]``, where ``w_t = gamma^(t - t0)`` is discounted
    from the start ``t0`` of the episode step ``t`` belongs to (environments auto-reset); it is an
    ascent direction (negate it for an optax minimiser);
  - ``state``: the estimator's state after the call (critics fitted on the new data);
  - ``env_state``: the batch after the rollout ``[B]``, for training to continue from;
  - ``metrics``: a flat dict of scalar arrays (``objective``: the batch mean of
    ``sum_t w_t r_t``, plus critic losses where there are critics).

``estimate`` is jit-able and ``jax.vmap``-able over ``key`` (and over states), so independent
estimates on the same start states are ``jax.vmap(estimate, (None, None, None, 0))(..., keys)``:
their mean is the estimator's expectation and their spread its variance (``diffpg.stats``).
Estimators differ only in how they get ``grad``; policies (``diffpg.policy``) and environments
(``envs``) are shared.

The registry
------------
``ESTIMATORS`` maps a name to ``(settings class, constructor)``; a new estimator is a constructor
``(env, policy, settings) -> Estimator`` plus one line here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from diffpg.estimators.alpha_order import AlphaOrderSettings, make_alpha_order
from diffpg.estimators.base import Estimate, Estimator, EstimatorState
from diffpg.estimators.critic_backprop import CriticBackpropSettings, make_critic_backprop
from diffpg.estimators.reinforce import (
    BASELINES,
    ReinforceSettings,
    make_reinforce,
    score_function_gradient,
)
from diffpg.estimators.shac import BpttSettings, ShacSettings, make_bptt, make_shac

ESTIMATORS: dict[str, tuple[type, Callable[..., Estimator]]] = {
    "reinforce": (ReinforceSettings, make_reinforce),
    "critic_backprop": (CriticBackpropSettings, make_critic_backprop),
    "bptt": (BpttSettings, make_bptt),
    "shac": (ShacSettings, make_shac),
    "alpha_order": (AlphaOrderSettings, make_alpha_order),
}

__all__ = [
    "BASELINES",
    "AlphaOrderSettings",
    "ESTIMATORS",
    "BpttSettings",
    "CriticBackpropSettings",
    "Estimate",
    "Estimator",
    "EstimatorState",
    "ReinforceSettings",
    "ShacSettings",
    "make",
    "make_settings",
    "names",
    "score_function_gradient",
]


def names() -> list[str]:
    """The registered estimator names."""
    return list(ESTIMATORS)


def make_settings(name: str, **settings: Any):
    """The validated settings object of estimator ``name``; errors name the bad setting."""
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is not known; allowed values: {names()}")
    settings_class, _ = ESTIMATORS[name]
    fields = {f.name for f in dataclasses.fields(settings_class)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(
            f"estimator {name!r} has no setting(s) {unknown}; allowed settings: {sorted(fields)}"
        )
    return settings_class(**settings)


def make(name: str, env, policy, **settings: Any) -> Estimator:
    """Build estimator ``name`` for ``env`` and ``policy``; validates everything before any compile.

    Checks that the policy's sizes match the environment's, and the settings (see each settings
    class for the allowed values).
    """
    settings_object = make_settings(name, **settings)
    if policy.action_size != env.action_size:
        raise ValueError(
            f"policy action_size={policy.action_size} does not match the environment's "
            f"action_size={env.action_size}"
        )
    if policy.observation_size != env.observation_size:
        raise ValueError(
            f"policy observation_size={policy.observation_size} does not match the environment's "
            f"observation_size={env.observation_size}"
        )
    episode_length = getattr(env, "episode_length", None)
    if episode_length is not None and settings_object.horizon > episode_length:
        raise ValueError(
            f"horizon={settings_object.horizon} is longer than the episode "
            f"(episode_length={episode_length}); allowed: 1..{episode_length}"
        )
    _, constructor = ESTIMATORS[name]
    return constructor(env, policy, settings_object)
