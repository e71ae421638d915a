"""Types shared by every estimator (the contract itself is stated in ``diffpg.estimators``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from diffpg.acting import Transitions
from diffpg.envs.core import SettingError, State
from diffpg.normalization import RunningStatistics
from diffpg.options import FLOAT32_MAX, FLOAT32_TINY, float32_problem
from diffpg.policy import Params

EstimatorState = Any
"""Whatever an estimator carries between calls (critics, replay buffers, adaptive horizons...):
a pytree it alone defines, ``None`` when it carries nothing."""


class Batch(NamedTuple):
    """The experience one estimate simulated, kept for learning and for reuse.

    ``transitions``: ``[T, B]`` steps (no gradient), the same structure for every estimator, so
    a trainer reads observations, rewards and episode ends without knowing the estimator.
    ``extras``: the estimator's own per-step data (behaviour log-probabilities, advantages,
    value targets...) as a pytree whose leaves have leading axes ``[T, B]``, or ``None``.
    A minibatch is the same tree indexed along axis 1 (environments).
    """

    transitions: Transitions
    extras: Any = None


class Estimate(NamedTuple):
    """The result of one call to ``Estimator.estimate``.

    ``grad``: an estimate of ``grad_theta J(theta)`` (ascent direction; same tree as the policy
    parameters). ``batch``: the experience behind it. ``env_state``: the environments after the
    rollout ``[B]``, so training can continue from them. ``metrics``: flat dict of scalars.
    """

    grad: Params
    batch: Batch
    env_state: State
    metrics: dict[str, jax.Array]


class Estimator(NamedTuple):
    """A gradient estimator as pure functions (the shape of ``optax.GradientTransformation``).

    ``init(key, policy_params) -> state``;
    ``estimate(policy_params, obs_stats, state, env_state [B], key) -> Estimate``;
    ``update(policy_params, obs_stats, state, batch, key) -> (state, metrics)``: learn from the
    batch an estimate returned (fit critics, fill a replay buffer...), at the parameters that
    collected it; the identity for an estimator that learns nothing;
    ``reuse(policy_params, obs_stats, state, batch, key) -> (grad, metrics)`` or ``None``: the
    gradient at (possibly newer) parameters from a batch collected earlier, for several
    optimiser steps on one batch (PPO's clipped importance ratio); ``None`` when the estimator
    cannot reuse data.
    ``settings`` is the frozen settings object it was built from.
    """

    init: Callable[[jax.Array, Params], EstimatorState]
    estimate: Callable[[Params, RunningStatistics, EstimatorState, State, jax.Array], Estimate]
    update: Callable[[Params, RunningStatistics, EstimatorState, Batch, jax.Array],
                     tuple[EstimatorState, dict[str, jax.Array]]]
    settings: Any
    reuse: Callable[[Params, RunningStatistics, EstimatorState, Batch, jax.Array],
                    tuple[Params, dict[str, jax.Array]]] | None = None


def learns_nothing(params, obs_stats, state, batch, key):
    """``update`` of an estimator without learned parts: the state unchanged, no metrics."""
    del params, obs_stats, batch, key
    return state, {}


LARGEST_INT = 2**31 - 1
"""The largest integer a setting may hold: JAX counts, indexes and sizes in int32."""


MOST_PASSES = 2**24
"""The most passes a setting may ask of one scan (critic fitting passes, warm-up rounds): each
keeps its key and loss on the device, 2**31 of them 60 GB; SHAC's critic takes 16."""


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= LARGEST_INT:
        raise SettingError(f"{name}={value!r} must be a positive integer (1..{LARGEST_INT:,}: "
                           "JAX's int32)")


def check_passes(name: str, value: Any, least: int = 1) -> None:
    """A count of a scan's passes: an integer in ``least..MOST_PASSES``."""
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= MOST_PASSES:
        raise SettingError(f"{name}={value!r} must be an integer in {least}..{MOST_PASSES:,} "
                           "(each pass keeps a key and a loss on the device)")


def _in_unit_interval(value: Any, closed_right: bool = True) -> bool:
    """Whether ``value`` is a number in [0, 1], or [0, 1) with the open bound taken in float32
    (where 0.99999999999 is 1.0), that float32 keeps (1e-40 becomes 0 on the device)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return (0.0 <= value and float32_problem(value) is None
            and (value <= 1.0 if closed_right else float(np.float32(value)) < 1.0))


def check_unit_interval(name: str, value: Any, *, closed_right: bool = True) -> None:
    if not _in_unit_interval(value, closed_right):
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise SettingError(f"{name}={value!r} must be a number in {interval} (0, or at least "
                           f"{FLOAT32_TINY:.4g}: float32's smallest normal number)")


def check_positive(name: str, value: Any) -> None:
    """A number above 0 that float32, the precision runs compute in, keeps (rejects inf, NaN,
    values such as 1e39 that become inf on the device and 1e-46 that become 0)."""
    if (not isinstance(value, int | float) or isinstance(value, bool) or not value > 0
            or float32_problem(value) is not None):
        raise SettingError(f"{name}={value!r} must be a positive number in [{FLOAT32_TINY:.4g}, "
                           f"{FLOAT32_MAX:.4g}] (a float32 that is neither 0 nor inf)")


def check_non_negative(name: str, value: Any) -> None:
    """0, or a positive number as ``check_positive`` takes it."""
    if (not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0
            or float32_problem(value) is not None):
        raise SettingError(f"{name}={value!r} must be 0 or a number in [{FLOAT32_TINY:.4g}, "
                           f"{FLOAT32_MAX:.4g}] (a float32 that is neither inf nor rounded to 0)")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SettingError(f"{name}={value!r} must be true or false")


def check_bool_fields(settings: Any) -> None:
    """Every field of the dataclass ``settings`` annotated ``bool`` holds a bool: a string such
    as ``"no"`` in an estimator spec or a settings.json would otherwise read as true."""
    for field in dataclasses.fields(settings):
        if field.type in (bool, "bool"):
            check_bool(field.name, getattr(settings, field.name))


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingError(f"{name}={value!r} is not allowed; allowed values: {list(allowed)}")


def check_hidden_sizes(name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not all(
            isinstance(h, int) and not isinstance(h, bool) and 0 < h <= LARGEST_INT for h in value):
        raise SettingError(f"{name}={value!r} must be a tuple of positive integers (each at most "
                           f"{LARGEST_INT:,}: JAX's int32)")


def check_betas(name: str, value: Any) -> None:
    if not (isinstance(value, tuple) and len(value) == 2
            and all(_in_unit_interval(b, closed_right=False) for b in value)):
        raise SettingError(f"{name}={value!r} must be two numbers in [0, 1), below 1 in "
                           "float32 (at most 0.99999994: Adam's bias correction divides by "
                           "1 - beta^t)")


def check_critic_fit(settings: Any) -> None:
    """The checks of the critic-fit settings, one vocabulary for every estimator that fits a
    critic (SHAC and its successors, critic backprop, REINFORCE's and PPO's value critic):
    ``critic_hidden_sizes``, ``critic_learning_rate``, ``critic_betas`` (Adam's),
    ``critic_iterations`` (passes over the batch per fit), ``critic_minibatches`` (Adam steps per
    pass) and, where the settings have a target network, ``target_critic_keep`` (its Polyak
    weight)."""
    check_hidden_sizes("critic_hidden_sizes", settings.critic_hidden_sizes)
    check_positive("critic_learning_rate", settings.critic_learning_rate)
    check_betas("critic_betas", settings.critic_betas)
    check_passes("critic_iterations", settings.critic_iterations)
    check_positive_int("critic_minibatches", settings.critic_minibatches)
    if hasattr(settings, "target_critic_keep"):
        check_unit_interval("target_critic_keep", settings.target_critic_keep)
