"""Types shared by every estimator (the contract itself is stated in ``diffpg.estimators``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from diffpg.critics import CriticState
from diffpg.normalization import RunningStatistics, update_statistics
from diffpg.policy import Params
from diffpg.replay import ReplayBuffer
from envs.core import State


class EstimatorState(NamedTuple):
    """What an estimator carries between calls.

    ``obs_stats``: running observation statistics, frozen inside one estimate and updated after it
    when the estimator normalises observations. ``critic``: the learned critic (value function for
    SHAC and REINFORCE's value baseline, Q for critic backprop), or ``None`` when there is none.
    ``replay``: past transitions for an off-policy critic (critic backprop with a replay buffer),
    or ``None``.
    """

    obs_stats: RunningStatistics
    critic: CriticState | None
    replay: ReplayBuffer | None = None


class Estimate(NamedTuple):
    """The result of one call to ``Estimator.estimate``.

    ``grad``: an estimate of ``grad_theta J(theta)`` (ascent direction; same tree as the policy
    parameters). ``state``: the estimator's new state. ``env_state``: the batch after the rollout,
    so training can continue from it. ``metrics``: flat dict of scalars.
    """

    grad: Params
    state: EstimatorState
    env_state: State
    metrics: dict[str, jax.Array]


class Estimator(NamedTuple):
    """A gradient estimator as two pure functions (the shape of ``optax.GradientTransformation``).

    ``init(key, policy_params) -> EstimatorState``;
    ``estimate(policy_params, state, env_state [B], key) -> Estimate``.
    ``settings`` is the frozen settings object it was built from.
    """

    init: Callable[[jax.Array, Params], EstimatorState]
    estimate: Callable[[Params, EstimatorState, State, jax.Array], Estimate]
    settings: Any


def maybe_update_statistics(
    state: EstimatorState, observations: jax.Array, normalize_observations: bool
) -> EstimatorState:
    """After an estimate: fold the window's observations into the statistics, if normalising."""
    if not normalize_observations:
        return state
    return state._replace(obs_stats=update_statistics(state.obs_stats, observations))


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def check_unit_interval(name: str, value: Any, *, closed_right: bool = True) -> None:
    upper_ok = value <= 1.0 if closed_right else value < 1.0
    if not isinstance(value, int | float) or not (0.0 <= value and upper_ok):
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name}={value!r} must be a number in {interval}")


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a positive number")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {list(allowed)}")
