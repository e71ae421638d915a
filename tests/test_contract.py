"""The estimator contract (``diffpg.estimators`` docstring), checked for every registered estimator,
plus the policy interface and the errors a bad setting gives."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiles
from contract import assert_follows_the_contract

from diffpg import envs, estimators
from diffpg.normalization import init_statistics, normalize, update_statistics
from diffpg.policy import make_gaussian_mlp_policy, make_linear_gaussian_policy

NUM_ENVS = 4
HORIZON = 6


@pytest.fixture(scope="module")
def pendulum_setup():
    env = envs.make("pendulum")
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size, hidden_sizes=(16,))
    params = policy.init(jax.random.PRNGKey(0))
    starts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), NUM_ENVS))
    return env, policy, params, starts


@pytest.mark.parametrize("name", estimators.names())
def test_estimator_contract(pendulum_setup, name):
    assert_follows_the_contract(name, *pendulum_setup, horizon=HORIZON)


def test_score_is_not_the_zero_pathwise_derivative():
    """d/dtheta log pi(sample(theta)) through the sample is identically 0 for a location family;
    the policy's log_prob must return the score (u - mean) / std^2 instead."""
    policy = make_linear_gaussian_policy(2, 1, init_log_std=0.0)
    params = policy.init(jax.random.PRNGKey(0))
    obs = jnp.array([0.3, -0.7])
    key = jax.random.PRNGKey(1)

    def log_prob_of_own_sample(p):
        return policy.log_prob(p, obs, policy.sample(p, obs, key))

    score = jax.grad(log_prob_of_own_sample)(params)
    raw = policy.sample(params, obs, key)
    mean, std = policy.distribution(params, obs)
    expected_bias_score = (raw - mean) / std**2
    np.testing.assert_allclose(score["bias"], expected_bias_score, rtol=1e-5)
    assert np.all(np.abs(score["bias"]) > 0)


def test_squashed_policy_actions_are_bounded_and_mode_is_deterministic():
    policy = make_gaussian_mlp_policy(3, 2, hidden_sizes=(8,), init_log_std=1.0)
    params = policy.init(jax.random.PRNGKey(0))
    obs = jnp.ones((5, 3))
    raw = policy.sample(params, obs, jax.random.PRNGKey(1))
    action = policy.to_action(raw)
    assert action.shape == (5, 2) and np.all(np.abs(action) <= 1)
    np.testing.assert_array_equal(policy.mode(params, obs), policy.mode(params, obs))
    assert policy.log_prob(params, obs, raw).shape == (5,)


def test_running_statistics_match_numpy_and_start_as_identity():
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(3, 50, 4)).astype(np.float32)
    stats = init_statistics(4)
    np.testing.assert_array_equal(normalize(stats, data[0, 0]), data[0, 0])
    large = np.array([50.0, -300.0, 0.5, 12.0], np.float32)  # never clipped before any data
    np.testing.assert_array_equal(normalize(stats, large), large)
    for chunk in data:
        stats = update_statistics(stats, chunk)
    flat = data.reshape(-1, 4)
    np.testing.assert_allclose(stats.mean, flat.mean(0), rtol=1e-5)
    expected = np.clip((flat[0] - flat.mean(0)) / flat.std(0), -10, 10)
    np.testing.assert_allclose(normalize(stats, flat[0]), expected, rtol=1e-3)


def test_running_statistics_leave_out_excluded_and_non_finite_rows():
    data = np.random.default_rng(1).normal(size=(6, 3, 2)).astype(np.float32)  # [T, B, size]
    data[4, 1] = 1e9  # environment 1 blows up: absurd, then NaN
    data[5, 1] = np.nan
    include = np.isfinite(data).all(axis=(0, 2))[None]  # [1, B]
    stats = update_statistics(init_statistics(2), data, include=include)
    kept = data[:, [0, 2]].reshape(-1, 2)
    np.testing.assert_allclose(stats.mean, kept.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.sum_sq_dev, kept.var(0) * len(kept), rtol=1e-4)
    without = update_statistics(init_statistics(2), data)  # drops the NaN row only
    assert np.all(np.abs(without.mean) > 1e7)


# ----------------------------------------------------------------------------- bad settings


def _lqr_and_policy():
    env = envs.make("lqr")
    return env, make_linear_gaussian_policy(env.observation_size, env.action_size)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: partial(envs.make, "no_such_env"), "lqr"),
        (lambda: partial(envs.make, "ant", backend="warp_drive"), "generalized"),
        (lambda: partial(envs.make, "lqr", backend="spring"), "backend"),
        (lambda: partial(envs.make, "lqr", episode_length=0), "episode_length"),
        (lambda: partial(estimators.make, "no_such", *_lqr_and_policy()), "reinforce"),
        (lambda: partial(estimators.make, "reinforce", *_lqr_and_policy(), horizon=0), "horizon"),
        (lambda: partial(estimators.make, "bptt", *_lqr_and_policy(), horizon=-3), "horizon"),
        (lambda: partial(estimators.make, "shac", *_lqr_and_policy(), horizon=10, window=3),
         "window"),
        (lambda: partial(estimators.make, "reinforce", *_lqr_and_policy(), baseline="median"),
         "leave_one_out"),
        (lambda: partial(estimators.make, "reinforce", *_lqr_and_policy(), discount=1.5),
         "discount"),
        (lambda: partial(estimators.make, "shac", *_lqr_and_policy(), horizon_typo=3), "horizon"),
        (lambda: partial(estimators.make, "reinforce", envs.make("lqr"),
                         make_linear_gaussian_policy(2, 3)), "action_size"),
        (lambda: partial(make_gaussian_mlp_policy, 3, 1, activation="swish"), "elu"),
        (lambda: partial(estimators.make, "ppo", *_lqr_and_policy(), clip_ratio=float("nan")),
         "clip_ratio"),
        (lambda: partial(estimators.make, "ppo", *_lqr_and_policy(), advantage="gae",
                         baseline="none"), "baseline"),
        # the settings SAPO and AHAC share (EnsembleCriticSettings), through each of them
        *[(lambda name=name, bad=bad: partial(estimators.make, name, *_lqr_and_policy(), **bad),
           next(iter(bad)))
          for name in ("sapo", "ahac")
          for bad in ({"critic_members": 0}, {"discount": 1.5}, {"critic_learning_rate": -1.0},
                      {"target_critic_keep": 2.0}, {"horizon": 0})],
        (lambda: partial(estimators.make, "sapo", *_lqr_and_policy(), horizon=10, window=3),
         "window"),
    ],
)
def test_bad_settings_raise_clear_errors_before_compiling(call, message):
    call = call()  # builds what the bad call needs (an env may compile small eager ops)
    with compiles() as compiled, pytest.raises(ValueError, match=message) as error:
        call()
    assert "=" in str(error.value) or "allowed" in str(error.value)
    assert len(str(error.value).splitlines()) == 1
    assert compiled == [], "validation must happen in plain Python, before any compile"


def test_the_compile_spy_sees_a_compile():
    """Positive control of the spy the bad-settings tests use: a fresh jitted function compiles
    (from the persistent cache or not, the compile step runs)."""
    ones = jnp.ones(7)
    with compiles() as compiled:
        jax.jit(lambda x: x * 3.0 + 0.123456)(ones)
    assert len(compiled) == 1


def test_leave_one_out_needs_two_rollouts():
    env, policy = _lqr_and_policy()
    estimator = estimators.make("reinforce", env, policy, horizon=3)
    params = policy.init(jax.random.PRNGKey(0))
    one_state = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), 1))
    with pytest.raises(ValueError, match="rollouts_per_state"):
        estimator.estimate(params, init_statistics(env.observation_size),
                           estimator.init(jax.random.PRNGKey(2), params), one_state,
                           jax.random.PRNGKey(3))


@pytest.mark.parametrize(("name", "extra"), [("bptt", {}), ("shac", {"window": 6})])
def test_rematerialised_rollouts_give_the_same_gradient(pendulum_setup, name, extra):
    """``remat_segment`` changes what reverse mode stores, not the gradient (float tolerance:
    the recomputed forward pass is the same program)."""
    env, policy, params, starts = pendulum_setup
    grads = []
    stats = init_statistics(env.observation_size)
    for segment in (0, 3):
        estimator = estimators.make(name, env, policy, horizon=12, remat_segment=segment, **extra)
        state = estimator.init(jax.random.PRNGKey(2), params)
        grads.append(jax.jit(estimator.estimate)(params, stats, state, starts,
                                                 jax.random.PRNGKey(3)).grad)
    for plain, remat in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(remat, plain, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="remat_segment=5"):
        estimators.make(name, env, policy, horizon=12, remat_segment=5, **extra)
