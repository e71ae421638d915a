"""How a system stretches perturbations: step Jacobians along a trajectory and the finite-time
largest Lyapunov exponent.

For a state map ``x_{t+1} = f(x_t, a_t)`` with step duration ``dt``, along the trajectory from
``x_0`` under the actions ``a_0 .. a_{T-1}``:

* ``J_t = d x_{t+1} / d x_t`` (``step_jacobians``), whose product is ``d x_T / d x_0``;
* the finite-time largest Lyapunov exponent (``largest_lyapunov_exponent``)::

      lambda_T = (1 / (T dt)) sum_t log |J_t v_t|,    v_{t+1} = J_t v_t / |J_t v_t|

  from a unit ``v_0``: the growth rate of a perturbation, renormalised every step so that it
  never overflows (Benettin et al. 1980). ``lambda > 0`` (per unit time) is chaos: nearby
  trajectories separate like ``exp(lambda t)``, and so do the norms of gradients through
  ``T`` steps, whose variance then grows like ``exp(2 lambda T dt)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

StepFunction = Callable[[jax.Array, jax.Array], jax.Array]
"""``f(x [n], a [m]) -> x' [n]``: one step of the raw state under one action."""


def env_step_function(env) -> StepFunction:
    """The raw-state map of an env with ``init_state`` (every analytic env)."""
    return lambda x, action: env.step(env.init_state(x), action).pipeline_state


def step_jacobians(step: StepFunction, x0: jax.Array, actions: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """States ``[T + 1, n]`` (``x_0 .. x_T``) and Jacobians ``[T, n, n]`` (``d x_{t+1} / d x_t``)
    along the trajectory from ``x0`` under ``actions [T, m]``."""
    def one_step(x, action):
        x_next = step(x, action)
        return x_next, (x_next, jax.jacfwd(step)(x, action))

    _, (states, jacobians) = jax.lax.scan(one_step, x0, actions)
    return jnp.concatenate([x0[None], states]), jacobians


def largest_lyapunov_exponent(step: StepFunction, x0: jax.Array, actions: jax.Array, dt: float,
                              direction: jax.Array | None = None) -> jax.Array:
    """``lambda_T`` (per unit time; see the module docstring) along ``T = len(actions)`` steps,
    with tangent vectors propagated by Jacobian-vector products; ``direction`` is ``v_0``
    (default: all ones, normalised)."""
    v0 = jnp.ones_like(x0) if direction is None else jnp.asarray(direction, x0.dtype)

    def one_step(carry, action):
        x, v = carry
        x_next, stretched = jax.jvp(lambda y: step(y, action), (x,), (v,))
        growth = jnp.linalg.norm(stretched)
        return (x_next, stretched / growth), jnp.log(growth)

    _, log_growth = jax.lax.scan(one_step, (x0, v0 / jnp.linalg.norm(v0)), actions)
    return jnp.sum(log_growth) / (actions.shape[0] * dt)
