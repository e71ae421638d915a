"""A fixed-size replay buffer of transitions, as a pure-function ring buffer.

The buffer is a pytree (it lives in the estimator's state, is carried through ``lax.scan`` and
saved in checkpoints). ``add`` writes a batch of ``N`` transitions at the write position, wrapping
around and overwriting the oldest; ``sample`` draws uniformly (with replacement) among the ``size``
transitions written so far.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffpg.envs.core import SettingError


class ReplayData(NamedTuple):
    """Transitions; every field has leading axis ``[N]`` (``[capacity]`` inside the buffer)."""

    obs: jax.Array  # [N, obs] unnormalised observation the action was taken from
    action: jax.Array  # [N, act] action sent to the environment
    reward: jax.Array  # [N]
    termination: jax.Array  # [N] 1 where the task ended the episode (the next state has value 0)
    next_obs: jax.Array  # [N, obs] observation reached, before any auto-reset


class ReplayBuffer(NamedTuple):
    data: ReplayData  # leaves with leading axis [capacity]
    position: jax.Array  # [] int32 next index written
    size: jax.Array  # [] int32 transitions stored, at most capacity


def init_replay(capacity: int, observation_size: int, action_size: int) -> ReplayBuffer:
    """An empty buffer of ``capacity`` transitions (float32)."""
    data = ReplayData(
        obs=jnp.zeros((capacity, observation_size)),
        action=jnp.zeros((capacity, action_size)),
        reward=jnp.zeros((capacity,)),
        termination=jnp.zeros((capacity,)),
        next_obs=jnp.zeros((capacity, observation_size)),
    )
    zero = jnp.zeros((), jnp.int32)
    return ReplayBuffer(data, zero, zero)


def add(buffer: ReplayBuffer, batch: ReplayData) -> ReplayBuffer:
    """Write ``batch`` (leading axis ``N <= capacity``) at ``position``, wrapping around."""
    capacity = buffer.data.reward.shape[0]
    count = batch.reward.shape[0]
    if count > capacity:
        raise SettingError(f"a batch of {count} transitions does not fit a buffer of capacity "
                           f"{capacity}; allowed: capacity >= transitions per estimate")
    indices = (buffer.position + jnp.arange(count)) % capacity
    data = jax.tree.map(lambda stored, new: stored.at[indices].set(new.astype(stored.dtype)),
                        buffer.data, batch)
    return ReplayBuffer(data, (buffer.position + count) % capacity,
                        jnp.minimum(buffer.size + count, capacity))


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> ReplayData:
    """``batch_size`` transitions drawn uniformly with replacement from the stored ones.

    The buffer must hold at least one transition (callers add before sampling).
    """
    indices = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree.map(lambda x: x[indices], buffer.data)
