"""The chaotic double pendulum."""

from __future__ import annotations

from typing import final

import jax
import jax.numpy as jnp
from diffpg.envs.analytic.base import (
    AnalyticEnv,
    non_negative,
    positive,
    positive_int,
    semi_implicit_euler,
)


@final
class DoublePendulum(AnalyticEnv):
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

    observation_size = 6
    action_size = 2

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
        self.mass_1 = positive("mass_1", mass_1)
        self.mass_2 = positive("mass_2", mass_2)
        self.length_1 = positive("length_1", length_1)
        self.length_2 = positive("length_2", length_2)
        self.gravity = non_negative("gravity", gravity)
        self.max_torque = non_negative("max_torque", max_torque)
        self.dt = positive("dt", dt)
        self.substeps = positive_int("substeps", substeps)
        self.init_noise = non_negative("init_noise", init_noise)
        self.angle_cost = non_negative("angle_cost", angle_cost)
        self.velocity_cost = non_negative("velocity_cost", velocity_cost)
        self.torque_cost = non_negative("torque_cost", torque_cost)
        self._state_size = 4

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
        q, qd = semi_implicit_euler(lambda q_, qd_: self.accelerations(q_, qd_, torque),
                                     x[:2], x[2:], self.dt, self.substeps)
        reward = -(
            self.angle_cost * (2.0 + jnp.cos(x[0]) + jnp.cos(x[1]))
            + self.velocity_cost * (x[2] ** 2 + x[3] ** 2)
            + self.torque_cost * jnp.sum(torque**2)
        )
        return jnp.concatenate([q, qd]), reward


