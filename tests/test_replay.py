"""The replay buffer: ring-buffer writes and sampling among stored transitions only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffpg.replay import ReplayData, add, init_replay, sample


def _batch(first: int, count: int) -> ReplayData:
    ids = jnp.arange(first, first + count, dtype=jnp.float32)
    return ReplayData(obs=ids[:, None] * jnp.ones((1, 2)), action=ids[:, None], reward=ids,
                      termination=jnp.zeros(count), next_obs=ids[:, None] * jnp.ones((1, 2)))


def test_writes_wrap_around_and_overwrite_the_oldest():
    buffer = init_replay(5, 2, 1)
    buffer = add(buffer, _batch(0, 3))
    assert int(buffer.size) == 3 and int(buffer.position) == 3
    buffer = add(buffer, _batch(3, 3))  # ids 3, 4 fill the end, id 5 overwrites id 0
    assert int(buffer.size) == 5 and int(buffer.position) == 1
    np.testing.assert_array_equal(buffer.data.reward, [5, 1, 2, 3, 4])
    np.testing.assert_array_equal(buffer.data.obs[:, 0], buffer.data.reward)


def test_samples_come_only_from_stored_transitions():
    buffer = add(init_replay(100, 2, 1), _batch(1, 7))  # rewards 1..7, the rest empty (0)
    drawn = sample(buffer, jax.random.PRNGKey(0), 4000)
    counts = np.bincount(np.asarray(drawn.reward, int), minlength=8)
    assert counts[0] == 0 and np.all(counts[1:] > 0)
    # Uniform over the 7 stored: each count is Binomial(4000, 1/7).
    expected, sd = 4000 / 7, np.sqrt(4000 * (1 / 7) * (6 / 7))
    assert np.all(np.abs(counts[1:] - expected) < 4.5 * sd)
    np.testing.assert_array_equal(drawn.action[:, 0], drawn.reward)  # fields stay aligned


def test_a_batch_larger_than_the_buffer_is_a_clear_error():
    with pytest.raises(ValueError, match="capacity"):
        add(init_replay(4, 2, 1), _batch(0, 5))
