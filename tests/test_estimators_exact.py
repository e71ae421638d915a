"""Every estimator against the exact policy gradient of the linear-quadratic regulator.

Tolerances come from the estimates' own standard errors (``conftest.assert_unbiased``): each
coordinate of the mean of K independent estimates must lie within 4 standard errors of
``jax.grad`` of the closed-form expected return, with K large enough that a 25% error in norm would
be detected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_unbiased, flatten, flatten_samples, independent_estimates, learn

from diffpg import estimators
from diffpg.acting import unroll
from diffpg.estimators.critic_backprop import CriticBackpropSettings, make_critic_backprop
from diffpg.estimators.reinforce import ReinforceSettings, make_reinforce, score_function_gradient
from diffpg.estimators.shac import ShacSettings, make_shac
from diffpg.normalization import init_statistics

# (settings, number of independent estimates of 16 rollouts each)
UNBIASED_REINFORCE = {
    "none": (dict(baseline="none"), 6000),
    "leave_one_out": (dict(baseline="leave_one_out"), 3000),
    "leave_one_out_groups": (dict(baseline="leave_one_out", rollouts_per_state=4), 1500),
    "optimal": (dict(baseline="optimal"), 3000),
    "total_return": (dict(baseline="leave_one_out", reward_to_go=False), 6000),
}


@pytest.mark.parametrize("variant", sorted(UNBIASED_REINFORCE))
def test_reinforce_is_unbiased(lqr, variant):
    overrides, num_estimates = UNBIASED_REINFORCE[variant]
    settings = ReinforceSettings(horizon=lqr.horizon, discount=lqr.discount, **overrides)
    estimator = make_reinforce(lqr.env, lqr.policy, settings)
    samples = independent_estimates(estimator, lqr, num_estimates)
    assert_unbiased(samples, lqr.exact_gradient())


def test_reinforce_with_exact_value_baseline_is_unbiased(lqr):
    settings = ReinforceSettings(horizon=lqr.horizon, discount=lqr.discount, baseline="value")
    estimator = make_reinforce(lqr.env, lqr.policy, settings, lqr.exact_value_function())
    samples = independent_estimates(estimator, lqr, 1500)
    assert_unbiased(samples, lqr.exact_gradient())


def test_reinforce_with_learned_value_baseline_is_unbiased(lqr):
    settings = ReinforceSettings(horizon=lqr.horizon, discount=lqr.discount, baseline="value")
    estimator = make_reinforce(lqr.env, lqr.policy, settings)
    # Fit the baseline a little: any state-only baseline is unbiased.
    state = learn(estimator, lqr, estimator.init(jax.random.PRNGKey(5), lqr.params), 30)
    samples = independent_estimates(estimator, lqr, 4000, state=state)
    assert_unbiased(samples, lqr.exact_gradient())


def test_batch_mean_baseline_is_scaled_by_one_minus_one_over_n(lqr):
    """The batch mean contains each sample's own return: E[estimate] = (1 - 1/n) grad J."""
    settings = ReinforceSettings(horizon=lqr.horizon, discount=lqr.discount, baseline="batch_mean")
    estimator = make_reinforce(lqr.env, lqr.policy, settings)
    samples = independent_estimates(estimator, lqr, 3000)
    num_rollouts = lqr.start_states.obs.shape[0]
    exact = lqr.exact_gradient()
    assert_unbiased(samples, jax.tree.map(lambda g: (1 - 1 / num_rollouts) * g, exact))


def test_batch_mean_bias_is_detected_with_two_rollouts(lqr):
    """With n = 2 the estimate is half the gradient; the exactness check must reject it."""
    two = lqr.__class__(num_states=2)
    settings = ReinforceSettings(horizon=two.horizon, discount=two.discount, baseline="batch_mean")
    estimator = make_reinforce(two.env, two.policy, settings)
    samples = independent_estimates(estimator, two, 20000)
    exact = two.exact_gradient()
    assert_unbiased(samples, jax.tree.map(lambda g: 0.5 * g, exact))
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(samples, exact)


def test_importance_weights_correct_stale_data(lqr):
    """Data from an older policy, reweighted per decision, estimates the new policy's gradient."""
    settings = ReinforceSettings(horizon=lqr.horizon, discount=lqr.discount)
    behaviour = jax.tree.map(lambda x: x, lqr.params)
    behaviour["gain"] = lqr.params["gain"] + jnp.array([[0.15, -0.1]])
    behaviour["bias"] = lqr.params["bias"] - 0.1
    stats = init_statistics(lqr.env.observation_size)

    def estimate(key, weighted):
        _, data = unroll(lqr.env, lqr.policy, behaviour, stats, lqr.start_states, key,
                         lqr.horizon)
        behaviour_log_prob = lqr.policy.log_prob(behaviour, data.obs, data.raw_action)
        grad, _ = score_function_gradient(
            lqr.policy, lqr.params, stats, data, settings,
            behaviour_log_prob=behaviour_log_prob if weighted else None,
        )
        return grad

    keys = jax.random.split(jax.random.PRNGKey(11), 12000)
    weighted = jax.jit(jax.vmap(lambda k: estimate(k, True)))(keys)
    assert_unbiased(weighted, lqr.exact_gradient())
    unweighted = jax.jit(jax.vmap(lambda k: estimate(k, False)))(keys)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(unweighted, lqr.exact_gradient())


def test_full_horizon_bptt_is_exact(lqr):
    estimator = estimators.make("bptt", lqr.env, lqr.policy, horizon=lqr.horizon,
                                discount=lqr.discount)
    samples = independent_estimates(estimator, lqr, 400)
    assert_unbiased(samples, lqr.exact_gradient(), resolvable_error=0.02)


@pytest.mark.parametrize("window", [1, 5])
def test_shac_with_the_true_value_is_exact(lqr, window):
    """Windows cut the gradient; the exact V's gradient at the cut restores the missing part."""
    settings = ShacSettings(horizon=lqr.horizon, window=window, discount=lqr.discount,
                            finite_horizon=True, target_critic_keep=1.0)
    estimator = make_shac(lqr.env, lqr.policy, settings, lqr.exact_value_function())
    samples = independent_estimates(estimator, lqr, 400)
    assert_unbiased(samples, lqr.exact_gradient(), resolvable_error=0.02)


def test_shac_with_a_wrong_value_is_biased(lqr):
    settings = ShacSettings(horizon=lqr.horizon, window=5, discount=lqr.discount,
                            finite_horizon=True)
    estimator = make_shac(lqr.env, lqr.policy, settings)  # untrained critic
    samples = independent_estimates(estimator, lqr, 400)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(samples, lqr.exact_gradient(), resolvable_error=0.02)


@pytest.mark.parametrize("deterministic", [False])
def test_critic_backprop_with_the_true_q_is_exact(lqr, deterministic):
    settings = CriticBackpropSettings(horizon=lqr.horizon, discount=lqr.discount,
                                      deterministic=deterministic)
    estimator = make_critic_backprop(lqr.env, lqr.policy, settings, lqr.exact_q_function())
    samples = independent_estimates(estimator, lqr, 1000)
    assert_unbiased(samples, lqr.exact_gradient(), resolvable_error=0.05)


def test_critic_backprop_bias_with_a_learned_q_shrinks_with_training(lqr):
    """The learned critic's bias, measured: relative error of the mean estimate before and after
    fitting Q by TD on the fixed policy's data."""
    settings = CriticBackpropSettings(horizon=lqr.horizon, discount=lqr.discount,
                                      critic_learning_rate=3e-3, critic_iterations=16,
                                      finite_horizon=True)
    estimator = make_critic_backprop(lqr.env, lqr.policy, settings)
    state = estimator.init(jax.random.PRNGKey(4), lqr.params)
    exact = flatten(lqr.exact_gradient())

    def relative_bias(state):
        mean = flatten_samples(independent_estimates(estimator, lqr, 200, state=state)).mean(0)
        return np.linalg.norm(mean - exact) / np.linalg.norm(exact)

    before = relative_bias(state)
    after = relative_bias(learn(estimator, lqr, state, 300, seed=1000))
    print(f"critic backprop relative bias: untrained {before:.3f}, after 300 TD fits {after:.3f}")
    assert after < 0.5 * before


def test_alpha_order_weights_by_inverse_variance_and_falls_back_when_biased():
    from diffpg.estimators.alpha_order import combine

    rng = np.random.default_rng(0)
    truth = np.array([1.0, -2.0, 0.5])
    first = truth + 0.1 * rng.normal(size=(64, 3))
    zeroth = truth + 1.0 * rng.normal(size=(64, 3))
    grad, alpha, var_first, var_zeroth, fell_back = combine(jnp.asarray(first),
                                                            jnp.asarray(zeroth), 3.0)
    assert not fell_back
    np.testing.assert_allclose(alpha, var_zeroth / (var_first + var_zeroth), rtol=1e-6)
    assert 0.95 < alpha < 1.0  # 100x smaller variance: the first-order estimate dominates
    np.testing.assert_allclose(grad, alpha * first.mean(0) + (1 - alpha) * zeroth.mean(0),
                               rtol=1e-5)
    # A first-order mean far outside the zeroth-order noise is treated as biased.
    _, alpha, _, _, fell_back = combine(jnp.asarray(first + 5.0), jnp.asarray(zeroth), 3.0)
    assert fell_back and alpha == 0.0
    # Non-finite first-order samples never reach the result.
    first[3, 1] = np.nan
    grad, alpha, _, _, fell_back = combine(jnp.asarray(first), jnp.asarray(zeroth), 3.0)
    assert fell_back and np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, zeroth.mean(0), rtol=1e-5)


def test_alpha_order_on_the_smooth_lqr_leans_first_order_and_is_accurate(lqr):
    estimator = estimators.make("alpha_order", lqr.env, lqr.policy, horizon=lqr.horizon,
                                discount=lqr.discount)
    state = estimator.init(jax.random.PRNGKey(0), lqr.params)
    keys = jax.random.split(jax.random.PRNGKey(6), 200)
    out = jax.jit(jax.vmap(estimator.estimate, (None, None, None, None, 0)))(
        lqr.params, lqr.obs_stats, state, lqr.start_states, keys)
    assert float(np.mean(out.metrics["alpha"])) > 0.9
    assert float(np.mean(out.metrics["fell_back"])) < 0.05
    assert_unbiased(out.grad, lqr.exact_gradient(), resolvable_error=0.05)


@pytest.mark.parametrize("baseline", ["leave_one_out", "optimal"])
def test_per_rollout_terms_average_to_the_estimate(lqr, baseline):
    settings = ReinforceSettings(horizon=lqr.horizon, discount=lqr.discount, baseline=baseline)
    stats = init_statistics(lqr.env.observation_size)
    _, data = unroll(lqr.env, lqr.policy, lqr.params, stats, lqr.start_states,
                     jax.random.PRNGKey(8), lqr.horizon)
    batch, _ = score_function_gradient(lqr.policy, lqr.params, stats, data, settings)
    terms, _ = score_function_gradient(lqr.policy, lqr.params, stats, data, settings,
                                       per_rollout=True)
    for whole, parts in zip(jax.tree.leaves(batch), jax.tree.leaves(terms), strict=True):
        assert parts.shape == (lqr.start_states.obs.shape[0],) + whole.shape
        np.testing.assert_allclose(parts.mean(0), whole, rtol=1e-4, atol=1e-5)
