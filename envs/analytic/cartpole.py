"""SHAC's cart-pole swing-up."""

from __future__ import annotations

from typing import final

import jax
import jax.numpy as jnp
import numpy as np
from diffpg.envs import drawing
from diffpg.envs.analytic.base import (
    AnalyticEnv,
    non_negative,
    positive,
    positive_int,
    semi_implicit_euler,
)


@final
class CartPoleSwingUp(AnalyticEnv):
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

    observation_size = 5
    action_size = 1

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
        self.cart_mass = positive("cart_mass", cart_mass)
        self.pole_mass = positive("pole_mass", pole_mass)
        self.pole_com = positive("pole_com", pole_com)
        self.pole_inertia = non_negative("pole_inertia", pole_inertia)
        self.gravity = non_negative("gravity", gravity)
        self.force_scale = positive("force_scale", force_scale)
        self.dt = positive("dt", dt)
        self.substeps = positive_int("substeps", substeps)
        self.init_noise = non_negative("init_noise", init_noise)
        self.angle_cost = non_negative("angle_cost", angle_cost)
        self.angular_velocity_cost = non_negative("angular_velocity_cost", angular_velocity_cost)
        self.position_cost = non_negative("position_cost", position_cost)
        self.velocity_cost = non_negative("velocity_cost", velocity_cost)
        self.action_cost = non_negative("action_cost", action_cost)
        self._state_size = 4

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
        q, qd = semi_implicit_euler(
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

    def frame_drawer(self, positions):
        """The cart and its pole from the side (``diffpg.envs.drawing``; ``positions
        [T + 1, 4]``: the raw states)."""
        pole = 2.0 * self.pole_com

        def draw(axis, x):
            cart, theta = x[0], x[2]
            tip = (cart + pole * np.sin(theta), pole * np.cos(theta))
            drawing.box(axis, cart, 0.4, 0.2)
            axis.plot([cart, tip[0]], [0, tip[1]], "-", color="tab:blue", lw=3)
            axis.axhline(-0.1, color="grey", lw=1)
            drawing.square(axis, 1.4 * pole, (cart, 0.0))

        return draw
