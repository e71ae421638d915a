"""Small differentiable environments written directly in JAX.

They follow the contract in ``envs.core`` (single instance, Brax ``State``) and are cheap to
compile, so estimators can be tested and compared on them in seconds:

===================  ==========================  =====  ======  =======  ========================
class                task                        obs    action  length   reward uses
===================  ==========================  =====  ======  =======  ========================
``LinearQuadratic``  linear dynamics, quadratic  n (2)  m (1)   20       state *before* the step
                     cost; exact returns below
``PendulumSwingUp``  torque-limited pendulum     3      1       200      state *before* the step
``CartPoleSwingUp``  SHAC's cart-pole swing-up   5      1       240      state *after* the step
``WallContact``      point mass against a wall   2      1       100      state *after* the step
``DoublePendulum``   chaotic double pendulum     6      2       250      state *before* the step
``Curling``          push a stone (Suh et al.)   4      1       200      state *before* the step
===================  ==========================  =====  ======  =======  ========================

Common conventions:

* ``State.pipeline_state`` is the raw physical state vector, ``State.obs`` the observation.
* ``reward`` and ``done`` are scalars with the dtype of the state (float32 unless 64-bit mode is
  on); ``done`` is always 0: none of these tasks terminates, time limits come from the wrapper.
* ``metrics`` and ``info`` are empty dicts, so ``reset`` and ``step`` return identical pytree
  structures.
* Actions are **not clipped** inside the environments, so gradients always flow; policies are
  expected to squash (e.g. ``tanh``) their actions into ``[-1, 1]`` where a scale is documented.
* Every env has ``init_state(physical_state)``, which builds the ``State`` for a given raw
  state (handy for tests and for starting from a chosen state).

For ``LinearQuadratic`` under a linear-Gaussian policy the expected return, the value and the
action value are known in closed form: see ``lqr_expected_return``, ``lqr_value`` and
``lqr_q_value``. They are exact (no sampling) and differentiable with ``jax.grad``, which makes
them the reference for checking policy-gradient estimators.
"""

from __future__ import annotations

import abc
import functools
import math
from typing import Any, final

import jax
import jax.numpy as jnp
import numpy as np

from envs.core import Environment, SettingError, State

__all__ = [
    "CartPoleSwingUp",
    "Curling",
    "DoublePendulum",
    "LinearQuadratic",
    "PendulumSwingUp",
    "WallContact",
    "lqr_expected_return",
    "lqr_q_value",
    "lqr_value",
]


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise ``SettingError`` naming the setting, its value and what is allowed, unless ``ok``."""
    if not ok:
        raise SettingError(f"{name}={value!r} is invalid: {name} must be {allowed}")


def _real(value: Any) -> float | None:
    """``value`` as a Python float if it is a real scalar (not a bool), else ``None``."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return None
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    return float(array) if array.ndim == 0 and numeric else None


def _positive(name: str, value: Any) -> float:
    real = _real(value)
    _require(
        real is not None and math.isfinite(real) and real > 0, name, value, "a finite number > 0"
    )
    return real


def _non_negative(name: str, value: Any) -> float:
    real = _real(value)
    _require(
        real is not None and math.isfinite(real) and real >= 0, name, value, "a finite number >= 0"
    )
    return real


def _finite(name: str, value: Any) -> float:
    real = _real(value)
    _require(real is not None and math.isfinite(real), name, value, "a finite number")
    return real


def _positive_int(name: str, value: Any) -> int:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1
    _require(ok, name, value, "an integer >= 1")
    return int(value)


def _float_array(name: str, value: Any, shape: tuple[int, ...], allowed: str) -> np.ndarray:
    """``value`` as a finite float64 numpy array of exactly ``shape`` (else ``SettingError``)."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    ok = array is not None and array.shape == shape and bool(np.all(np.isfinite(array)))
    _require(ok, name, value, allowed)
    return array


# --------------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------------


class _AnalyticEnv(Environment):
    """Shared ``reset``/``step`` for envs whose whole state is one vector.

    Subclasses define the sizes and three pure functions of the raw state ``x [state_size]``:
    ``_sample_initial_state(key) -> x``, ``_observe(x) -> obs`` and
    ``_transition(x, action) -> (x_next, reward)``.
    """

    _state_size: int

    @abc.abstractmethod
    def _sample_initial_state(self, key: jax.Array) -> jax.Array: ...

    @abc.abstractmethod
    def _observe(self, x: jax.Array) -> jax.Array: ...

    @abc.abstractmethod
    def _transition(self, x: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]: ...

    def reset(self, key: jax.Array) -> State:
        return self.init_state(self._sample_initial_state(key))

    def init_state(self, physical_state: jax.Array) -> State:
        """The ``State`` whose raw physical state is ``physical_state [state_size]``."""
        x = jnp.asarray(physical_state)
        if x.shape != (self._state_size,):
            raise SettingError(
                f"physical_state has shape {x.shape}; {type(self).__name__} expects "
                f"({self._state_size},)"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.result_type(float))
        zero = jnp.zeros((), dtype=x.dtype)
        return State(
            pipeline_state=x, obs=self._observe(x), reward=zero, done=zero, metrics={}, info={}
        )

    def step(self, state: State, action: jax.Array) -> State:
        action = jnp.asarray(action)
        if action.shape != (self.action_size,):
            raise SettingError(
                f"action has shape {action.shape}; {type(self).__name__} expects "
                f"({self.action_size},)"
            )
        x_next, reward = self._transition(state.pipeline_state, action)
        return state.replace(
            pipeline_state=x_next,
            obs=self._observe(x_next),
            reward=reward,
            done=jnp.zeros_like(reward),
        )


def _semi_implicit_euler(acceleration, position, velocity, dt: float, substeps: int):
    """Integrate ``substeps`` semi-implicit Euler steps of size ``dt / substeps``.

    ``v <- v + h * acceleration(q, v)``, then ``q <- q + h * v`` (the updated velocity).
    ``acceleration(q, v)`` returns an array shaped like ``v``.
    """
    h = dt / substeps

    def substep(_, carry):
        q, v = carry
        v = v + h * acceleration(q, v)
        return q + h * v, v

    if substeps == 1:
        return substep(0, (position, velocity))
    return jax.lax.fori_loop(0, substeps, substep, (position, velocity))


# --------------------------------------------------------------------------------------------
# Linear-quadratic regulator
# --------------------------------------------------------------------------------------------

_LQR_DT = 0.1


@final
class LinearQuadratic(_AnalyticEnv):
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
        _require(
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
        _require(
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
        mean_np = _float_array("init_mean", init_mean, (n,), f"a finite vector of length n={n}")
        std_np = np.asarray(init_std, dtype=np.float64) if _array_like(init_std) else None
        _require(
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


def _array_like(value: Any) -> bool:
    try:
        np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return True


def _psd_matrix(name: str, value: Any, size: int) -> np.ndarray:
    allowed = f"a finite symmetric positive semi-definite matrix [{size}, {size}]"
    matrix = _float_array(name, value, (size, size), allowed)
    symmetric = np.allclose(matrix, matrix.T, rtol=1e-6, atol=1e-9)
    _require(symmetric and np.linalg.eigvalsh(matrix).min() >= -1e-9, name, value, allowed)
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
    _require(
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
    _require(
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


# --------------------------------------------------------------------------------------------
# Pendulum swing-up
# --------------------------------------------------------------------------------------------


@final
class PendulumSwingUp(_AnalyticEnv):
    """Torque-limited pendulum swing-up (registry name ``"pendulum"``).

    Raw state ``x = (theta, omega)``: angle from upright (``theta = 0`` is balanced, ``pi``
    hangs down; not wrapped) and angular velocity. A point mass ``mass`` on a massless rod of
    length ``length``; the action ``a [1]`` is a torque ``tau = max_torque * a`` (not clipped:
    the policy is expected to squash ``a`` into ``[-1, 1]``)::

        alpha          = (gravity / length) sin(theta) + tau / (mass * length^2)
        omega_{t+1}    = omega_t + dt * alpha                   (semi-implicit Euler)
        theta_{t+1}    = theta_t + dt * omega_{t+1}
        r_t            = -( angle_cost * (1 - cos theta_t) + velocity_cost * omega_t^2
                            + torque_cost * tau_t^2 )          (state before the step)
        obs            = (cos theta, sin theta, omega)

    ``1 - cos theta`` is a smooth angle cost (0 upright, 2 hanging). Start:
    ``theta_0 = pi + U(-init_noise, init_noise)``, ``omega_0 = U(-init_noise, init_noise)``.
    Defaults: ``max_torque = 2`` (less than ``mass * gravity * length``, so the pendulum must
    be pumped up), ``dt = 0.05``, ``gravity = 9.81``, ``mass = length = 1``,
    ``init_noise = 0.1``, costs ``1.0 / 0.1 / 0.001``; 200-step episodes (10 s).
    """

    default_episode_length = 200

    def __init__(
        self,
        *,
        max_torque: float = 2.0,
        dt: float = 0.05,
        gravity: float = 9.81,
        mass: float = 1.0,
        length: float = 1.0,
        init_noise: float = 0.1,
        angle_cost: float = 1.0,
        velocity_cost: float = 0.1,
        torque_cost: float = 0.001,
    ):
        self.max_torque = _positive("max_torque", max_torque)
        self.dt = _positive("dt", dt)
        self.gravity = _non_negative("gravity", gravity)
        self.mass = _positive("mass", mass)
        self.length = _positive("length", length)
        self.init_noise = _non_negative("init_noise", init_noise)
        self.angle_cost = _non_negative("angle_cost", angle_cost)
        self.velocity_cost = _non_negative("velocity_cost", velocity_cost)
        self.torque_cost = _non_negative("torque_cost", torque_cost)
        self._state_size = 2

    @property
    def observation_size(self) -> int:
        return 3

    @property
    def action_size(self) -> int:
        return 1

    def _sample_initial_state(self, key: jax.Array) -> jax.Array:
        noise = jax.random.uniform(key, (2,), minval=-1.0, maxval=1.0)
        return jnp.array([jnp.pi, 0.0], dtype=noise.dtype) + self.init_noise * noise

    def _observe(self, x: jax.Array) -> jax.Array:
        theta, omega = x[0], x[1]
        return jnp.stack([jnp.cos(theta), jnp.sin(theta), omega])

    def _transition(self, x: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        theta, omega = x[0], x[1]
        torque = self.max_torque * action[0]
        alpha = (self.gravity / self.length) * jnp.sin(theta) + torque / (
            self.mass * self.length**2
        )
        next_omega = omega + self.dt * alpha
        next_theta = theta + self.dt * next_omega
        reward = -(
            self.angle_cost * (1.0 - jnp.cos(theta))
            + self.velocity_cost * omega**2
            + self.torque_cost * torque**2
        )
        return jnp.stack([next_theta, next_omega]), reward


# --------------------------------------------------------------------------------------------
# Cart-pole swing-up
# --------------------------------------------------------------------------------------------


@final
class CartPoleSwingUp(_AnalyticEnv):
    """SHAC's cart-pole swing-up (registry name ``"cartpole_swingup"``).

    Modelled on ``CartPoleSwingUpEnv`` in NVlabs/DiffRL (Xu et al. 2022, SHAC): same masses
    (cart 1 kg, pole 10 kg with its centre of mass 0.5 m from the pivot and rotational inertia
    1 kg m^2 about it), force scale 1000 N, control step 1/60 s with 4 substeps, 240-step
    episodes and the same reward weights. Raw state ``x = (p, p_dot, theta, theta_dot)``: cart
    position, its velocity, pole angle from upright (``theta = 0`` balanced, ``pi`` hanging;
    positive ``theta`` leans the pole towards ``+p``; not wrapped) and angular velocity.

    Equations of motion (Lagrangian of a cart with a rigid pole, no friction), with
    ``M = cart_mass``, ``m = pole_mass``, ``l = pole_com``, ``I = pole_inertia``,
    ``F = force_scale * a``::

        (M + m) p_dd + m l cos(theta) theta_dd = F + m l sin(theta) theta_d^2
        m l cos(theta) p_dd + (I + m l^2) theta_dd = m g l sin(theta)

    solved as a 2x2 linear system and integrated with ``substeps`` semi-implicit Euler steps of
    ``dt / substeps`` per control step. The reward uses the state *after* the step, as SHAC's::

        r = -( angle_cost * wrap(theta)^2 + angular_velocity_cost * theta_d^2
               + position_cost * p^2 + velocity_cost * p_d^2 + action_cost * |a|^2 )

    with ``wrap(theta) = atan2(sin theta, cos theta)`` in ``[-pi, pi]`` (continuous, with a kink
    at the hanging position). Observation (SHAC's order):
    ``(p, p_dot, sin theta, cos theta, theta_dot)``. Start: ``(0, 0, pi, 0)`` plus
    ``U(-init_noise, init_noise)`` on every component.

    Differences from SHAC: actions are not clipped to ``[-1, 1]`` (the policy should squash),
    so ``action_cost`` defaults to a small ``1e-3`` instead of SHAC's 0 (set it to 0 for SHAC's
    exact reward); the cart has no rail limits; the start is perturbed by default
    (``init_noise = 0``: SHAC's fixed start).
    """

    default_episode_length = 240

    def __init__(
        self,
        *,
        cart_mass: float = 1.0,
        pole_mass: float = 10.0,
        pole_com: float = 0.5,
        pole_inertia: float = 1.0,
        gravity: float = 9.81,
        force_scale: float = 1000.0,
        dt: float = 1.0 / 60.0,
        substeps: int = 4,
        init_noise: float = 0.05,
        angle_cost: float = 1.0,
        angular_velocity_cost: float = 0.1,
        position_cost: float = 0.05,
        velocity_cost: float = 0.1,
        action_cost: float = 1e-3,
    ):
        self.cart_mass = _positive("cart_mass", cart_mass)
        self.pole_mass = _positive("pole_mass", pole_mass)
        self.pole_com = _positive("pole_com", pole_com)
        self.pole_inertia = _non_negative("pole_inertia", pole_inertia)
        self.gravity = _non_negative("gravity", gravity)
        self.force_scale = _positive("force_scale", force_scale)
        self.dt = _positive("dt", dt)
        self.substeps = _positive_int("substeps", substeps)
        self.init_noise = _non_negative("init_noise", init_noise)
        self.angle_cost = _non_negative("angle_cost", angle_cost)
        self.angular_velocity_cost = _non_negative("angular_velocity_cost", angular_velocity_cost)
        self.position_cost = _non_negative("position_cost", position_cost)
        self.velocity_cost = _non_negative("velocity_cost", velocity_cost)
        self.action_cost = _non_negative("action_cost", action_cost)
        self._state_size = 4

    @property
    def observation_size(self) -> int:
        return 5

    @property
    def action_size(self) -> int:
        return 1

    def _sample_initial_state(self, key: jax.Array) -> jax.Array:
        noise = jax.random.uniform(key, (4,), minval=-1.0, maxval=1.0)
        return jnp.array([0.0, 0.0, jnp.pi, 0.0], dtype=noise.dtype) + self.init_noise * noise

    def _observe(self, x: jax.Array) -> jax.Array:
        position, velocity, theta, theta_dot = x[0], x[1], x[2], x[3]
        return jnp.stack([position, velocity, jnp.sin(theta), jnp.cos(theta), theta_dot])

    def _accelerations(self, q: jax.Array, qd: jax.Array, force: jax.Array) -> jax.Array:
        """``(p_dd, theta_dd)`` for ``q = (p, theta)``, ``qd = (p_d, theta_d)``."""
        total_mass = self.cart_mass + self.pole_mass
        ml = self.pole_mass * self.pole_com
        pole_moment = self.pole_inertia + self.pole_mass * self.pole_com**2
        sin, cos = jnp.sin(q[1]), jnp.cos(q[1])
        coupling = ml * cos
        rhs_cart = force + ml * sin * qd[1] ** 2
        rhs_pole = ml * self.gravity * sin
        det = total_mass * pole_moment - coupling**2  # > 0: the mass matrix is positive definite
        p_dd = (pole_moment * rhs_cart - coupling * rhs_pole) / det
        theta_dd = (total_mass * rhs_pole - coupling * rhs_cart) / det
        return jnp.stack([p_dd, theta_dd])

    def _transition(self, x: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        force = self.force_scale * action[0]
        q, qd = jnp.stack([x[0], x[2]]), jnp.stack([x[1], x[3]])
        q, qd = _semi_implicit_euler(
            lambda q_, qd_: self._accelerations(q_, qd_, force), q, qd, self.dt, self.substeps
        )
        x_next = jnp.stack([q[0], qd[0], q[1], qd[1]])
        wrapped = jnp.arctan2(jnp.sin(q[1]), jnp.cos(q[1]))
        reward = -(
            self.angle_cost * wrapped**2
            + self.angular_velocity_cost * qd[1] ** 2
            + self.position_cost * q[0] ** 2
            + self.velocity_cost * qd[0] ** 2
            + self.action_cost * jnp.sum(action**2)
        )
        return x_next, reward


# --------------------------------------------------------------------------------------------
# Double pendulum
# --------------------------------------------------------------------------------------------


@final
class DoublePendulum(_AnalyticEnv):
    """A torque-driven double pendulum, chaotic at the energy it starts with (registry name
    ``"double_pendulum"``).

    Raw state ``x = (theta_1, theta_2, omega_1, omega_2)``: the absolute angles of the two rods
    from the downward vertical (``0`` hangs, ``pi`` is upright; not wrapped) and their angular
    velocities. Point masses ``m_1, m_2`` at the ends of massless rods ``l_1, l_2``; the action
    ``a [2]`` gives the joint torques ``tau = max_torque * a`` at the shoulder (ground to rod 1)
    and the elbow (rod 1 to rod 2), i.e. generalised forces ``Q = (tau_1 - tau_2, tau_2)``.
    Lagrange's equations, with ``d = theta_1 - theta_2`` and ``c = m_2 l_1 l_2``::

        (m_1 + m_2) l_1^2 alpha_1 + c cos(d) alpha_2
            = Q_1 - c sin(d) omega_2^2 - (m_1 + m_2) g l_1 sin theta_1
        c cos(d) alpha_1 + m_2 l_2^2 alpha_2
            = Q_2 + c sin(d) omega_1^2 - m_2 g l_2 sin theta_2

    solved in closed form (the determinant ``m_2 l_1^2 l_2^2 (m_1 + m_2 sin^2 d) > 0``) and
    integrated with ``substeps`` semi-implicit Euler steps of ``dt / substeps``. The reward uses
    the state *before* the step::

        r = -( angle_cost * ((1 + cos theta_1) + (1 + cos theta_2))
               + velocity_cost * (omega_1^2 + omega_2^2) + torque_cost * |tau|^2 )

    (0 upright and at rest). Observation ``(cos theta_1, sin theta_1, cos theta_2, sin theta_2,
    omega_1, omega_2)``. Start: both rods horizontal (``theta = pi / 2``) at rest, plus
    ``U(-init_noise, init_noise)`` on every component: released from there the unforced
    pendulum is chaotic (its largest Lyapunov exponent is positive; ``diffpg.dynamics``
    measures it). Defaults: unit masses and lengths, ``g = 9.81``, ``dt = 0.02`` with 4
    substeps, ``max_torque = 1`` (small against gravity's ``(m_1 + m_2) g l_1 = 19.6`` N m),
    ``init_noise = 0.05``, costs ``1 / 0.01 / 0.001``; 250-step episodes (5 s).
    """

    default_episode_length = 250

    def __init__(
        self,
        *,
        mass_1: float = 1.0,
        mass_2: float = 1.0,
        length_1: float = 1.0,
        length_2: float = 1.0,
        gravity: float = 9.81,
        max_torque: float = 1.0,
        dt: float = 0.02,
        substeps: int = 4,
        init_noise: float = 0.05,
        angle_cost: float = 1.0,
        velocity_cost: float = 0.01,
        torque_cost: float = 0.001,
    ):
        self.mass_1 = _positive("mass_1", mass_1)
        self.mass_2 = _positive("mass_2", mass_2)
        self.length_1 = _positive("length_1", length_1)
        self.length_2 = _positive("length_2", length_2)
        self.gravity = _non_negative("gravity", gravity)
        self.max_torque = _non_negative("max_torque", max_torque)
        self.dt = _positive("dt", dt)
        self.substeps = _positive_int("substeps", substeps)
        self.init_noise = _non_negative("init_noise", init_noise)
        self.angle_cost = _non_negative("angle_cost", angle_cost)
        self.velocity_cost = _non_negative("velocity_cost", velocity_cost)
        self.torque_cost = _non_negative("torque_cost", torque_cost)
        self._state_size = 4

    @property
    def observation_size(self) -> int:
        return 6

    @property
    def action_size(self) -> int:
        return 2

    def _sample_initial_state(self, key: jax.Array) -> jax.Array:
        noise = jax.random.uniform(key, (4,), minval=-1.0, maxval=1.0)
        horizontal = jnp.array([jnp.pi / 2, jnp.pi / 2, 0.0, 0.0], dtype=noise.dtype)
        return horizontal + self.init_noise * noise

    def _observe(self, x: jax.Array) -> jax.Array:
        return jnp.stack([jnp.cos(x[0]), jnp.sin(x[0]), jnp.cos(x[1]), jnp.sin(x[1]),
                          x[2], x[3]])

    def accelerations(self, q: jax.Array, qd: jax.Array, torque: jax.Array) -> jax.Array:
        """``(alpha_1, alpha_2)`` for angles ``q [2]``, velocities ``qd [2]`` and joint torques
        ``torque [2]`` (the class docstring's equations)."""
        m1, m2, l1, l2, g = self.mass_1, self.mass_2, self.length_1, self.length_2, self.gravity
        d = q[0] - q[1]
        coupling = m2 * l1 * l2 * jnp.cos(d)
        m11, m22 = (m1 + m2) * l1**2, m2 * l2**2
        rhs_1 = (torque[0] - torque[1] - m2 * l1 * l2 * jnp.sin(d) * qd[1] ** 2
                 - (m1 + m2) * g * l1 * jnp.sin(q[0]))
        rhs_2 = torque[1] + m2 * l1 * l2 * jnp.sin(d) * qd[0] ** 2 - m2 * g * l2 * jnp.sin(q[1])
        det = m11 * m22 - coupling**2
        return jnp.stack([(m22 * rhs_1 - coupling * rhs_2) / det,
                          (m11 * rhs_2 - coupling * rhs_1) / det])

    def energy(self, x: jax.Array) -> jax.Array:
        """Kinetic plus potential energy of the raw state (height measured from the pivot)."""
        m1, m2, l1, l2, g = self.mass_1, self.mass_2, self.length_1, self.length_2, self.gravity
        kinetic = (0.5 * (m1 + m2) * l1**2 * x[2] ** 2 + 0.5 * m2 * l2**2 * x[3] ** 2
                   + m2 * l1 * l2 * jnp.cos(x[0] - x[1]) * x[2] * x[3])
        potential = -(m1 + m2) * g * l1 * jnp.cos(x[0]) - m2 * g * l2 * jnp.cos(x[1])
        return kinetic + potential

    def _transition(self, x: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        torque = self.max_torque * action
        q, qd = _semi_implicit_euler(lambda q_, qd_: self.accelerations(q_, qd_, torque),
                                     x[:2], x[2:], self.dt, self.substeps)
        reward = -(
            self.angle_cost * (2.0 + jnp.cos(x[0]) + jnp.cos(x[1]))
            + self.velocity_cost * (x[2] ** 2 + x[3] ** 2)
            + self.torque_cost * jnp.sum(torque**2)
        )
        return jnp.concatenate([q, qd]), reward


# --------------------------------------------------------------------------------------------
# Curling: a pusher and a stone
# --------------------------------------------------------------------------------------------


@final
class Curling(_AnalyticEnv):
    """Pushing a stone to a goal through a stiff contact (registry name ``"curling"``): Suh et
    al. 2022's curling task (``alpha_gradient``, ``examples/curling``), where first-order
    gradients show an empirical bias that grows with the stiffness.

    Raw state ``x = (p, s, v_p, v_s)``: the positions of a pusher and of the stone in front of
    it (unit distance apart when they touch) and their velocities. The action ``a [1]`` is a
    force ``u = force_scale * a`` on the pusher. With ``gap = s - p`` and the penalty contact
    ``f_c = stiffness * max(1 - gap, 0)`` (pushing them apart), one step of ``dt``::

        v_p' = damping * v_p + dt / mass * (u - f_c)
        v_s' = damping * v_s + dt / mass * f_c                 (semi-implicit Euler)
        p'   = p + dt * v_p',   s' = s + dt * v_s'
        r    = -( (x - goal)^T Q (x - goal) + action_cost * u^2 )   (state before the step)

    with ``goal = (goal_pusher, goal_stone, 0, 0)`` and ``Q = diag(pusher_cost, stone_cost,
    velocity_cost, velocity_cost)``. The contact force is continuous in the state but its
    derivative jumps at ``gap = 1``; the stiffer the contact, the shorter and harder the
    impulse. Defaults follow Suh et al.'s setup: masses 0.1, ``dt = 0.005``, ``damping = 0.998``
    per step, start ``(0, 1, 0, 0)`` (touching, at rest) plus ``U(-init_noise, init_noise)`` on
    the positions, goal ``(1, 2)``, ``Q = diag(0.1, 10, 0.1, 0.1)``, action cost 1 on the force,
    200-step episodes, ``stiffness = 100`` (they sweep 10, 100, 1000); ``force_scale = 1``
    (their forces are of order 0.1 to 1). Their trajectory cost also has a terminal term; here
    the episode simply ends. Semi-implicit Euler is stable for ``dt * sqrt(2 stiffness / mass)
    < 2``: stiffness up to about 8,000 at the default ``dt``.
    """

    default_episode_length = 200

    def __init__(
        self,
        *,
        stiffness: float = 100.0,
        mass: float = 0.1,
        dt: float = 0.005,
        damping: float = 0.998,
        force_scale: float = 1.0,
        init_noise: float = 0.0,
        goal_pusher: float = 1.0,
        goal_stone: float = 2.0,
        pusher_cost: float = 0.1,
        stone_cost: float = 10.0,
        velocity_cost: float = 0.1,
        action_cost: float = 1.0,
    ):
        self.stiffness = _non_negative("stiffness", stiffness)
        self.mass = _positive("mass", mass)
        self.dt = _positive("dt", dt)
        self.damping = _non_negative("damping", damping)
        _require(self.damping <= 1.0, "damping", damping, "in [0, 1]")
        limit = (2.0 / self.dt) ** 2 * self.mass / 2.0
        _require(self.stiffness < limit, "stiffness", stiffness,
                 f"below {limit:.4g} (explicit contact is unstable beyond at dt={self.dt})")
        self.force_scale = _positive("force_scale", force_scale)
        self.init_noise = _non_negative("init_noise", init_noise)
        self.goal_pusher = _finite("goal_pusher", goal_pusher)
        self.goal_stone = _finite("goal_stone", goal_stone)
        self.pusher_cost = _non_negative("pusher_cost", pusher_cost)
        self.stone_cost = _non_negative("stone_cost", stone_cost)
        self.velocity_cost = _non_negative("velocity_cost", velocity_cost)
        self.action_cost = _non_negative("action_cost", action_cost)
        self._state_size = 4

    @property
    def observation_size(self) -> int:
        return 4

    @property
    def action_size(self) -> int:
        return 1

    def _sample_initial_state(self, key: jax.Array) -> jax.Array:
        noise = jax.random.uniform(key, (2,), minval=-1.0, maxval=1.0)
        start = jnp.array([0.0, 1.0, 0.0, 0.0], dtype=noise.dtype)
        return start.at[:2].add(self.init_noise * noise)

    def _observe(self, x: jax.Array) -> jax.Array:
        return x

    def _transition(self, x: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        force = self.force_scale * action[0]
        contact = self.stiffness * jnp.maximum(1.0 - (x[1] - x[0]), 0.0)
        velocity = self.damping * x[2:] + self.dt / self.mass * jnp.stack(
            [force - contact, contact])
        position = x[:2] + self.dt * velocity
        error = x - jnp.array([self.goal_pusher, self.goal_stone, 0.0, 0.0], x.dtype)
        weights = jnp.array([self.pusher_cost, self.stone_cost, self.velocity_cost,
                             self.velocity_cost], x.dtype)
        reward = -(jnp.sum(weights * error**2) + self.action_cost * force**2)
        return jnp.concatenate([position, velocity]), reward


# --------------------------------------------------------------------------------------------
# Point mass against a wall
# --------------------------------------------------------------------------------------------

_CONTACT_MODELS = ("penalty", "rigid")


@final
class WallContact(_AnalyticEnv):
    """A 1-D point mass pushed against a wall (registry name ``"contact"``).

    For studying how stiff and discontinuous contact biases gradient estimators (Suh et al.
    2022, "Do differentiable simulators give better policy gradients?"). Raw state and
    observation ``x = (p, v)``: position and velocity. The action ``a [1]`` is a force
    ``F = max_force * a`` (not clipped: the policy should squash). The wall sits at
    ``p = wall`` and the target at ``target`` (default: on the wall), so good trajectories
    touch the wall. Each control step runs ``substeps`` semi-implicit Euler steps of
    ``h = dt / substeps``.

    ``contact_model = "penalty"`` (default; smooth almost everywhere, stiff for large
    ``stiffness``)::

        d      = max(0, p - wall)                           (penetration depth)
        f_c    = -stiffness * d - damping * v * [d > 0]
        v'     = v + h (F + f_c) / mass,   p' = p + h v'

    The spring term is continuous with a kink at ``d = 0``; with ``damping > 0`` the force
    jumps at contact onset. Semi-implicit Euler is stable for the spring only when
    ``stiffness * h^2 / mass < 4``, which the constructor checks (raise ``substeps`` for stiffer
    walls). Larger stiffness means less penetration and a shorter, more violent contact, i.e.
    closer to a rigid bounce.

    ``contact_model = "rigid"`` (an exact elastic bounce, discontinuous; ``stiffness`` and
    ``damping`` are ignored)::

        v' = v + h F / mass,   p' = p + h v'
        if p' > wall:  p' <- 2 wall - p',  v' <- -v'           (reflect position and velocity)

    Reward (state after the step): ``r = -((p' - target)^2 + action_cost * a^2)``.
    Start: ``p_0 = start + U(-init_noise, init_noise)``, ``v_0 = 0``.
    Defaults: ``stiffness = 1e3``, ``damping = 0``, ``mass = 1``, ``max_force = 10``,
    ``wall = 1``, ``target = wall``, ``start = 0``, ``init_noise = 0.1``, ``dt = 0.01``,
    ``substeps = 1``, ``action_cost = 1e-3``; 100-step episodes (1 s).
    """

    default_episode_length = 100

    def __init__(
        self,
        *,
        stiffness: float = 1e3,
        contact_model: str = "penalty",
        damping: float = 0.0,
        mass: float = 1.0,
        max_force: float = 10.0,
        wall: float = 1.0,
        target: float | None = None,
        start: float = 0.0,
        init_noise: float = 0.1,
        dt: float = 0.01,
        substeps: int = 1,
        action_cost: float = 1e-3,
    ):
        _require(
            contact_model in _CONTACT_MODELS,
            "contact_model",
            contact_model,
            f"one of {_CONTACT_MODELS}",
        )
        self.contact_model = contact_model
        self.stiffness = _positive("stiffness", stiffness)
        self.damping = _non_negative("damping", damping)
        self.mass = _positive("mass", mass)
        self.max_force = _positive("max_force", max_force)
        self.wall = _finite("wall", wall)
        self.target = self.wall if target is None else _finite("target", target)
        self.start = _finite("start", start)
        self.init_noise = _non_negative("init_noise", init_noise)
        self.dt = _positive("dt", dt)
        self.substeps = _positive_int("substeps", substeps)
        self.action_cost = _non_negative("action_cost", action_cost)
        _require(
            self.start + self.init_noise < self.wall,
            "start",
            start,
            f"such that start + init_noise < wall={self.wall} (start in free space)",
        )
        if contact_model == "penalty":
            h = self.dt / self.substeps
            limit = 4.0 * self.mass / h**2
            _require(
                self.stiffness < limit,
                "stiffness",
                stiffness,
                f"< 4 * mass / (dt / substeps)^2 = {limit:g} for stable semi-implicit "
                "Euler (increase substeps for a stiffer wall)",
            )
        self._state_size = 2

    @property
    def observation_size(self) -> int:
        return 2

    @property
    def action_size(self) -> int:
        return 1

    def _sample_initial_state(self, key: jax.Array) -> jax.Array:
        noise = jax.random.uniform(key, (), minval=-1.0, maxval=1.0)
        return jnp.stack([self.start + self.init_noise * noise, jnp.zeros_like(noise)])

    def _observe(self, x: jax.Array) -> jax.Array:
        return x

    def _penalty_acceleration(self, force, p, v):
        penetration = jnp.maximum(p - self.wall, 0.0)
        in_contact = p > self.wall
        contact_force = -self.stiffness * penetration - jnp.where(in_contact, self.damping * v, 0.0)
        return (force + contact_force) / self.mass

    def _transition(self, x: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        force = self.max_force * action[0]
        h = self.dt / self.substeps
        if self.contact_model == "penalty":
            p, v = _semi_implicit_euler(
                lambda p_, v_: self._penalty_acceleration(force, p_, v_),
                x[0],
                x[1],
                self.dt,
                self.substeps,
            )
        else:

            def substep(_, carry):
                p, v = carry
                v = v + h * force / self.mass
                p = p + h * v
                crossed = p > self.wall
                return (jnp.where(crossed, 2.0 * self.wall - p, p), jnp.where(crossed, -v, v))

            if self.substeps == 1:
                p, v = substep(0, (x[0], x[1]))
            else:
                p, v = jax.lax.fori_loop(0, self.substeps, substep, (x[0], x[1]))
        reward = -((p - self.target) ** 2 + self.action_cost * action[0] ** 2)
        return jnp.stack([p, v]), reward
