"""SHAC's two settings for episodes that end by a fall: the critic fitted to value 0 where
episodes terminated (``fit_terminal_values``). The gradient it then gives there
(``termination_gradient``) is tested in ``test_returns_reference`` against the loop's weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import envs
from diffpg import estimators
from diffpg.acting import Transitions
from diffpg.critics import make_mlp_value_function
from diffpg.estimators.base import Batch
from diffpg.normalization import init_statistics
from diffpg.policy import make_gaussian_mlp_policy

T, B = 16, 32


def _falling_batch(observation_size: int) -> Transitions:
    """Reward 1 per step from states near +1; a tenth of the steps terminate into states near -1
    (where the true value is 0), every other step continues from where it was."""
    key = jax.random.PRNGKey(0)
    obs = 1.0 + 0.3 * jax.random.normal(key, (T, B, observation_size))
    termination = (jax.random.uniform(jax.random.fold_in(key, 1), (T, B)) < 0.1).astype(
        jnp.float32)
    fallen = -1.0 + 0.3 * jax.random.normal(jax.random.fold_in(key, 2), obs.shape)
    next_obs = jnp.where(termination[..., None] > 0, fallen, obs)
    zeros = jnp.zeros((T, B))
    return Transitions(obs=obs, noise=jnp.zeros((T, B, 1)), raw_action=jnp.zeros((T, B, 1)),
                       reward=jnp.ones((T, B)), done=termination, termination=termination,
                       truncation=zeros, next_obs=next_obs)


def test_fit_terminal_values_teaches_the_critic_that_a_fall_is_worth_nothing():
    """After the same 20 critic updates on the same batch, the critic's mean |V| at the states
    episodes fell into: 4.0 without the setting (extrapolated from the states before the fall,
    whose values are about 7), 0.23 with it (measured); the test asks for a 4-fold drop, while
    the values before the fall stay positive."""
    env = envs.make("lqr")
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size)
    batch, key = _falling_batch(env.observation_size), jax.random.PRNGKey(0)
    params, stats = policy.init(key), init_statistics(env.observation_size)
    value = make_mlp_value_function(env.observation_size, (64, 64))
    fallen = batch.next_obs[batch.termination > 0]
    at_fall, before = {}, {}
    for fit in (False, True):
        estimator = estimators.make("shac", env, policy, horizon=T, critic_learning_rate=1e-2,
                                    fit_terminal_values=fit)
        state = estimator.init(key, params)
        update = jax.jit(estimator.update)
        for i in range(20):
            state, _ = update(params, stats, state, Batch(batch), jax.random.fold_in(key, i))
        at_fall[fit] = float(jnp.mean(jnp.abs(value.apply(state.params, fallen, None))))
        before[fit] = float(jnp.mean(value.apply(state.params, batch.obs, None)))
    assert at_fall[False] > 1.0
    assert at_fall[True] < at_fall[False] / 4
    assert before[True] > 1.0


@pytest.mark.parametrize("name", ["termination_gradient", "fit_terminal_values"])
def test_termination_settings_must_be_booleans(name):
    with pytest.raises(ValueError, match=f"{name}=1"):
        estimators.make_settings("shac", **{name: 1})
