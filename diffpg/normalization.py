"""Running observation statistics (Welford / Chan et al. parallel update), as pure functions.

SHAC normalises observations with running mean and variance that are frozen inside a backprop
window and updated between windows; the estimators do the same through these functions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RunningStatistics(NamedTuple):
    """Mean and summed squared deviation of ``count`` observations of shape ``[size]``."""

    count: jax.Array  # []
    mean: jax.Array  # [size]
    sum_sq_dev: jax.Array  # [size]


def init_statistics(size: int) -> RunningStatistics:
    """Statistics of no data: normalisation is the identity until the first update."""
    return RunningStatistics(jnp.zeros(()), jnp.zeros(size), jnp.zeros(size))


def update_statistics(stats: RunningStatistics, batch: jax.Array,
                      include: jax.Array | None = None) -> RunningStatistics:
    """Merge a batch ``[..., size]`` into ``stats`` (Chan et al. 1979 pairwise update).

    ``include`` (bool, broadcastable to ``batch.shape[:-1]``; default: every row) selects the
    rows to merge. Rows with a non-finite entry (a physics blow-up) are always left out, so they
    cannot poison the statistics; a batch with no row left leaves ``stats`` unchanged.
    """
    finite = jnp.all(jnp.isfinite(batch), axis=-1)  # [...]
    if include is not None:
        finite = finite & include
    finite = jnp.reshape(finite, (-1, 1))
    batch = jnp.where(finite, jnp.reshape(batch, (-1, stats.mean.shape[-1])), 0.0)
    batch_count = jnp.sum(finite).astype(stats.count.dtype)
    safe_count = jnp.maximum(batch_count, 1.0)
    batch_mean = jnp.sum(batch, axis=0) / safe_count
    batch_sq_dev = jnp.sum(jnp.where(finite, jnp.square(batch - batch_mean), 0.0), axis=0)
    count = stats.count + batch_count
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * batch_count / jnp.maximum(count, 1.0)
    sum_sq_dev = (stats.sum_sq_dev + batch_sq_dev
                  + jnp.square(delta) * stats.count * batch_count / jnp.maximum(count, 1.0))
    return RunningStatistics(count, mean, sum_sq_dev)


def normalize(stats: RunningStatistics, obs: jax.Array, clip: float = 10.0) -> jax.Array:
    """``clip((obs - mean) / std)`` with statistics treated as constants (no gradient into them).

    Before any update (``count`` = 0) this is the identity, so a fresh policy sees raw observations.
    """
    stats = jax.lax.stop_gradient(stats)
    std = jnp.sqrt(stats.sum_sq_dev / jnp.maximum(stats.count, 1.0) + 1e-6)
    normalized = jnp.clip((obs - stats.mean) / std, -clip, clip)
    return jnp.where(stats.count > 0, normalized, obs)
