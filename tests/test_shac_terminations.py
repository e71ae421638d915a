"""SHAC's settings for episodes that end by a fall: the critic fitted to value 0 where
episodes terminated (``fit_terminal_values``), the states before a fall weighted in its fit
(``critic_fall_weight``). The gradient it then gives there
(``termination_gradient``) is tested in ``test_returns_reference`` against the loop's weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from diffpg import envs, estimators
from diffpg.acting import Transitions
from diffpg.critics import fit_mean_squared_error, init_critic_state, make_mlp_value_function
from diffpg.estimators.base import Batch
from diffpg.estimators.shac import steps_before_a_fall
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


def _critic_after_20_fits(**settings):
    """SHAC's critic (LQR sizes, learning rate 1e-2, ``settings``) after 20 updates on the
    falling batch: its value function ``obs -> V``, and the batch."""
    env = envs.make("lqr")
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size)
    batch, key = _falling_batch(env.observation_size), jax.random.PRNGKey(0)
    params, stats = policy.init(key), init_statistics(env.observation_size)
    estimator = estimators.make("shac", env, policy, horizon=T, critic_learning_rate=1e-2,
                                **settings)
    state = estimator.init(key, params)
    update = jax.jit(estimator.update)
    for i in range(20):
        state, _ = update(params, stats, state, Batch(batch), jax.random.fold_in(key, i))
    value = make_mlp_value_function(env.observation_size, (64, 64))
    return (lambda obs: value.apply(state.params, obs, None)), batch


def test_fit_terminal_values_teaches_the_critic_that_a_fall_is_worth_nothing():
    """After the same 20 critic updates on the same batch, the critic's mean |V| at the states
    episodes fell into: 4.0 without the setting (extrapolated from the states before the fall,
    whose values are about 7), 0.23 with it (measured); the test asks for a 4-fold drop, while
    the values before the fall stay positive."""
    at_fall, before = {}, {}
    for fit in (False, True):
        value, batch = _critic_after_20_fits(fit_terminal_values=fit)
        fallen = batch.next_obs[batch.termination > 0]
        at_fall[fit] = float(jnp.mean(jnp.abs(value(fallen))))
        before[fit] = float(jnp.mean(value(batch.obs)))
    assert at_fall[False] > 1.0
    assert at_fall[True] < at_fall[False] / 4
    assert before[True] > 1.0


@pytest.mark.parametrize("name", ["termination_gradient", "fit_terminal_values"])
def test_termination_settings_must_be_booleans(name):
    with pytest.raises(ValueError, match=f"{name}=1"):
        estimators.make_settings("shac", **{name: 1})


def test_steps_before_a_fall_are_those_whose_episode_terminates_later_in_the_window():
    """Against a plain loop over each environment's steps: a step is before a fall when its
    episode ends by a termination (not a time limit) at that step or later in the window."""
    key = jax.random.PRNGKey(3)
    termination = (jax.random.uniform(key, (T, B)) < 0.1).astype(jnp.float32)
    truncation = (jax.random.uniform(jax.random.fold_in(key, 1), (T, B)) < 0.1).astype(
        jnp.float32) * (1.0 - termination)
    batch = _falling_batch(1)._replace(termination=termination, truncation=truncation,
                                       done=jnp.maximum(termination, truncation))
    expected = [[0.0] * B for _ in range(T)]
    for b in range(B):
        for t in range(T):
            for later in range(t, T):
                if termination[later, b] or truncation[later, b]:
                    expected[t][b] = float(termination[later, b])
                    break
    assert float(jnp.sum(termination)) > 10 and float(jnp.sum(truncation)) > 10
    assert jnp.array_equal(steps_before_a_fall(batch), jnp.array(expected))


def test_weighted_regression_converges_to_the_weighted_mean():
    """A constant critic fit by gradient descent on the whole batch to weighted squared errors
    reaches the weighted mean of the targets (the loss ``mean(u (c - y)^2)``, ``u = w / mean(w)``,
    is least there; step 0.25 halves the distance each step), where unweighted it reaches the
    plain mean: both to float32 rounding."""
    key = jax.random.PRNGKey(4)
    targets = jax.random.normal(key, (T, B)) + 3.0
    weights = jax.random.uniform(jax.random.fold_in(key, 1), (T, B), minval=0.1, maxval=10.0)
    optimizer = optax.sgd(0.25)
    params = {"c": jnp.zeros(())}
    inputs = (jnp.zeros((T, B, 1)),)

    def predict(p, x):
        return p["c"] * jnp.ones(x.shape[:-1])

    weighted_mean, plain_mean = jnp.sum(weights * targets) / jnp.sum(weights), jnp.mean(targets)
    assert abs(float(weighted_mean - plain_mean)) > 0.01  # the weights matter here
    for w, expected in ((weights, weighted_mean), (None, plain_mean)):
        state = init_critic_state(params, optimizer)
        state, _ = fit_mean_squared_error(state, predict, inputs, targets, optimizer, key,
                                          iterations=60, minibatches=1, weights=w)
        assert abs(float(state.params["c"]) - float(expected)) <= 1e-5 * abs(float(expected))


def test_critic_fall_weight_lowers_the_values_before_a_fall():
    """In the falling batch the states before a fall look like every other state (near +1), and
    their targets are lower (the rewards stop at the fall). Fit to every step alike, the critic
    values them like the others; with them weighted 20x it values them lower (mean 6.9 -> 4.0,
    measured): the weight moves the fit toward what follows them. Ignoring the weight would give
    the same value twice."""
    values = {}
    for weight in (1.0, 20.0):
        value, batch = _critic_after_20_fits(critic_fall_weight=weight)
        values[weight] = float(jnp.mean(value(batch.obs)[steps_before_a_fall(batch) > 0]))
    assert values[20.0] < values[1.0]


def test_critic_fall_weight_must_be_positive():
    with pytest.raises(ValueError, match="critic_fall_weight=0"):
        estimators.make_settings("shac", critic_fall_weight=0.0)
