"""SAPO (``diffpg.estimators.sapo``): biased by design for the task's objective, by exactly the
temperature times the entropy's gradient; its entropy bonus against the density it stands for;
its temperature and twin critics learning in the right direction."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_unbiased, flatten, independent_estimates
from exact_cases import PATHWISE_ERROR

from diffpg import estimators
from diffpg.acting import Transitions
from diffpg.estimators.sapo import entropy_bonus
from diffpg.normalization import init_statistics
from diffpg.policy import make_gaussian_mlp_policy

TEMPERATURE = 0.5


def test_sapo_estimates_the_task_gradient_plus_temperature_times_the_entropy_gradient(lqr):
    """On the LQR (horizon inside one episode, one window: the critic never enters), SAPO's mean
    is grad J + alpha grad H, with H = sum_t gamma^t E[h_t] and, for a Gaussian with a
    state-independent log-std, d h_t / d log_std = 1 per action dimension: the bias is
    alpha sum_t gamma^t on the log-std and 0 elsewhere, and it is measured, not assumed."""
    estimator = estimators.make("sapo", lqr.env, lqr.policy, horizon=lqr.horizon,
                                discount=lqr.discount, finite_horizon=True,
                                initial_temperature=TEMPERATURE, learn_temperature=False)
    samples = independent_estimates(estimator, lqr, 400,
                                    state=estimator.init(jax.random.PRNGKey(0), lqr.params))
    entropy_gradient = jax.tree.map(jnp.zeros_like, lqr.params)
    discounted_steps = sum(lqr.discount**t for t in range(lqr.horizon))
    entropy_gradient["log_std"] = jnp.full_like(lqr.params["log_std"], discounted_steps)
    expected = jax.tree.map(lambda g, h: g + TEMPERATURE * h, lqr.exact_gradient(),
                            entropy_gradient)
    assert_unbiased(samples, expected, resolvable_error=PATHWISE_ERROR)
    with pytest.raises(AssertionError, match="biased"):  # the task's gradient alone is not it
        assert_unbiased(samples, lqr.exact_gradient(), resolvable_error=PATHWISE_ERROR)


def test_entropy_bonus_is_minus_the_log_density_of_the_squashed_action():
    policy = make_gaussian_mlp_policy(3, 2, hidden_sizes=(8,), init_log_std=-0.3)
    params = policy.init(jax.random.PRNGKey(0))
    stats = init_statistics(3)
    obs = jax.random.normal(jax.random.PRNGKey(1), (5, 4, 3))
    noise = jax.random.normal(jax.random.PRNGKey(2), (5, 4, 2))
    mean, std = policy.distribution(params, obs)
    raw = mean + std * noise
    zeros = jnp.zeros((5, 4))
    tr = Transitions(obs, noise, raw, zeros, zeros, zeros, zeros, obs)
    # log density of a = tanh(u): log N(u) - sum log(1 - a^2), written from the definition
    action = jnp.tanh(raw)
    log_density = (jnp.sum(-0.5 * noise**2 - jnp.log(std) - 0.5 * math.log(2 * math.pi), -1)
                   - jnp.sum(jnp.log(1 - action**2), -1))
    np.testing.assert_allclose(entropy_bonus(policy, params, stats, tr), -log_density,
                               rtol=1e-5, atol=1e-5)


def test_update_lowers_the_temperature_above_the_target_entropy_and_fits_both_critics():
    from diffpg import envs

    env = envs.make("pendulum")
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size, hidden_sizes=(16,),
                                      init_log_std=0.5)  # entropy per step about 1.5 > -1
    params = policy.init(jax.random.PRNGKey(0))
    stats = init_statistics(env.observation_size)
    estimator = estimators.make("sapo", env, policy, horizon=8, window=4)
    state = estimator.init(jax.random.PRNGKey(1), params)
    starts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(2), 8))
    estimate, update = jax.jit(estimator.estimate), jax.jit(estimator.update)
    losses = []
    for i in range(20):
        out = estimate(params, stats, state, starts, jax.random.PRNGKey(10 + i))
        state, metrics = update(params, stats, state, out.batch, jax.random.PRNGKey(50 + i))
        losses.append(float(metrics["critic_loss"]))
        starts = out.env_state
    assert float(metrics["entropy"]) > -1.0
    assert float(jnp.exp(state.log_temperature)) < 0.1  # started at 0.1, lowered every step
    members = jax.tree.leaves(state.critic.params)[0].shape[0]
    assert members == 2
    first, second = (jax.tree.map(lambda x, i=i: x[i], state.critic.params) for i in range(2))
    assert not np.allclose(flatten(first), flatten(second))  # independent initialisations
    assert losses[-1] < losses[0]


def test_the_comparison_fixes_the_temperature():
    settings = estimators.comparison_settings("sapo", horizon=12, discount=0.99)
    assert settings["learn_temperature"] is False and settings["window"] == 4
    assert settings["finite_horizon"] is True
