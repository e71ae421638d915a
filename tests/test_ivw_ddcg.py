"""IVW-H and DDCG (``diffpg.estimators.ivw``, ``diffpg.estimators.ddcg``): their per-step terms
against plain transcriptions of BPTT and REINFORCE, the cross-fitted mix, and the smoothness test
against the rates its statistics predict. (Both are also exactness cases in ``exact_cases.py``
and contract cases in ``test_contract.py``.)"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flatten

from diffpg import envs, estimators, returns
from diffpg.acting import unroll
from diffpg.estimators.ddcg import smoothness_test
from diffpg.estimators.ivw import StepMeans, inverse_variance_mix, simulate, step_means
from diffpg.policy import make_gaussian_mlp_policy


@pytest.fixture(scope="module")
def pendulum():
    env = envs.make("pendulum")
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size, hidden_sizes=(8,))
    params = policy.init(jax.random.PRNGKey(0))
    starts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), 6))
    from diffpg.normalization import init_statistics
    return env, policy, params, init_statistics(env.observation_size), starts


def test_step_terms_add_up_to_bptt_and_reinforce_on_the_same_rollouts(pendulum):
    """sum_k F_k is the gradient of the batch's mean return through the dynamics, and sum_k Z_k
    REINFORCE's leave-one-out estimate, on the rollouts of the same key."""
    env, policy, params, stats, starts = pendulum
    horizon, discount, key = 12, 0.97, jax.random.PRNGKey(2)
    rollouts = simulate(env, policy, params, stats, starts, key, horizon, discount,
                        "leave_one_out", 1)
    means = step_means(policy, params, stats, rollouts, pool=1)

    def mean_return(p):
        _, tr = unroll(env, policy, p, stats, starts, key, horizon)
        return jnp.mean(jnp.sum(returns.segment_discounts(tr.done, discount) * tr.reward, 0))

    bptt = flatten(jax.grad(mean_return)(params))
    np.testing.assert_allclose(np.asarray(means.first_order).sum((0, 1)), bptt, rtol=2e-4,
                               atol=1e-6 * np.abs(bptt).max())
    reinforce = estimators.make("reinforce", env, policy, horizon=horizon, discount=discount,
                                baseline="leave_one_out")
    expected = flatten(reinforce.estimate(params, stats, None, starts, key).grad)
    np.testing.assert_allclose(np.asarray(means.zeroth_order).sum((0, 1)), expected, rtol=2e-4,
                               atol=1e-6 * np.abs(expected).max())
    assert np.all(np.asarray(means.zeroth_order_unmasked) == 0)
    # The two halves split the six start states three and three, each variance from its own.
    assert means.first_order.shape[:2] == (2, horizon)


def test_the_mix_weights_each_half_with_the_other_halfs_inverse_variances():
    rng = np.random.default_rng(0)
    steps, size = 3, 4
    first, zeroth, unmasked = (jnp.asarray(rng.normal(size=(2, steps, size))) for _ in range(3))
    var_first = jnp.asarray(rng.uniform(0.1, 2.0, size=(2, steps)))
    var_zeroth = jnp.asarray(rng.uniform(0.1, 2.0, size=(2, steps)))
    finite = jnp.ones((2, steps), bool).at[1, 2].set(False)
    grad, alpha = inverse_variance_mix(
        StepMeans(first, zeroth, unmasked, var_first, var_zeroth, finite))
    expected = np.zeros(size)
    for half in range(2):
        for k in range(steps):
            other = 1 - half
            a = var_zeroth[other, k] / (var_first[other, k] + var_zeroth[other, k])
            if k == 2:  # a non-finite first-order term in either half: score function only
                a = 0.0
            expected += a * first[half, k] + (1 - a) * zeroth[half, k] + unmasked[half, k]
    np.testing.assert_allclose(grad, expected, rtol=1e-6)
    assert alpha[1, 2] == 0 and alpha[0, 2] > 0


def test_ivw_refuses_a_batch_it_cannot_split(pendulum):
    env, policy, params, stats, starts = pendulum
    estimator = estimators.make("ivw", env, policy, horizon=4)
    one_state = jax.tree.map(lambda x: x[:1], starts)
    with pytest.raises(ValueError, match="at least 2"):
        estimator.estimate(params, stats, None, one_state, jax.random.PRNGKey(0))


def test_smoothness_test_false_alarm_rate_on_a_smooth_return_matches_its_chi_square():
    """R = g . eps (linear, smooth): Var R = ||g||^2 = E||grad R||^2 exactly, and each rollout's
    statistic over its 3 others is chi2_2 / 2; at c = 3 it fails with probability e^-3."""
    rng = np.random.default_rng(1)
    states, m, dim = 20000, 4, 5
    g = rng.normal(size=(states, 1, dim))
    eps = rng.normal(size=(states, m, dim))
    values = jnp.asarray(np.sum(g * eps, axis=2))
    norms = jnp.asarray(np.broadcast_to(np.sum(g**2, axis=2), (states, m)))
    smooth, rho = smoothness_test(values, norms, 3.0)
    per_state = 1.0 - np.asarray(smooth).mean(axis=1)  # a state's verdicts share rollouts
    rate, standard_error = per_state.mean(), per_state.std(ddof=1) / math.sqrt(states)
    expected = math.exp(-3.0)  # P(chi2_2 / 2 > 3)
    assert abs(rate - expected) < 4 * standard_error, (rate, expected)
    assert float(np.median(rho)) < 1.0


def test_smoothness_test_flags_a_jump_unless_the_other_rollouts_agree():
    """R = J [eps > 0]: its gradient is 0 wherever it exists, and the jump is invisible to it. A
    rollout passes only if its 3 others fell on the same side (probability 2 / 8): then they show
    no spread either."""
    rng = np.random.default_rng(2)
    states, m = 20000, 4
    eps = rng.normal(size=(states, m))
    values = jnp.asarray(10.0 * (eps > 0))
    norms = jnp.zeros((states, m))
    smooth, _ = smoothness_test(values, norms, 3.0)
    others_agree = np.zeros((states, m), bool)
    side = eps > 0
    for i in range(m):
        others = np.delete(side, i, axis=1)
        others_agree[:, i] = others.all(1) | (~others).all(1)
    np.testing.assert_array_equal(np.asarray(smooth), others_agree)
    assert abs(float(np.mean(others_agree)) - 0.25) < 0.01
    # A non-finite gradient fails its own rollout and the others of its state.
    values = jnp.zeros((1, m))
    smooth, _ = smoothness_test(values, jnp.ones((1, m)).at[0, 0].set(jnp.nan), 3.0)
    assert not np.any(np.asarray(smooth))
    smooth, _ = smoothness_test(values, jnp.ones((1, m)), 3.0)
    assert np.all(np.asarray(smooth))


def test_ddcg_needs_three_rollouts_per_state():
    with pytest.raises(ValueError, match="rollouts_per_state=2 must be at least 3"):
        estimators.make_settings("ddcg", rollouts_per_state=2)
