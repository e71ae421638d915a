"""The per-step variance decomposition (``diffpg.per_step``): the split is exact algebra, and
the per-step terms of each kind sum to an unbiased estimate of the exact LQR gradient."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from diffpg import envs, per_step
from diffpg.compare import exact_gradient
from diffpg.normalization import init_statistics
from diffpg.policy import make_linear_gaussian_policy
from diffpg.stats import gradient_statistics

HORIZON, NUM_ENVS, DISCOUNT = 6, 16, 0.95
NUM_ESTIMATES = {"pathwise": 2_000, "score_function": 20_000}


def test_contributions_sum_to_the_variance_of_the_summed_estimate():
    rng = np.random.default_rng(0)
    # Steps 0 and 1 share a common factor (they add up), step 2 opposes it (it cancels).
    common = rng.normal(size=(500, 1, 3))
    samples = np.concatenate([common + 0.1 * rng.normal(size=(500, 2, 3)),
                              -0.5 * common + 0.1 * rng.normal(size=(500, 1, 3))], axis=1)
    split = per_step.variance_by_step(samples)
    total = float(np.sum(np.var(samples.sum(axis=1), axis=0, ddof=1)))
    assert split["total"] == pytest.approx(total, rel=1e-12)
    assert np.sum(split["contribution"]) == pytest.approx(total, rel=1e-12)
    np.testing.assert_allclose(split["own"], np.var(samples, axis=0, ddof=1).sum(axis=1),
                               rtol=1e-12)
    assert split["contribution"][2] < 0 < split["contribution"][0]  # cancelling vs adding
    with pytest.raises(ValueError, match="samples has shape"):
        per_step.variance_by_step(samples[:1])


@pytest.mark.parametrize("kind", per_step.KINDS)
def test_the_terms_sum_to_an_unbiased_estimate_of_the_exact_gradient(kind):
    """On the LQR (2,000 pathwise or 20,000 score-function estimates, leave-one-out baseline):
    the summed terms' mean has no bias resolved against the closed-form gradient, and the same
    estimates scaled by 0.8 do (the check has the power to see a 20% error)."""
    env = envs.make("lqr")
    policy = make_linear_gaussian_policy(env.observation_size, env.action_size,
                                         init_gain_scale=0.5)
    key = jax.random.PRNGKey(3)
    params = policy.init(key)
    starts = jax.vmap(env.reset)(jax.random.split(jax.random.fold_in(key, 1), NUM_ENVS))
    terms = per_step.sample_step_terms(kind, env, policy, params,
                                       init_statistics(env.observation_size), starts,
                                       jax.random.fold_in(key, 2), HORIZON, DISCOUNT,
                                       NUM_ESTIMATES[kind])
    assert terms.shape == (NUM_ESTIMATES[kind], HORIZON, ravel_pytree(params)[0].shape[0])
    exact = np.asarray(ravel_pytree(exact_gradient(env, params, starts, HORIZON,
                                                       DISCOUNT))[0], np.float64)
    summed = terms.sum(axis=1)
    assert gradient_statistics(summed, exact)["bias_resolved"] is False
    assert gradient_statistics(0.8 * summed, exact)["bias_resolved"] is True


def test_unknown_kind_and_baseline_are_refused():
    with pytest.raises(ValueError, match="kind='nope'"):
        per_step.step_terms("nope", None, None, {}, None, None, None, 1, 1.0)
    with pytest.raises(ValueError, match="baseline='value'"):
        per_step.step_terms("score_function", None, None, {}, None, None, None, 1, 1.0,
                            baseline="value")
