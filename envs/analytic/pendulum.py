"""The torque-limited pendulum swing-up."""

from __future__ import annotations

from typing import final

import jax
import jax.numpy as jnp
import numpy as np
from diffpg.envs import drawing
from diffpg.envs.analytic.base import AnalyticEnv, non_negative, positive


@final
class PendulumSwingUp(AnalyticEnv):
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

    observation_size = 3
    action_size = 1

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
        self.max_torque = positive("max_torque", max_torque)
        self.dt = positive("dt", dt)
        self.gravity = non_negative("gravity", gravity)
        self.mass = positive("mass", mass)
        self.length = positive("length", length)
        self.init_noise = non_negative("init_noise", init_noise)
        self.angle_cost = non_negative("angle_cost", angle_cost)
        self.velocity_cost = non_negative("velocity_cost", velocity_cost)
        self.torque_cost = non_negative("torque_cost", torque_cost)
        self._state_size = 2

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

    def frame_drawer(self, positions):
        """The pendulum from the front: a rod from the pivot to its bob (``diffpg.envs.drawing``;
        ``positions [T + 1, 2]``: the raw states)."""
        length = self.length

        def draw(axis, x):
            tip = (length * np.sin(x[0]), length * np.cos(x[0]))
            axis.plot([0, tip[0]], [0, tip[1]], "-", color="tab:blue", lw=3)
            axis.plot(*tip, "o", color="tab:red", ms=12)
            drawing.square(axis, 1.3 * length, (0.0, 0.0))

        return draw
