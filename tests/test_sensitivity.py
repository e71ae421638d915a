"""Each exactness test can fail: with the estimator's gradient scaled by 0.8 (a test-only
monkeypatch of ``estimate``), the same test, with the same number of estimates, rejects it."""

from __future__ import annotations

import jax
import pytest
from conftest import assert_unbiased, independent_estimates
from exact_cases import CASE_IDS, CASES, make_problem


def scaled(estimator, factor: float):
    """The estimator with every gradient multiplied by ``factor``."""
    def estimate(*arguments):
        out = estimator.estimate(*arguments)
        return out._replace(grad=jax.tree.map(lambda g: factor * g, out.grad))

    return estimator._replace(estimate=estimate)


@pytest.fixture(scope="module")
def problems():
    return {kind: make_problem(kind) for kind in ("plain", "crossing")}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_the_exactness_test_fails_on_a_gradient_scaled_by_0_8(problems, case):
    lqr = problems[case.problem]
    estimator, state = case.build(lqr)
    samples = independent_estimates(scaled(estimator, 0.8), lqr, case.num_estimates,
                                    state=state, seed=4)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(samples, lqr.exact_gradient(), resolvable_error=case.resolvable_error)
