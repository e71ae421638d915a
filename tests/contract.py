"""The estimator contract (``diffpg.estimators`` docstring) as one check, run for every registered
estimator by ``test_contract.py`` and for a user's own estimator by ``test_user_estimator.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from diffpg import estimators
from diffpg.acting import Transitions
from diffpg.normalization import init_statistics


def _all_scalar_and_finite(metrics) -> bool:
    return all(np.ndim(v) == 0 and np.isfinite(v) for v in metrics.values())


def assert_follows_the_contract(name, env, policy, params, starts, horizon, discount=0.99):
    """Build estimator ``name`` with its comparison settings and check every clause of the
    contract: shapes and types of ``estimate``, ``update`` and ``reuse``, jit and vmap over keys,
    independent keys giving independent estimates, and ``reuse`` at the collecting parameters
    giving the estimate itself."""
    settings = estimators.comparison_settings(name, horizon, discount)
    estimator = estimators.make(name, env, policy, **settings)
    state = estimator.init(jax.random.PRNGKey(2), params)
    stats = init_statistics(env.observation_size)
    num_envs = starts.obs.shape[0]

    out = jax.jit(estimator.estimate)(params, stats, state, starts, jax.random.PRNGKey(3))
    assert jax.tree.structure(out.grad) == jax.tree.structure(params)
    for grad_leaf, param_leaf in zip(jax.tree.leaves(out.grad), jax.tree.leaves(params),
                                     strict=True):
        assert grad_leaf.shape == param_leaf.shape
        assert grad_leaf.dtype == param_leaf.dtype
        assert np.all(np.isfinite(grad_leaf))
    assert float(jnp.linalg.norm(ravel_pytree(out.grad)[0])) > 0
    transitions = out.batch.transitions
    assert isinstance(transitions, Transitions)
    steps, batch_size = transitions.reward.shape
    assert steps == horizon and batch_size % num_envs == 0
    for leaf in jax.tree.leaves(transitions) + jax.tree.leaves(out.batch.extras):
        assert leaf.shape[:2] == (steps, batch_size)
    assert jax.tree.structure(out.env_state) == jax.tree.structure(starts)
    assert out.env_state.obs.shape == starts.obs.shape
    assert "objective" in out.metrics and _all_scalar_and_finite(out.metrics)

    new_state, learned = jax.jit(estimator.update)(params, stats, state, out.batch,
                                                   jax.random.PRNGKey(4))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
        assert new.shape == old.shape and new.dtype == old.dtype
    assert _all_scalar_and_finite(learned)

    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    batched = jax.jit(jax.vmap(estimator.estimate, in_axes=(None, None, None, None, 0)))(
        params, stats, state, starts, keys)
    leaves = jax.tree.leaves(batched.grad)
    assert all(leaf.shape[0] == 3 for leaf in leaves)
    # Independent keys give different estimates; the same key gives the same one.
    assert not np.allclose(leaves[0][0], leaves[0][1])
    again = jax.jit(estimator.estimate)(params, stats, state, starts, keys[0])
    np.testing.assert_allclose(jax.tree.leaves(again.grad)[0], leaves[0][0], rtol=1e-5,
                               atol=1e-6)

    if estimator.reuse is not None:
        reused, metrics = jax.jit(estimator.reuse)(params, stats, state, out.batch,
                                                   jax.random.PRNGKey(6))
        assert _all_scalar_and_finite(metrics)
        for a, b in zip(jax.tree.leaves(reused), jax.tree.leaves(out.grad), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    return estimator
