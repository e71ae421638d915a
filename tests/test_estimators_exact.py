"""Every estimator against the exact policy gradient of the linear-quadratic regulator.

Tolerances come from the estimates' own standard errors (``conftest.assert_unbiased``): each
coordinate of the mean of K independent estimates must lie within 4 standard errors of
``jax.grad`` of the closed-form expected return, with K large enough that 6 standard errors of the
norm fit within the stated error (20% for the score-function estimators, 2% for the pathwise
ones), so an estimator off by that much fails with high probability (``test_sensitivity.py``
shows each case failing on 0.8 times its gradient). The cases (``exact_cases.py``) run on the
plain problem (the horizon inside one episode) and on one whose horizon of 10 steps crosses
episode ends: 4-step episodes (time-limit truncations and auto-resets to each environment's
stored first state), every environment starting 2 steps into its episode from elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    LinearQuadraticProblem,
    assert_unbiased,
    flatten,
    flatten_samples,
    independent_estimates,
    learn,
)
from exact_cases import CASE_IDS, CASES, SCORE_FUNCTION_ERROR, make_problem

from diffpg import estimators
from diffpg.acting import unroll
from diffpg.estimators.critic_backprop import CriticBackpropSettings, make_critic_backprop
from diffpg.estimators.reinforce import ReinforceSettings, make_reinforce, score_function_gradient
from diffpg.estimators.shac import ShacSettings, make_shac
from diffpg.normalization import init_statistics


@pytest.fixture(scope="module")
def problems() -> dict[str, LinearQuadraticProblem]:
    return {kind: make_problem(kind) for kind in ("plain", "crossing")}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_estimator_is_exact(problems, case):
    lqr = problems[case.problem]
    estimator, state = case.build(lqr)
    samples = independent_estimates(estimator, lqr, case.num_estimates, state=state)
    detectable = assert_unbiased(samples, lqr.exact_gradient(),
                                 resolvable_error=case.resolvable_error)
    print(f"{case.name} ({case.problem}): detects a relative error of {detectable:.3f}")


def test_an_exact_value_baseline_cuts_the_variance(problems):
    """Unbiased with far fewer estimates: 1000 resolve a 10% error (leave-one-out needs about
    10,000 for 20%)."""
    lqr = problems["crossing"]
    estimator, _ = CASES[[c.name for c in CASES].index("reinforce:baseline=value (exact V)")
                         ].build(lqr)
    assert assert_unbiased(independent_estimates(estimator, lqr, 1000), lqr.exact_gradient(),
                           resolvable_error=0.1) <= 0.1


def test_batch_mean_baseline_is_scaled_by_one_minus_one_over_n():
    """The batch mean contains each sample's own return: E[estimate] = (1 - 1/n) grad J. With
    n = 4 that is 0.75 grad J, a 25% error the test resolves; the exact gradient is rejected."""
    four = LinearQuadraticProblem(num_states=4)
    settings = ReinforceSettings(horizon=four.horizon, discount=four.discount,
                                 baseline="batch_mean")
    estimator = make_reinforce(four.env, four.policy, settings)
    samples = independent_estimates(estimator, four, 40000)
    exact = four.exact_gradient()
    assert_unbiased(samples, jax.tree.map(lambda g: 0.75 * g, exact))
    with pytest.raises(AssertionError, match="biased"):  # negative control
        assert_unbiased(samples, exact)


def test_batch_mean_bias_is_detected_with_two_rollouts():
    """With n = 2 the estimate is half the gradient; the exactness check must reject it."""
    two = LinearQuadraticProblem(num_states=2)
    settings = ReinforceSettings(horizon=two.horizon, discount=two.discount, baseline="batch_mean")
    estimator = make_reinforce(two.env, two.policy, settings)
    samples = independent_estimates(estimator, two, 45000)
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

    keys = jax.random.split(jax.random.PRNGKey(11), 42000)
    weighted = jax.jit(jax.vmap(lambda k: estimate(k, True)))(keys)
    assert_unbiased(weighted, lqr.exact_gradient(), resolvable_error=SCORE_FUNCTION_ERROR)
    with pytest.raises(AssertionError, match="biased"):  # the test fails on 0.8x the gradient
        assert_unbiased(jax.tree.map(lambda g: 0.8 * g, weighted), lqr.exact_gradient(),
                        resolvable_error=SCORE_FUNCTION_ERROR)
    unweighted = jax.jit(jax.vmap(lambda k: estimate(k, False)))(keys)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(unweighted, lqr.exact_gradient())


def test_shac_with_a_wrong_value_is_biased(lqr):
    settings = ShacSettings(horizon=lqr.horizon, window=5, discount=lqr.discount,
                            finite_horizon=True)
    estimator = make_shac(lqr.env, lqr.policy, settings)  # untrained critic
    samples = independent_estimates(estimator, lqr, 400)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(samples, lqr.exact_gradient(), resolvable_error=0.02)


def test_deterministic_critic_backprop_is_biased_for_a_stochastic_policy(lqr):
    """DDPG's gradient differentiates Q at the mean action: with the stochastic policy's true Q
    it misses the noise's part of the gradient (biased by design); measured and resolved."""
    settings = CriticBackpropSettings(horizon=lqr.horizon, discount=lqr.discount,
                                      deterministic=True)
    estimator = make_critic_backprop(lqr.env, lqr.policy, settings, lqr.exact_q_function())
    samples = independent_estimates(estimator, lqr, 400)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(samples, lqr.exact_gradient(), resolvable_error=0.02)


def relative_bias(samples, exact) -> tuple[float, float]:
    """``|mean - exact| / |exact|`` and its standard error (delta method on the norm)."""
    flat, target = flatten_samples(samples), flatten(exact)
    error = flat.mean(0) - target
    standard_error = flat.std(0, ddof=1) / np.sqrt(flat.shape[0])
    norm = np.linalg.norm(error)
    se = np.sqrt(np.sum((error / max(norm, 1e-12)) ** 2 * standard_error**2))
    return norm / np.linalg.norm(target), se / np.linalg.norm(target)


def test_critic_backprop_bias_with_a_learned_q_shrinks_with_training(lqr):
    """The learned critic's bias, measured with its standard error: large before fitting Q by TD
    on the fixed policy's data, and after 600 fits below 20% with 3 standard errors to spare.

    The bias of a trained critic varies with its training's noise: over training seeds 1000 to
    1003 it measured 0.06-0.21 after 300 fits and 0.04-0.08 after 600."""
    settings = CriticBackpropSettings(horizon=lqr.horizon, discount=lqr.discount,
                                      critic_learning_rate=3e-3, critic_iterations=16,
                                      finite_horizon=True)
    estimator = make_critic_backprop(lqr.env, lqr.policy, settings)
    state = estimator.init(jax.random.PRNGKey(4), lqr.params)
    exact = lqr.exact_gradient()
    before, before_se = relative_bias(independent_estimates(estimator, lqr, 400, state=state),
                                      exact)
    trained = learn(estimator, lqr, state, 600, seed=1000)
    after, after_se = relative_bias(independent_estimates(estimator, lqr, 400, state=trained),
                                    exact)
    print(f"critic backprop relative bias: untrained {before:.3f} +- {before_se:.3f}, after 600 "
          f"TD fits {after:.3f} +- {after_se:.3f}")
    assert before - 3 * before_se > 0.5  # clearly biased before (measured: 1.16 +- 0.001)
    assert after + 3 * after_se < 0.2  # bounded after (measured: 0.039 +- 0.001)


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
    with pytest.raises(AssertionError, match="biased"):  # the test fails on 0.8x the gradient
        assert_unbiased(jax.tree.map(lambda g: 0.8 * g, out.grad), lqr.exact_gradient(),
                        resolvable_error=0.05)


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
