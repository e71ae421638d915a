"""Shared fixtures: the linear-quadratic regulator, whose policy gradient is known exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from diffpg.critics import QFunction, ValueFunction
from diffpg.normalization import init_statistics
from diffpg.policy import make_linear_gaussian_policy
from envs.analytic import lqr_expected_return, lqr_q_value, lqr_value

LQR_HORIZON = 10
LQR_DISCOUNT = 0.95


class LinearQuadraticProblem:
    """An LQR env, a linear-Gaussian policy, fixed start states and the exact gradient there."""

    def __init__(self, num_states: int = 16, horizon: int = LQR_HORIZON,
                 discount: float = LQR_DISCOUNT):
        self.horizon = horizon
        self.discount = discount
        self.env = envs.make("lqr")
        self.raw_env = self.env.unwrapped
        self.policy = make_linear_gaussian_policy(
            self.env.observation_size, self.env.action_size, init_gain_scale=0.5
        )
        self.params = self.policy.init(jax.random.PRNGKey(0))
        self.start_states = jax.vmap(self.env.reset)(
            jax.random.split(jax.random.PRNGKey(1), num_states)
        )
        self.obs_stats = init_statistics(self.env.observation_size)  # raw observations

    def policy_arrays(self, params):
        return params["gain"], params["bias"], jnp.exp(params["log_std"])

    def objective(self, params, horizon=None):
        """Exact ``J = mean over start states of E[sum_{t<T} gamma^t r_t]``."""
        horizon = self.horizon if horizon is None else horizon
        zero_cov = jnp.zeros((self.env.observation_size,) * 2)

        def from_state(x):
            return lqr_expected_return(
                self.raw_env, *self.policy_arrays(params), horizon, self.discount, x, zero_cov
            )

        return jnp.mean(jax.vmap(from_state)(self.start_states.pipeline_state))

    def exact_gradient(self, params=None):
        return jax.grad(self.objective)(self.params if params is None else params)

    def exact_value_function(self) -> ValueFunction:
        """The true time-dependent V of the current policy, as a parameter-free critic."""
        arrays = self.policy_arrays(self.params)

        def single(obs, steps_left):
            return lqr_value(self.raw_env, *arrays, obs, steps_left, self.discount,
                             max_steps=self.horizon)

        vectorized = jnp.vectorize(single, signature="(n),()->()")
        return ValueFunction(lambda key: {}, lambda params, obs, steps: vectorized(obs, steps))

    def exact_q_function(self) -> QFunction:
        """The true time-dependent Q of the current policy, as a parameter-free critic."""
        arrays = self.policy_arrays(self.params)

        def single(obs, action, steps_left):
            return lqr_q_value(self.raw_env, *arrays, obs, action, steps_left, self.discount,
                               max_steps=self.horizon)

        vectorized = jnp.vectorize(single, signature="(n),(m),()->()")
        return QFunction(lambda key: {}, lambda params, o, a, s: vectorized(o, a, s))


@pytest.fixture(scope="session")
def lqr() -> LinearQuadraticProblem:
    return LinearQuadraticProblem()


def independent_estimates(estimator, problem, num_estimates, seed=3, state=None, params=None):
    """``num_estimates`` independent gradient estimates on the problem's start states, stacked."""
    params = problem.params if params is None else params
    if state is None:
        state = estimator.init(jax.random.PRNGKey(2), params)
    keys = jax.random.split(jax.random.PRNGKey(seed), num_estimates)
    batched = jax.jit(jax.vmap(estimator.estimate, in_axes=(None, None, None, None, 0)))
    return batched(params, problem.obs_stats, state, problem.start_states, keys).grad


def learn(estimator, problem, state, steps, seed=100):
    """``steps`` rounds of ``estimate`` then ``update`` on the problem's fixed policy and starts
    (what a comparison's warm-up does); returns the learned state."""
    def one_round(state, key):
        key_estimate, key_update = jax.random.split(key)
        batch = estimator.estimate(problem.params, problem.obs_stats, state,
                                   problem.start_states, key_estimate).batch
        return estimator.update(problem.params, problem.obs_stats, state, batch, key_update)[0], None

    keys = jax.random.split(jax.random.PRNGKey(seed), steps)
    return jax.jit(lambda s: jax.lax.scan(one_round, s, keys)[0])(state)


def flatten_samples(tree) -> np.ndarray:
    """A tree whose leaves have a leading sample axis ``[K, ...]`` -> ``[K, P]`` float64."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], 1)


def flatten(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def assert_unbiased(samples, expected, num_se: float = 4.0, resolvable_error: float = 0.25):
    """The sample mean matches ``expected`` within ``num_se`` standard errors, coordinate-wise.

    ``samples``: tree with leading axis ``[K]`` of independent estimates; ``expected``: a tree of
    the same structure without it. Also asserts the test has power: an error of
    ``resolvable_error * |expected|`` in norm would exceed ``num_se`` standard errors of the norm,
    so an estimator biased by that much cannot pass; and the norm of the error is within that bound.
    """
    flat = flatten_samples(samples)
    target = flatten(expected)
    mean = flat.mean(axis=0)
    standard_error = flat.std(axis=0, ddof=1) / np.sqrt(flat.shape[0])
    norm_error_bound = num_se * np.sqrt(np.sum(standard_error**2))
    assert norm_error_bound <= resolvable_error * np.linalg.norm(target), (
        f"too few samples to resolve a {resolvable_error:.0%} error: "
        f"{num_se} SE of the norm = {norm_error_bound:.4g}, |expected| = {np.linalg.norm(target):.4g}"
    )
    z_scores = (mean - target) / np.maximum(standard_error, 1e-7 * np.abs(target) + 1e-12)
    assert np.all(np.abs(z_scores) <= num_se), (
        f"biased: z-scores {np.round(z_scores, 2)}\n mean {mean}\n expected {target}\n"
        f" standard error {standard_error}"
    )
    assert np.linalg.norm(mean - target) <= norm_error_bound
