"""The linear-quadratic regulator and its closed-form expected return, value and action value
under a linear-Gaussian policy (the exact references of the estimator tests)."""

from __future__ import annotations

import functools
from typing import Any, final

import jax
import jax.numpy as jnp
import numpy as np
from diffpg.envs.analytic.base import AnalyticEnv, float_array, require
from diffpg.envs.core import SettingError

_LQR_DT = 0.1


@final
class LinearQuadratic(AnalyticEnv):
    """Linear dynamics with a quadratic cost (registry name ``"lqr"``).

    State ``x [n]``, action ``u [m]``::

        x_{t+1} = A x_t + B u_t                  (deterministic, no process noise)
        r_t     = -(x_t' Q x_t + u_t' R u_t)     (cost of the state the action is applied in)
        obs_t   = x_t
        x_0     ~ N(init_mean, diag(init_std ** 2))

    Defaults: a double integrator (position, velocity) discretised exactly with zero-order hold
    at ``dt = 0.1``: ``A = [[1, 0.1], [0, 1]]``, ``B = [[0.005], [0.1]]``; ``Q = I_2``,
    ``R = 0.1 I_1``, ``init_mean = [1, 0]``, ``init_std = 0.5``; 20-step episodes.

    Settings (keyword arguments): ``A [n, n]``, ``B [n, m]``, ``Q [n, n]`` symmetric positive
    semi-definite, ``R [m, m]`` symmetric positive semi-definite, ``init_mean [n]``, ``init_std``
    (a number or ``[n]``, >= 0). They are stored as float32 ``jnp`` arrays of the same names
    (``init_std`` always as ``[n]``).
    """

    default_episode_length = 20

    def __init__(
        self,
        *,
        A: Any = None,
        B: Any = None,
        Q: Any = None,
        R: Any = None,
        init_mean: Any = None,
        init_std: Any = 0.5,
    ):
        dt = _LQR_DT
        if A is None:
            A = [[1.0, dt], [0.0, 1.0]]
        a_np = np.asarray(A, dtype=np.float64) if _array_like(A) else None
        require(
            a_np is not None
            and a_np.ndim == 2
            and a_np.shape[0] == a_np.shape[1]
            and a_np.shape[0] >= 1
            and bool(np.all(np.isfinite(a_np))),
            "A",
            A,
            "a finite square matrix [n, n]",
        )
        n = a_np.shape[0]
        if B is None:
            B = np.array([[0.5 * dt**2], [dt]]) if n == 2 else np.ones((n, 1))
        b_np = np.asarray(B, dtype=np.float64) if _array_like(B) else None
        require(
            b_np is not None
            and b_np.ndim == 2
            and b_np.shape[0] == n
            and b_np.shape[1] >= 1
            and bool(np.all(np.isfinite(b_np))),
            "B",
            B,
            f"a finite matrix [n={n}, m] with m >= 1",
        )
        m = b_np.shape[1]
        q_np = _psd_matrix("Q", np.eye(n) if Q is None else Q, n)
        r_np = _psd_matrix("R", 0.1 * np.eye(m) if R is None else R, m)
        if init_mean is None:
            init_mean = np.eye(n)[0]  # [1, 0, ..., 0]
        mean_np = float_array("init_mean", init_mean, (n,), f"a finite vector of length n={n}")
        std_np = np.asarray(init_std, dtype=np.float64) if _array_like(init_std) else None
        require(
            std_np is not None
            and std_np.shape in ((), (n,))
            and bool(np.all(np.isfinite(std_np)))
            and bool(np.all(std_np >= 0)),
            "init_std",
            init_std,
            f"a number or a vector of length n={n}, all >= 0",
        )
        std_np = np.broadcast_to(std_np, (n,))

        # NumPy float32 constants: building the env compiles nothing (jnp ops take them as is).
        self.A = np.asarray(a_np, dtype=np.float32)
        self.B = np.asarray(b_np, dtype=np.float32)
        self.Q = np.asarray(q_np, dtype=np.float32)
        self.R = np.asarray(r_np, dtype=np.float32)
        self.init_mean = np.asarray(mean_np, dtype=np.float32)
        self.init_std = np.asarray(std_np, dtype=np.float32)
        self._state_size = n
        self._action_size = m

    @property
    def observation_size(self) -> int:
        return self._state_size

    @property
    def action_size(self) -> int:
        return self._action_size

    def _sample_initial_state(self, key: jax.Array) -> jax.Array:
        noise = jax.random.normal(key, (self._state_size,))
        return self.init_mean + self.init_std * noise

    def _observe(self, x: jax.Array) -> jax.Array:
        return x

    def reward_fn(self, x: jax.Array, action: jax.Array) -> jax.Array:
        """``r(x, u) = -(x' Q x + u' R u)`` for ``x [n]``, ``u [m]``; a scalar."""
        return -(x @ self.Q @ x + action @ self.R @ action)

    def _transition(self, x: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.A @ x + self.B @ action, self.reward_fn(x, action)

    def linear_gaussian_return(self, gain: jax.Array, bias: jax.Array, std: jax.Array,
                               horizon: int, discount: float | jax.Array,
                               pipeline_state: jax.Array) -> jax.Array:
        """``lqr_expected_return`` from the state ``pipeline_state = x [n]`` (a zero
        covariance): the exact ``E[sum_{t<horizon} discount^t r_t]`` of ``u = gain x + bias +
        std eps``, a scalar (the ``Environment`` capability)."""
        size = self.observation_size
        return lqr_expected_return(self, gain, bias, std, horizon, discount, pipeline_state,
                                   jnp.zeros((size, size)))


def _array_like(value: Any) -> bool:
    try:
        np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return True


def _psd_matrix(name: str, value: Any, size: int) -> np.ndarray:
    allowed = f"a finite symmetric positive semi-definite matrix [{size}, {size}]"
    matrix = float_array(name, value, (size, size), allowed)
    symmetric = np.allclose(matrix, matrix.T, rtol=1e-6, atol=1e-9)
    require(symmetric and np.linalg.eigvalsh(matrix).min() >= -1e-9, name, value, allowed)
    return matrix


def _check_linear_gaussian_policy(env: LinearQuadratic, gain, bias, std):
    n, m = env.observation_size, env.action_size
    gain, bias, std = jnp.asarray(gain), jnp.asarray(bias), jnp.asarray(std)
    for name, value, shape in (("gain", gain, (m, n)), ("bias", bias, (m,)), ("std", std, (m,))):
        if value.shape != shape:
            raise SettingError(f"{name} has shape {value.shape}; the policy needs {shape}")
    return gain, bias, std


def _discounted_gaussian_return(
    env, gain, bias, std, mean, cov, num_steps: int, discount, active_steps=None
):
    """Exact ``E[sum_t discount^t r_t]`` over ``num_steps`` steps from ``x_0 ~ N(mean, cov)``.

    Steps with ``t >= active_steps`` contribute 0 (when ``active_steps`` is given; it may be
    traced). Uses the moment recursion documented in ``lqr_expected_return``.
    """
    dtype = jnp.result_type(gain, bias, std, mean, cov, env.A, float)
    matrices = tuple(m.astype(dtype) for m in (env.A, env.B, env.Q, env.R))
    policy = tuple(jnp.asarray(p).astype(dtype) for p in (gain, bias, std))
    start = (jnp.asarray(mean).astype(dtype), jnp.asarray(cov).astype(dtype))
    active_steps = num_steps if active_steps is None else active_steps
    return _moment_recursion(matrices, policy, start, discount, active_steps, num_steps=num_steps)


@functools.partial(jax.jit, static_argnames="num_steps")
def _moment_recursion(matrices, policy, start, discount, active_steps, *, num_steps: int):
    """Jitted core of ``_discounted_gaussian_return`` (compiled once per shape and length)."""
    a, b, q, r = matrices
    gain, bias, std = policy
    mean, cov = start
    closed_loop = a + b @ gain  # A + B K
    action_cov = jnp.diag(std**2)  # diag(sigma^2)
    injected_cov = b @ action_cov @ b.T  # B diag(sigma^2) B'
    drift = b @ bias  # B b

    def one_step(carry, t):
        state_mean, state_cov, weight = carry
        action_mean = gain @ state_mean + bias
        state_cost = jnp.trace(q @ state_cov) + state_mean @ q @ state_mean
        action_cost = (
            jnp.trace(r @ (gain @ state_cov @ gain.T + action_cov)) + action_mean @ r @ action_mean
        )
        expected_reward = jnp.where(t < active_steps, -(state_cost + action_cost), 0.0)
        next_mean = closed_loop @ state_mean + drift
        next_cov = closed_loop @ state_cov @ closed_loop.T + injected_cov
        return (next_mean, next_cov, weight * discount), weight * expected_reward

    init = (mean, cov, jnp.ones((), mean.dtype))
    _, discounted_rewards = jax.lax.scan(one_step, init, jnp.arange(num_steps))
    return jnp.sum(discounted_rewards)


def lqr_expected_return(
    env: LinearQuadratic,
    gain: jax.Array,
    bias: jax.Array,
    std: jax.Array,
    horizon: int,
    discount: float | jax.Array,
    init_mean: jax.Array | None = None,
    init_cov: jax.Array | None = None,
) -> jax.Array:
    """Exact expected discounted return of a linear-Gaussian policy on ``env``.

    The policy is ``u = K x + b + sigma * eps`` with ``eps ~ N(0, I_m)``; ``gain = K [m, n]``,
    ``bias = b [m]``, ``std = sigma [m]``. Returns the scalar
    ``E[sum_{t=0}^{horizon-1} discount^t r_t]`` with ``x_0 ~ N(init_mean, init_cov)`` (by
    default the env's start distribution, ``N(env.init_mean, diag(env.init_std^2))``; pass a
    state and a zero covariance for the value of that state).

    Since everything is linear-Gaussian, ``x_t ~ N(mu_t, S_t)`` exactly, with::

        mu_{t+1} = (A + B K) mu_t + B b
        S_{t+1}  = (A + B K) S_t (A + B K)' + B diag(sigma^2) B'
        E[r_t]   = -( tr(Q S_t) + mu_t' Q mu_t
                      + tr(R (K S_t K' + diag(sigma^2))) + (K mu_t + b)' R (K mu_t + b) )

    ``horizon`` must be a Python int (it sets the scan length); ``discount`` may be traced.
    Differentiable with ``jax.grad`` with respect to ``gain``, ``bias``, ``std``, ``init_mean``
    and ``init_cov``.
    """
    gain, bias, std = _check_linear_gaussian_policy(env, gain, bias, std)
    require(
        isinstance(horizon, int | np.integer) and not isinstance(horizon, bool) and horizon >= 0,
        "horizon",
        horizon,
        "a Python int >= 0",
    )
    n = env.observation_size
    mean = env.init_mean if init_mean is None else jnp.asarray(init_mean)
    cov = jnp.diag(env.init_std**2) if init_cov is None else jnp.asarray(init_cov)
    if mean.shape != (n,) or cov.shape != (n, n):
        raise SettingError(
            f"init_mean/init_cov have shapes {mean.shape}/{cov.shape}; expected ({n},)/({n}, {n})"
        )
    return _discounted_gaussian_return(env, gain, bias, std, mean, cov, int(horizon), discount)


def lqr_value(
    env: LinearQuadratic,
    gain: jax.Array,
    bias: jax.Array,
    std: jax.Array,
    state: jax.Array,
    steps_left: int | jax.Array,
    discount: float | jax.Array,
    *,
    max_steps: int | None = None,
) -> jax.Array:
    """Exact value ``V(x) = E[sum_{k=0}^{steps_left-1} discount^k r_k | x_0 = x]``.

    ``state = x [n]`` is a deterministic raw state; ``steps_left`` is the number of steps still
    to be taken (``V = 0`` when it is 0 or negative). ``steps_left`` may be traced: the
    computation is a fixed-length scan of ``max_steps`` steps (a static Python int, default
    ``env.default_episode_length``) in which steps ``k >= steps_left`` are masked out, so
    ``steps_left`` must not exceed ``max_steps`` (checked when it is concrete; a larger traced
    value is silently truncated to ``max_steps`` steps). Policy arguments as in
    ``lqr_expected_return``.
    """
    gain, bias, std = _check_linear_gaussian_policy(env, gain, bias, std)
    max_steps = env.default_episode_length if max_steps is None else max_steps
    require(
        isinstance(max_steps, int | np.integer)
        and not isinstance(max_steps, bool)
        and max_steps >= 0,
        "max_steps",
        max_steps,
        "a Python int >= 0",
    )
    if isinstance(steps_left, int | np.integer) and steps_left > max_steps:
        raise SettingError(
            f"steps_left={steps_left} exceeds max_steps={max_steps}; pass a larger max_steps"
        )
    x = jnp.asarray(state)
    if x.shape != (env.observation_size,):
        raise SettingError(f"state has shape {x.shape}; expected ({env.observation_size},)")
    zero_cov = jnp.zeros((x.shape[0], x.shape[0]), x.dtype)
    return _discounted_gaussian_return(
        env, gain, bias, std, x, zero_cov, int(max_steps), discount, active_steps=steps_left
    )


def lqr_q_value(
    env: LinearQuadratic,
    gain: jax.Array,
    bias: jax.Array,
    std: jax.Array,
    state: jax.Array,
    action: jax.Array,
    steps_left: int | jax.Array,
    discount: float | jax.Array,
    *,
    max_steps: int | None = None,
) -> jax.Array:
    """Exact action value ``Q(x, u) = r(x, u) + discount * V(A x + B u, steps_left - 1)``.

    The reward of the *given* action ``u [m]`` in state ``x [n]``, then the policy for the
    remaining ``steps_left - 1`` steps (see ``lqr_value``, whose ``max_steps`` this shares).
    ``Q = 0`` when ``steps_left <= 0``. Differentiable in ``state``, ``action`` and the policy
    parameters, e.g. ``jax.grad`` w.r.t. ``action`` gives the critic gradient an actor-critic
    estimator would use with a perfect critic.
    """
    x, u = jnp.asarray(state), jnp.asarray(action)
    if u.shape != (env.action_size,):
        raise SettingError(f"action has shape {u.shape}; expected ({env.action_size},)")
    next_state = env.A @ x + env.B @ u
    future = lqr_value(
        env, gain, bias, std, next_state, steps_left - 1, discount, max_steps=max_steps
    )
    q = env.reward_fn(x, u) + discount * future
    return jnp.where(steps_left > 0, q, jnp.zeros_like(q))


