"""DDCG: IVW-H's per-step mix where a smoothness test passes, the zeroth-order (score-function)
gradient where it fails (Onoda et al. 2026, arXiv 2604.18161: "a lightweight test that switches
estimators in nonsmooth regions, with a single hyperparameter").

The test compares the spread of the returns with what their gradients allow. For a fixed start
state, the return ``R(eps)`` is a function of the policy's standard-normal noise ``eps`` (all
steps, all action dimensions). If ``R`` is smooth (differentiable, the gradient capturing how it
varies), the Gaussian Poincare inequality bounds its variance by its gradient::

    Var_eps R  <=  E_eps || grad_eps R ||^2,     grad_eps R = std_k * dR / du_k per step and dimension

A jump (a contact switching, a fall) adds variance that no gradient sees (its derivative is 0
almost everywhere), so the ratio ``rho = Var R / E||grad_eps R||^2`` exceeds 1. Each rollout ``i``
of a start state (its region) with ``rollouts_per_state = m`` rollouts is judged from the *other*
``m - 1``::

    rho_i    = sample variance of R over the others / mean of ||grad_eps R||^2 over the others
    smooth_i = rho_i <= smoothness_threshold   (and rollout i's own first-order terms finite)

A smooth rollout enters IVW-H's mix (``estimators.ivw``), the others only through their
score-function terms (leave-one-out baseline over the state's ``m`` rollouts). Judging a rollout
by the others keeps the switch independent of its own noise, so each rollout's term stays
unbiased whichever way the test goes (a test on its own return would select on the noise: measured
on the LQR, a 4% bias). The single hyperparameter ``smoothness_threshold`` (``c``) trades false
alarms for missed jumps: for a return linear in the noise ``rho`` is chi-square with ``m - 2``
degrees of freedom over ``m - 2``, so at ``m = 4`` and ``c = 3`` about 5% of smooth rollouts fall
back (a variance cost, no bias).
The test uses only the first-order information (returns and their noise gradients), never the
zeroth-order estimate, so it needs no confidence interval around REINFORCE's noisy mean (the
alpha-order estimator's test). The published paper gives no code; the Poincare form of the test is
this module's reading of its description (a variance test on the function values under a locally
quadratic model, with one constant).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffpg.envs.core import Environment, SettingError, State
from diffpg.estimators.base import (
    Estimate,
    Estimator,
    check_bool,
    check_positive,
    check_positive_int,
    check_unit_interval,
    learns_nothing,
)
from diffpg.estimators.ivw import Rollouts, mixed_estimate
from diffpg.estimators.registry import register
from diffpg.normalization import RunningStatistics, normalize
from diffpg.policy import Params, Policy


@dataclasses.dataclass(frozen=True)
class DdcgSettings:
    """IVW-H's per-step mix where a smoothness test on the returns passes, the score-function
    gradient where it fails (DDCG, Onoda et al. 2026)."""

    horizon: int = 32
    """Steps simulated per estimate."""
    discount: float = 0.99
    """gamma, the discount of the objective J = E[sum_t gamma^t r_t]."""
    rollouts_per_state: int = 4
    """Rollouts from each start state: the test's sample (and the leave-one-out pool); >= 3."""
    smoothness_threshold: float = 3.0
    """c: a state is smooth when Var R <= c * E||grad_eps R||^2 (1 is the Poincare bound)."""
    cross_fit: bool = True
    """IVW-H's weights from the other half of the batch (see estimators.ivw)."""

    def __post_init__(self):
        check_positive_int("horizon", self.horizon)
        check_unit_interval("discount", self.discount)
        check_positive_int("rollouts_per_state", self.rollouts_per_state)
        if self.rollouts_per_state < 3:
            raise SettingError(f"rollouts_per_state={self.rollouts_per_state} must be at least 3 "
                               "(each rollout's test takes a variance over the other rollouts of "
                               "its state)")
        check_positive("smoothness_threshold", self.smoothness_threshold)
        check_bool("cross_fit", self.cross_fit)


def smoothness_test(returns: jax.Array, noise_gradient_norms: jax.Array,
                    threshold: float) -> tuple[jax.Array, jax.Array]:
    """Per rollout, from ``returns [S, m]`` and ``||grad_eps R||^2 [S, m]`` of the ``m`` rollouts
    of each of ``S`` start states: ``(smooth [S, m] bool, rho [S, m])``, each rollout's verdict
    from the *other* ``m - 1`` rollouts of its state (module docstring). A non-finite gradient
    fails its own rollout and those it judges."""
    num = returns.shape[1]
    others = jnp.array([[j for j in range(num) if j != i] for i in range(num)])  # [m, m - 1]
    finite = jnp.isfinite(noise_gradient_norms)
    norms = jnp.where(finite, noise_gradient_norms, jnp.nan)  # NaN compares false
    spread = jnp.var(returns[:, others], axis=2, ddof=1)
    bound = jnp.mean(norms[:, others], axis=2)
    rho = spread / jnp.maximum(bound, jnp.finfo(bound.dtype).tiny)
    return jnp.logical_and(finite, spread <= threshold * bound), rho


def make_ddcg(env: Environment, policy: Policy,
              settings: DdcgSettings = DdcgSettings()) -> Estimator:
    """Build the DDCG estimator (see the module docstring)."""
    per_state = settings.rollouts_per_state

    def init(key: jax.Array, policy_params: Params) -> None:
        del key, policy_params

    def select(params: Params, obs_stats: RunningStatistics, rollouts: Rollouts):
        """The rollouts that pass the smoothness test, judged by their state's others."""
        _, std = policy.distribution(params, normalize(obs_stats, rollouts.transitions.obs))
        noise_gradient = jnp.sum(jnp.square(std * rollouts.action_gradient), axis=(0, 2))
        smooth, rho = smoothness_test(rollouts.returns.reshape(-1, per_state),
                                      noise_gradient.reshape(-1, per_state),
                                      settings.smoothness_threshold)
        metrics = {"nonsmooth_rollouts": 1.0 - jnp.mean(smooth.astype(jnp.float32)),
                   "smoothness_ratio": jnp.median(rho)}
        return smooth.reshape(-1).astype(rollouts.returns.dtype), metrics

    def estimate(params: Params, obs_stats: RunningStatistics, state: None, env_state: State,
                 key: jax.Array) -> Estimate:
        del state
        return mixed_estimate(env, policy, settings, params, obs_stats, env_state, key,
                              "leave_one_out", select)

    return Estimator(init, estimate, learns_nothing, settings)


register("ddcg", DdcgSettings, make_ddcg, family="mixture")
