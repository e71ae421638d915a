"""The analytic environments' shared base: ``AnalyticEnv`` (the ``diffpg.envs.core`` contract for a
physical state vector), the integrator the mechanical ones use, and their settings checks."""

from __future__ import annotations

import abc
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from diffpg.envs.core import Environment, SettingError, State


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise ``SettingError`` naming the setting, its value and what is allowed, unless ``ok``."""
    if not ok:
        raise SettingError(f"{name}={value!r} is invalid: {name} must be {allowed}")


def real_number(value: Any) -> float | None:
    """``value`` as a Python float if it is a real scalar (not a bool), else ``None``."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return None
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    return float(array) if array.ndim == 0 and numeric else None


def positive(name: str, value: Any) -> float:
    real = real_number(value)
    require(
        real is not None and math.isfinite(real) and real > 0, name, value, "a finite number > 0"
    )
    return real


def non_negative(name: str, value: Any) -> float:
    real = real_number(value)
    require(
        real is not None and math.isfinite(real) and real >= 0, name, value, "a finite number >= 0"
    )
    return real


def finite(name: str, value: Any) -> float:
    real = real_number(value)
    require(real is not None and math.isfinite(real), name, value, "a finite number")
    return real


def positive_int(name: str, value: Any) -> int:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1
    require(ok, name, value, "an integer >= 1")
    return int(value)


def float_array(name: str, value: Any, shape: tuple[int, ...], allowed: str) -> np.ndarray:
    """``value`` as a finite float64 numpy array of exactly ``shape`` (else ``SettingError``)."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    ok = array is not None and array.shape == shape and bool(np.all(np.isfinite(array)))
    require(ok, name, value, allowed)
    return array




class AnalyticEnv(Environment):
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


def semi_implicit_euler(acceleration, position, velocity, dt: float, substeps: int):
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


