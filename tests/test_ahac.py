"""AHAC (``diffpg.estimators.ahac``): its segmented return against a plain loop, its horizon's
dual update against the constraint it solves, and its stiffness probe against a known Jacobian.
Its gradient is checked against the exact one in ``exact_cases.py`` (segments of 3 steps over
10, with and without episode ends inside them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffpg import envs, estimators
from diffpg.acting import StepHook, unroll
from diffpg.estimators.ahac import (
    AhacSettings,
    adapt_horizon,
    measure_action_sensitivity,
    segment_ends,
    segmented_return,
)
from diffpg.normalization import init_statistics
from diffpg.policy import make_linear_gaussian_policy
from diffpg.training import make_trainer, settings_for


def _plain_segmented_return(reward, done, truncation, next_value, end, discount,
                            final_bootstrap, survival_probability=None):
    """The loop: with ``survival_probability``, each reward weighted by the probability of being
    alive before its step and each value by that after it, from each segment's start."""
    steps, batch = reward.shape
    if survival_probability is None:
        survival_probability = np.ones((steps, batch))
    totals = np.zeros(batch)
    for b in range(batch):
        weight, alive = 1.0, 1.0
        for t in range(steps):
            if t > 0 and end[t - 1]:
                alive = 1.0
            totals[b] += weight * alive * reward[t, b]
            alive *= survival_probability[t, b]
            bootstrap = truncation[t, b] or (end[t] and not done[t, b])
            if t == steps - 1 and not final_bootstrap:
                bootstrap = False
            if bootstrap:
                totals[b] += weight * alive * discount * next_value[t, b]
            weight = 1.0 if done[t, b] else weight * discount
            alive = 1.0 if done[t, b] else alive
    return totals


@pytest.mark.parametrize("final_bootstrap", [True, False])
@pytest.mark.parametrize("gradient_horizon", [1, 3, 7, 10])
def test_segmented_return_matches_a_plain_loop(gradient_horizon, final_bootstrap):
    rng = np.random.default_rng(gradient_horizon)
    steps, batch = 10, 6
    reward = rng.normal(size=(steps, batch))
    termination = rng.random((steps, batch)) < 0.1
    truncation = ~termination & (rng.random((steps, batch)) < 0.1)
    done = termination | truncation
    next_value = rng.normal(size=(steps, batch))
    end = np.asarray(segment_ends(jnp.asarray(gradient_horizon), steps))
    expected_ends = [(t + 1) % gradient_horizon == 0 or t == steps - 1 for t in range(steps)]
    np.testing.assert_array_equal(end, expected_ends)
    got, rewards = segmented_return(jnp.asarray(reward), jnp.asarray(done, float),
                              jnp.asarray(truncation, float), jnp.asarray(next_value),
                              jnp.asarray(end, float), 0.9, final_bootstrap)
    # float32 sums of 2T terms of order 1: rounding error up to a few eps per term
    float32_error = 2 * steps * 4 * np.finfo(np.float32).eps * np.abs(reward).max()
    np.testing.assert_allclose(got, _plain_segmented_return(
        reward, done, truncation, next_value, end, 0.9, final_bootstrap),
        rtol=0, atol=float32_error)
    np.testing.assert_allclose(rewards, _plain_segmented_return(  # the values' part left out
        reward, done, truncation, np.zeros_like(next_value), end, 0.9, final_bootstrap),
        rtol=0, atol=float32_error)
    survival_probability = rng.uniform(0.3, 1.0, (steps, batch))
    weighted, task_rewards = segmented_return(
        jnp.asarray(reward), jnp.asarray(done, float), jnp.asarray(truncation, float),
        jnp.asarray(next_value), jnp.asarray(end, float), 0.9, final_bootstrap,
        survival_probability=jnp.asarray(survival_probability))
    np.testing.assert_allclose(weighted, _plain_segmented_return(
        reward, done, truncation, next_value, end, 0.9, final_bootstrap, survival_probability),
        rtol=0, atol=float32_error)
    np.testing.assert_allclose(task_rewards, rewards, rtol=0, atol=float32_error)


@pytest.mark.parametrize(("stiffness", "settles_at"), [
    (2.0, 20.0),  # C / c inside the range
    (0.5, 32.0),  # smoother than the constraint needs: the longest horizon
    (10.0, 8.0),  # stiffer: the shortest
])
def test_the_dual_update_settles_where_the_constraint_binds(stiffness, settles_at):
    """With a constant stiffness ``c`` and threshold ``C = 40`` the horizon settles at
    ``clip(C / c, 8, 32)``: the longest horizon whose accumulated stiffness stays below C."""
    settings = AhacSettings(horizon=32, horizon_min=8, initial_horizon=8, dual_learning_rate=0.5)
    multiplier, horizon = jnp.asarray(1.0), jnp.asarray(8.0)
    for _ in range(200):
        multiplier, horizon = adapt_horizon(multiplier, horizon, jnp.asarray(stiffness),
                                            jnp.asarray(40.0), settings)
    assert float(horizon) == settles_at
    assert float(horizon) * stiffness <= 40.0 or settles_at == settings.horizon_min


@pytest.mark.parametrize("stiffness", [np.nan, np.inf, 0.0])
def test_a_stiffness_that_says_nothing_leaves_the_horizon_alone(stiffness):
    settings = AhacSettings()
    multiplier, horizon = adapt_horizon(jnp.asarray(0.7), jnp.asarray(12.0),
                                        jnp.asarray(stiffness), jnp.asarray(40.0), settings)
    assert (float(multiplier), float(horizon)) == (pytest.approx(0.7), 12.0)


def test_the_stiffness_probe_measures_the_action_jacobian():
    """On ``x' = A x + B a`` the observation's Jacobian in the action is ``B``: the probe's
    ``E[c^2]`` is ``||B||_F^2``, within four standard errors of its sample mean."""
    b = np.array([[0.3, -1.2], [0.8, 0.5]])
    env = envs.make("lqr", A=np.eye(2), B=b, R=0.1 * np.eye(2))
    policy = make_linear_gaussian_policy(2, 2, init_log_std=0.0)
    params = policy.init(jax.random.PRNGKey(0))
    starts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), 256))
    measure = measure_action_sensitivity(env)
    _, tr = unroll(env, policy, params, init_statistics(2), starts, jax.random.PRNGKey(2), 8,
                   hook=StepHook(None, lambda step, state, _, key: step(state, key,
                                                                          simulate=measure)))
    squares = np.asarray(tr.measurement, np.float64).ravel() ** 2
    standard_error = squares.std(ddof=1) / np.sqrt(squares.size)
    assert abs(squares.mean() - np.sum(b**2)) < 4 * standard_error


def test_measuring_the_stiffness_on_fewer_envs_keeps_the_gradient_and_the_measurements():
    """``stiffness_envs=k``: the first ``k`` envs' measurements are those of measuring all (the
    same directions), the others NaN, the update's stiffness their mean; the gradient is the
    one of measuring all, within float32 rounding (the measurement is not differentiated)."""
    env = envs.make("pendulum")
    policy = make_linear_gaussian_policy(env.observation_size, env.action_size)
    params = policy.init(jax.random.PRNGKey(0))
    stats = init_statistics(env.observation_size)
    starts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), 8))
    results = {}
    for measured in (None, 3):
        estimator = estimators.make("ahac", env, policy, horizon=12, horizon_min=2,
                                    initial_horizon=4, stiffness_envs=measured)
        state = estimator.init(jax.random.PRNGKey(2), params)
        estimate = jax.jit(estimator.estimate)(params, stats, state, starts,
                                               jax.random.PRNGKey(3))
        _, metrics = jax.jit(estimator.update)(params, stats, state, estimate.batch,
                                               jax.random.PRNGKey(4))
        results[measured] = (estimate, metrics)
    (every, _), (three, three_metrics) = results[None], results[3]
    for a, b in zip(jax.tree.leaves(every.grad), jax.tree.leaves(three.grad), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(a))))
    full, part = (np.asarray(e.batch.transitions.measurement) for e in (every, three))
    np.testing.assert_allclose(part[:, :3], full[:, :3], rtol=1e-5)
    assert np.isnan(part[:, 3:]).all() and np.isfinite(full).all()
    np.testing.assert_allclose(float(three_metrics["stiffness"]), part[:, :3].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="stiffness_envs"):
        estimators.make_settings("ahac", stiffness_envs=0)


def test_ahac_trains_and_adapts_its_horizon():
    """Two calls of AHAC on the pendulum: the threshold is calibrated on the first batch, the
    horizon (a whole number of steps) is logged and stays in its range, the parameters stay
    finite, and the second call does not compile again."""
    settings = settings_for(env="pendulum", estimator="ahac", updates=8, updates_per_call=4,
                            num_envs=8, eval_envs=2, hidden_sizes=(16,),
                            estimator_options={"horizon": 16, "horizon_min": 2,
                                               "initial_horizon": 4})
    trainer = make_trainer(settings)
    state, _ = trainer.run_updates(trainer.init_run())
    state, metrics = trainer.run_updates(state)
    assert trainer.run_updates._cache_size() == 1
    assert 2 <= float(metrics["training/gradient_horizon"]) <= 16  # the call's mean
    horizon = float(state.estimator_state.gradient_horizon)
    assert 2 <= horizon <= 16 and horizon == round(horizon)
    assert float(state.estimator_state.stiffness_threshold) > 0
    assert np.isfinite(float(metrics["training/stiffness"]))
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(state.params))


def test_bad_ahac_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="initial_horizon=40 must lie in"):
        estimators.make_settings("ahac", horizon=32, initial_horizon=40)
    with pytest.raises(ValueError, match="stiffness_threshold"):
        estimators.make_settings("ahac", stiffness_threshold=-1.0)
