"""Where a gradient's variance comes from: each time step's share, for the pathwise (BPTT) and
score-function (REINFORCE) estimators on the same rollouts.

Both estimators of ``grad J_T``, ``J_T = E[(1/B) sum_b sum_{t<T} w_t r_t]`` (``w`` from
``returns.segment_discounts``), are sums of per-step terms ``g = sum_t g_t`` (``[T, P]``, one row
per step, flattened in ``ravel_pytree`` order):

* pathwise: ``g_t = grad_theta (1/B) sum_b w_t r_t``, differentiated through the dynamics and the
  reparameterised actions of steps ``0..t`` (their sum is BPTT's estimate);
* score function: ``g_t = (1/B) sum_b grad_theta log pi(u_t | s_t) (psi_t - b_t)`` with the
  reward-to-go ``psi_t = sum_{t' >= t, same episode} w_t' r_t'`` and the leave-one-out baseline
  ``b_t`` (the mean of ``psi_t`` over the other ``B - 1`` rollouts: unbiased), or ``b_t = 0``
  (``baseline="none"``); their sum is REINFORCE's estimate with the same settings.

Over ``K`` independent estimates the variance of the total splits exactly by step::

    tr Var(g) = sum_t c_t,    c_t = sum_p Cov(g_t[p], g[p])  (= sum_s tr Cov(g_t, g_s))

``c_t`` (``contribution``) is step ``t``'s share, cross terms with every other step included;
``own_t = sum_p Var(g_t[p])`` (``own``) is its variance alone, and ``sum_t own_t`` against
``tr Var(g)`` tells how much the steps' terms reinforce (> 1 share) or cancel each other.

What drives the pathwise terms is the closed loop's stretching of perturbations (Metz et al.
2021): ``closed_loop_singular_values`` gives the largest singular value of each step's Jacobian
``d x_{t+1} / d x_t`` of the deterministic closed loop ``x -> f(x, pi_mean(obs(x)))`` along its
trajectory; their running product bounds how a perturbation at step 0 has grown by step ``t``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from diffpg import returns
from diffpg.acting import unroll
from diffpg.dynamics import step_jacobians
from diffpg.envs.core import Environment, SettingError, State
from diffpg.estimators.reinforce import ReinforceSettings, monte_carlo_advantage
from diffpg.normalization import RunningStatistics, init_statistics, normalize
from diffpg.policy import Params, Policy

KINDS = ("pathwise", "score_function")
"""The estimators decomposed: BPTT's and REINFORCE's (reward-to-go) terms."""
BASELINES = ("leave_one_out", "none")
"""The score function's baselines."""


def step_terms(kind: str, env: Environment, policy: Policy, params: Params,
               obs_stats: RunningStatistics, start_states: State, key: jax.Array, horizon: int,
               discount: float, baseline: str = "leave_one_out") -> jax.Array:
    """The per-step terms ``g_t [T, P]`` of one estimate of ``kind`` (see the module docstring)
    from the ``B`` states ``start_states``; ``baseline`` applies to the score function."""
    if kind not in KINDS:
        raise SettingError(f"kind={kind!r} is not allowed; allowed values: {list(KINDS)}")
    if baseline not in BASELINES:
        raise SettingError(f"baseline={baseline!r} is not allowed; allowed values: "
                           f"{list(BASELINES)}")
    flat, unflatten = ravel_pytree(params)

    if kind == "pathwise":
        def per_step_objective(flat_params):
            _, tr = unroll(env, policy, unflatten(flat_params), obs_stats, start_states, key,
                           horizon)
            weights = jax.lax.stop_gradient(returns.segment_discounts(tr.done, discount))
            return jnp.mean(weights * tr.reward, axis=1)

        return jax.jacrev(per_step_objective)(flat)

    _, tr = unroll(env, policy, jax.lax.stop_gradient(params), obs_stats, start_states, key,
                   horizon)
    obs = normalize(obs_stats, tr.obs)
    # psi_t - b_t: REINFORCE's own reward-to-go and baseline (whole batch as the pool)
    advantage = monte_carlo_advantage(
        policy, params, obs, tr, ReinforceSettings(horizon=horizon, discount=discount,
                                                   baseline=baseline),
        returns.segment_discounts(tr.done, discount))

    def per_step_surrogate(flat_params):
        log_prob = policy.log_prob(unflatten(flat_params), obs, tr.raw_action)
        return jnp.mean(log_prob * advantage, axis=1)

    return jax.jacrev(per_step_surrogate)(flat)


def sample_step_terms(kind: str, env: Environment, policy: Policy, params: Params,
                      obs_stats: RunningStatistics, start_states: State, key: jax.Array,
                      horizon: int, discount: float, num_estimates: int,
                      baseline: str = "leave_one_out") -> np.ndarray:
    """``num_estimates`` independent estimates' per-step terms, ``[K, T, P]``."""
    def one(estimate_key):
        return step_terms(kind, env, policy, params, obs_stats, start_states, estimate_key,
                          horizon, discount, baseline)

    keys = jax.random.split(key, num_estimates)
    return np.asarray(jax.jit(lambda k: jax.lax.map(one, k))(keys), np.float64)


def variance_by_step(samples: np.ndarray) -> dict[str, np.ndarray | float]:
    """From per-step terms ``[K, T, P]``: ``contribution [T]`` (``c_t``), ``own [T]``
    (``own_t``) and ``total`` (``tr Var(g)`` of the summed estimate; ``sum_t c_t`` equals it)."""
    samples = np.asarray(samples, np.float64)
    if samples.ndim != 3 or samples.shape[0] < 2:
        raise SettingError(f"samples has shape {samples.shape}; expected [K >= 2, T, P]")
    centred = samples - samples.mean(axis=0)
    total = centred.sum(axis=1)  # [K, P]: the summed estimate, centred
    scale = 1.0 / (samples.shape[0] - 1)
    contribution = scale * np.einsum("ktp,kp->t", centred, total)
    own = scale * np.einsum("ktp,ktp->t", centred, centred)
    return {"contribution": contribution, "own": own,
            "total": float(scale * np.sum(total * total))}


def closed_loop_singular_values(env, policy: Policy, params: Params,
                                obs_stats: RunningStatistics, start_states: jax.Array,
                                horizon: int) -> np.ndarray:
    """Largest singular value of ``d x_{t+1} / d x_t`` of the deterministic closed loop, per
    start state ``[B, T]``; ``env`` has ``init_state`` (an analytic env) and ``start_states`` are
    raw states ``[B, n]``."""
    def closed_loop(x, _):
        state = env.init_state(x)
        mean, _ = policy.distribution(params, normalize(obs_stats, state.obs))
        return env.step(state, policy.to_action(mean)).pipeline_state

    def one(x0):
        # The policy chooses the action inside the map: the scanned actions only set the length.
        _, jacobians = step_jacobians(closed_loop, x0, jnp.zeros((horizon, 1)))
        return jnp.linalg.svd(jacobians, compute_uv=False)[:, 0]

    return np.asarray(jax.jit(jax.vmap(one))(start_states), np.float64)


def split_at_point(env, policy: Policy, params: Params, obs_stats: RunningStatistics | None,
                   start_states: State, keys: dict[str, jax.Array], horizon: int,
                   discount: float, num_estimates: int) -> dict:
    """A comparison point's split: ``variance_by_step`` of ``num_estimates`` samples of each of
    ``KINDS`` (drawn with ``keys[kind]``), and, on an env with ``init_state``, the median over
    start states of each step's ``closed_loop_singular_values``; JSON-ready."""
    stats = obs_stats if obs_stats is not None else init_statistics(env.observation_size)
    result = {}
    for kind in KINDS:
        split = variance_by_step(sample_step_terms(kind, env, policy, params, stats, start_states,
                                                   keys[kind], horizon, discount, num_estimates))
        result[kind] = {"contribution": split["contribution"].tolist(),
                        "own": split["own"].tolist(), "total": split["total"]}
    if hasattr(env.unwrapped, "init_state"):
        singular = closed_loop_singular_values(env.unwrapped, policy, params, stats,
                                               start_states.pipeline_state, horizon)
        result["jacobian_top_singular_value_median"] = np.median(singular, axis=0).tolist()
    return result
