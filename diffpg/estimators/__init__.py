"""Policy-gradient estimators behind one contract.

The contract
------------
An estimator is ``Estimator(init, estimate, update, settings, reuse)``, pure functions and the
frozen settings they close over (built by ``make(name, env, policy, **settings)``):

* ``init(key, policy_params) -> state``: the estimator's own state, a pytree only it knows
  (a critic with its target copy and optimiser state, a replay buffer...; ``None`` if nothing).
* ``estimate(policy_params, obs_stats, state, env_state, key) -> Estimate(grad, batch,
  env_state, metrics)``: from a batch of ``B`` environment states (every leaf has leading axis
  ``B``) simulate ``settings.horizon`` steps, the policy seeing observations normalised by
  ``obs_stats`` (``diffpg.normalization``, frozen for the call), and return

  - ``grad``: an estimate of ``grad_theta J(theta)`` with the structure of ``policy_params``, for
    the objective ``J = E[(1/B) sum_b sum_t w_t r_t]``, where ``w_t = gamma^(t - t0)`` is discounted
    from the start ``t0`` of the episode step ``t`` belongs to (environments auto-reset); it is an
    ascent direction (negate it for an optax minimiser);
  - ``batch``: ``Batch(transitions [T, B], extras)``, the experience behind the estimate
    (``diffpg.acting.Transitions``) and the estimator's own per-step data;
  - ``env_state``: the batch after the rollout ``[B]``, for training to continue from;
  - ``metrics``: a flat dict of scalar arrays (``objective``: the batch mean of
    ``sum_t w_t r_t``).

* ``update(policy_params, obs_stats, state, batch, key) -> (state, metrics)``: learning, apart
  from the gradient: fit the critics on the batch, store it for replay. A trainer calls it once
  per batch; a comparison calls ``estimate`` and ``update`` on a fixed policy to warm critics up.
* ``reuse``: ``None``, or ``(policy_params, obs_stats, state, batch, key) -> (grad, metrics)``,
  the gradient at newer parameters from a batch collected earlier (importance-weighted, as PPO's
  clipped ratio), so a trainer can take several optimiser steps on one batch.

``estimate`` is jit-able and ``jax.vmap``-able over ``key`` (and over states), so independent
estimates on the same start states are
``jax.vmap(estimate, (None, None, None, None, 0))(params, stats, state, starts, keys)``: their
mean is the estimator's expectation and their spread its variance (``diffpg.stats``).
Estimators differ only in how they get ``grad``; policies (``diffpg.policy``), acting
(``diffpg.acting``) and environments (``diffpg.envs``) are shared.

The registry
------------
``register(name, settings_class, constructor, comparison=..., training=..., trainer=...)`` makes
an estimator available everywhere (``diffpg.estimators.registry`` explains the declarations);
the built-in estimators register themselves that way, in their own files. A user's estimator,
defined in the user's own module, registers the same way; ``diffpg --import MODULE`` imports
such a module before a command runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from diffpg.envs.core import SettingError
from diffpg.estimators.base import Batch, Estimate, Estimator, EstimatorState, check_bool_fields
from diffpg.estimators.registry import (
    FAMILIES,
    Registration,
    names,
    reference_estimator,
    register,
    registration,
    unregister,
)

__all__ = [
    "FAMILIES",
    "Batch",
    "Estimate",
    "Estimator",
    "EstimatorState",
    "Registration",
    "comparison_settings",
    "make",
    "make_settings",
    "names",
    "reference_estimator",
    "register",
    "registration",
    "training_settings",
    "unregister",
]


# The built-in estimators register themselves when imported, in this order (which is also the
# order of ``diffpg compare``'s default list).
for _module in ("reinforce", "critic_backprop", "shac", "sapo", "ahac", "alpha_order", "ivw",
                "ddcg"):
    importlib.import_module(f"diffpg.estimators.{_module}")


def make_settings(name: str, **settings: Any):
    """The validated settings object of estimator ``name``; errors name the bad setting."""
    settings_class = registration(name).settings_class
    fields = {f.name for f in dataclasses.fields(settings_class)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise SettingError(
            f"estimator {name!r} has no setting(s) {unknown}; allowed settings: {sorted(fields)}"
        )
    settings_object = settings_class(**settings)
    check_bool_fields(settings_object)
    return settings_object


def comparison_settings(name: str, horizon: int, discount: float, **overrides: Any) -> dict:
    """Settings of estimator ``name`` for the comparison objective ``J_T`` at ``horizon``: its
    ``comparison`` declaration, then ``overrides`` (the user's), which win."""
    values = {"horizon": horizon, "discount": discount}
    return values | registration(name).comparison(horizon) | overrides


def training_settings(name: str, **overrides: Any) -> dict:
    """Settings of estimator ``name`` for training: its ``training`` declaration, then
    ``overrides``, which win."""
    return dict(registration(name).training) | overrides


def make(name: str, env, policy, **settings: Any) -> Estimator:
    """Build estimator ``name`` for ``env`` and ``policy``; validates everything before any compile.

    Checks that the policy's sizes match the environment's, and the settings (see each settings
    class for the allowed values). The horizon may be longer than an episode: environments
    auto-reset, and the objective counts each episode from its own start.
    """
    settings_object = make_settings(name, **settings)
    if policy.action_size != env.action_size:
        raise SettingError(
            f"policy action_size={policy.action_size} does not match the environment's "
            f"action_size={env.action_size}"
        )
    if policy.observation_size != env.observation_size:
        raise SettingError(
            f"policy observation_size={policy.observation_size} does not match the environment's "
            f"observation_size={env.observation_size}"
        )
    return registration(name).constructor(env, policy, settings_object)
