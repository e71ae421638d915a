"""Discounting, reward-to-go and TD(lambda) targets over ``[T, B]`` arrays, as reverse scans.

Every function treats time as the leading axis and handles episode boundaries inside the window:
``done[t] = 1`` means the transition at step ``t`` ended an episode (termination or time-limit
truncation) and step ``t + 1`` starts a new one, because environments auto-reset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_discounts(
    done: jax.Array, discount: float, initial: jax.Array | None = None
) -> jax.Array:
    """Weights ``w [T, B]`` of the objective ``sum_t w_t r_t``.

    ``w_0 = initial`` (default 1) and ``w_{t+1} = discount * w_t``, restarting at 1 after an episode
    ends (``done_t = 1``): each episode piece is discounted from its own start. ``initial [B]``
    continues the discount of an episode that began in an earlier window.
    """

    def step(weight, done_t):
        next_weight = jnp.where(done_t > 0, 1.0, discount * weight)
        return next_weight, weight

    start = jnp.ones_like(done[0]) if initial is None else initial
    _, weights = jax.lax.scan(step, start, done)
    return weights


def survival(
    survival_probability: jax.Array, done: jax.Array, restart: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The probability of being alive before and after each step, ``[T, B]`` each.

    ``survival_probability [T, B]``: ``p_t``, the probability that step ``t`` does not end the
    episode. ``S_t = prod_{k <= t} p_k`` over the steps of the same episode piece, restarting at 1
    after an episode ends (``done_t = 1``) and where ``restart [T]`` (or ``[T, B]``) is set (a new
    objective starts at that step). Returns ``(S_{t-1}, S_t)``: what weights the reward of step
    ``t`` (received before the step's fall) and what weights a value bootstrapped after it.
    """
    if restart is None:
        restart = jnp.zeros(done.shape[:1], done.dtype)
    restart = jnp.broadcast_to(restart.reshape(restart.shape + (1,) * (done.ndim - restart.ndim)),
                               done.shape)

    def step(alive, inputs):
        probability, done_t, restart_t = inputs
        before = jnp.where(restart_t > 0, 1.0, alive)
        after = before * probability
        return jnp.where(done_t > 0, 1.0, after), (before, after)

    start = jnp.ones_like(survival_probability[0])
    _, (before, after) = jax.lax.scan(step, start, (survival_probability, done, restart))
    return before, after


def survival_weighted(weights: jax.Array, survival_probability: jax.Array | None,
                      done: jax.Array, restart: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
    """``(weights * S_{t-1}, weights * S_t)`` ``[T, B]``: an objective's weights for the reward
    of each step and for a value bootstrapped after it, given the probability of going on
    (``survival``'s products, restarting as it says); both ``weights`` when
    ``survival_probability`` is ``None``."""
    if survival_probability is None:
        return weights, weights
    alive_before, alive_after = survival(survival_probability, done, restart)
    return weights * alive_before, weights * alive_after


def reward_to_go(values: jax.Array, done: jax.Array, discount: float = 1.0) -> jax.Array:
    """``psi_t = sum_{t' >= t, same episode} discount^(t' - t) values_{t'}``, ``[T, B]``.

    With ``values = w * reward`` (already discounted from the episode start) and ``discount = 1``
    this is the reward-to-go that multiplies the score at step ``t`` in REINFORCE (causality:
    actions cannot change rewards of the past, nor of a later episode). With the raw
    rewards and ``discount = gamma`` it is the Monte-Carlo return from each step (value targets).
    """

    def step(future, inputs):
        value_t, done_t = inputs
        psi = value_t + discount * (1.0 - done_t) * future
        return psi, psi

    _, psi = jax.lax.scan(step, jnp.zeros_like(values[0]), (values, done), reverse=True)
    return psi


def episode_total(values: jax.Array, done: jax.Array) -> jax.Array:
    """``sum_{t' in episode(t)} values_{t'}`` at every step ``t``, ``[T, B]`` (the total-return form)."""
    psi = reward_to_go(values, done)

    def step(carry, inputs):
        psi_t, starts_episode = inputs
        total = jnp.where(starts_episode, psi_t, carry)
        return total, total

    starts = jnp.concatenate([jnp.ones_like(done[:1]), done[:-1]], axis=0) > 0
    _, totals = jax.lax.scan(step, psi[0], (psi, starts))
    return totals


def td_lambda_targets(
    reward: jax.Array,
    next_value: jax.Array,
    termination: jax.Array,
    done: jax.Array,
    discount: float,
    lambda_: float,
) -> jax.Array:
    """TD(lambda) value targets ``[T, B]`` over a window (SHAC's critic targets).

    ``G_t = r_t + gamma (1 - term_t) [(1 - lambda c_t) V(s'_t) + lambda c_t G_{t+1}]``, where
    ``V(s'_t) = next_value_t`` is the value of the state reached by step ``t`` *before* any reset,
    and ``c_t = 0`` when the episode ended at ``t`` or ``t`` is the last step of the window (the
    return is bootstrapped there), else 1. Terminal states have value 0; truncated ones keep theirs.
    """
    continues = 1.0 - done
    continues = continues.at[-1].set(0.0)

    def step(future, inputs):
        reward_t, value_t, term_t, cont_t = inputs
        blended = (1.0 - lambda_ * cont_t) * value_t + lambda_ * cont_t * future
        target = reward_t + discount * (1.0 - term_t) * blended
        return target, target

    inputs = (reward, next_value, termination, continues)
    _, targets = jax.lax.scan(step, jnp.zeros_like(reward[0]), inputs, reverse=True)
    return targets


def episode_cumsum(values: jax.Array, done: jax.Array) -> jax.Array:
    """``c_t = sum_{t' <= t, same episode} values_{t'}``, ``[T, B]``; restarts after ``done``."""

    def step(carry, inputs):
        value_t, done_t = inputs
        total = carry + value_t
        return (1.0 - done_t) * total, total

    _, totals = jax.lax.scan(step, jnp.zeros_like(values[0]), (values, done))
    return totals
