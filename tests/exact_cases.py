"""The exactness cases: each estimator, on a problem whose gradient is known exactly, with the
number of independent estimates that resolves the stated relative error. Shared by
``test_estimators_exact.py`` (each case is unbiased) and ``test_sensitivity.py`` (each case's
test fails when the estimator's gradient is scaled by 0.8)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from conftest import LinearQuadraticProblem, learn

from diffpg import estimators
from diffpg.estimators.ahac import AhacSettings, make_ahac
from diffpg.estimators.critic_backprop import CriticBackpropSettings, make_critic_backprop
from diffpg.estimators.reinforce import PpoSettings, ReinforceSettings, make_reinforce
from diffpg.estimators.shac import ShacSettings, make_shac

SCORE_FUNCTION_ERROR = 0.2
"""Relative error the score-function cases resolve (with margin: a 0.8x gradient fails)."""
PATHWISE_ERROR = 0.02
"""Relative error the pathwise cases resolve."""


class Case(NamedTuple):
    name: str
    problem: str
    """plain: the horizon inside one episode; crossing: 4-step episodes, started 2 steps in."""
    build: Callable[[LinearQuadraticProblem], tuple[Any, Any]]
    """problem -> (estimator, its state or None for a fresh one)."""
    num_estimates: int
    resolvable_error: float


def make_problem(kind: str) -> LinearQuadraticProblem:
    if kind == "crossing":
        return LinearQuadraticProblem(episode_length=4, start_step=2)
    return LinearQuadraticProblem()


def _reinforce(**overrides):
    def build(lqr):
        settings = ReinforceSettings(horizon=lqr.horizon, discount=lqr.discount, **overrides)
        return make_reinforce(lqr.env, lqr.policy, settings), None
    return build


def _reinforce_exact_value(lqr):
    settings = ReinforceSettings(horizon=lqr.horizon, discount=lqr.discount, baseline="value")
    return make_reinforce(lqr.env, lqr.policy, settings, lqr.exact_value_function("start")), None


def _reinforce_learned_value(lqr):
    settings = ReinforceSettings(horizon=lqr.horizon, discount=lqr.discount, baseline="value")
    estimator = make_reinforce(lqr.env, lqr.policy, settings)
    # Fit the baseline a little: any state-only baseline is unbiased.
    return estimator, learn(estimator, lqr, estimator.init(jax.random.PRNGKey(5), lqr.params), 30)


def _gae_exact_value(lqr):
    """PPO's advantage estimator for the finite-horizon objective, with the true value."""
    settings = PpoSettings(horizon=lqr.horizon, discount=lqr.discount, finite_horizon=True,
                           normalize_advantages=False)
    return make_reinforce(lqr.env, lqr.policy, settings, lqr.exact_value_function("start")), None


def _shac_exact_value(window):
    def build(lqr):
        settings = ShacSettings(horizon=lqr.horizon, window=window, discount=lqr.discount,
                                finite_horizon=True, target_critic_keep=1.0)
        return make_shac(lqr.env, lqr.policy, settings, lqr.exact_value_function()), None
    return build


def _ahac_exact_value(gradient_horizon):
    def build(lqr):
        settings = AhacSettings(horizon=lqr.horizon, discount=lqr.discount, finite_horizon=True,
                                horizon_min=1, initial_horizon=gradient_horizon, adapt=False)
        return make_ahac(lqr.env, lqr.policy, settings, lqr.exact_value_function()), None
    return build


def _named(name):
    def build(lqr):
        return estimators.make(name, lqr.env, lqr.policy, horizon=lqr.horizon,
                               discount=lqr.discount), None
    return build


def _critic_backprop_exact_q(lqr):
    settings = CriticBackpropSettings(horizon=lqr.horizon, discount=lqr.discount)
    return make_critic_backprop(lqr.env, lqr.policy, settings, lqr.exact_q_function()), None


def _cases() -> list[Case]:
    cases = []
    for problem, counts in (("plain", (24000, 10000, 500, 10000, 24000)),
                            ("crossing", (44000, 10000, None, 10000, 24000))):
        variants = [("reinforce:baseline=none", dict(baseline="none")),
                    ("reinforce:baseline=leave_one_out", dict(baseline="leave_one_out")),
                    ("reinforce:leave_one_out,rollouts_per_state=4",
                     dict(baseline="leave_one_out", rollouts_per_state=4)),
                    ("reinforce:baseline=optimal", dict(baseline="optimal")),
                    ("reinforce:reward_to_go=False", dict(baseline="leave_one_out",
                                                          reward_to_go=False))]
        for (name, overrides), count in zip(variants, counts, strict=True):
            if count:
                cases.append(Case(name, problem, _reinforce(**overrides), count,
                                  SCORE_FUNCTION_ERROR))
        cases += [
            Case("reinforce:baseline=value (exact V)", problem, _reinforce_exact_value, 1000,
                 SCORE_FUNCTION_ERROR),
            Case("bptt", problem, _named("bptt"), 400, PATHWISE_ERROR),
            Case("shac:window=1 (exact V)", problem, _shac_exact_value(1), 400, PATHWISE_ERROR),
            Case("shac:window=5 (exact V)", problem, _shac_exact_value(5), 400, PATHWISE_ERROR),
            # segments of 3 steps: the last one is shorter unless 3 divides the horizon
            Case("ahac:initial_horizon=3 (exact V)", problem, _ahac_exact_value(3), 400,
                 PATHWISE_ERROR),
            Case("critic_backprop (exact Q)", problem, _critic_backprop_exact_q, 400,
                 PATHWISE_ERROR),
            # Mixes of both kinds, unbiased by cross-fitting (their weights lean pathwise here).
            Case("ivw", problem, _named("ivw"), 400, PATHWISE_ERROR),
            Case("ddcg", problem, _named("ddcg"), 600, PATHWISE_ERROR),
        ]
    cases.append(Case("reinforce:baseline=value (learned V)", "plain", _reinforce_learned_value,
                      14000, SCORE_FUNCTION_ERROR))
    cases.append(Case("ppo:finite_horizon=True (GAE, exact V)", "plain", _gae_exact_value, 500,
                      SCORE_FUNCTION_ERROR))
    return cases


CASES = _cases()
CASE_IDS = [f"{case.name} [{case.problem}]" for case in CASES]
