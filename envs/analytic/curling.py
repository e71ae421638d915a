"""Suh et al.'s curling: a pusher and a stone with a contact stiffness."""

from __future__ import annotations

from typing import final

import jax
import jax.numpy as jnp
from diffpg.envs.analytic.base import AnalyticEnv, finite, non_negative, positive, require


@final
class Curling(AnalyticEnv):
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

    observation_size = 4
    action_size = 1

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
        self.stiffness = non_negative("stiffness", stiffness)
        self.mass = positive("mass", mass)
        self.dt = positive("dt", dt)
        self.damping = non_negative("damping", damping)
        require(self.damping <= 1.0, "damping", damping, "in [0, 1]")
        limit = (2.0 / self.dt) ** 2 * self.mass / 2.0
        require(self.stiffness < limit, "stiffness", stiffness,
                 f"below {limit:.4g} (explicit contact is unstable beyond at dt={self.dt})")
        self.force_scale = positive("force_scale", force_scale)
        self.init_noise = non_negative("init_noise", init_noise)
        self.goal_pusher = finite("goal_pusher", goal_pusher)
        self.goal_stone = finite("goal_stone", goal_stone)
        self.pusher_cost = non_negative("pusher_cost", pusher_cost)
        self.stone_cost = non_negative("stone_cost", stone_cost)
        self.velocity_cost = non_negative("velocity_cost", velocity_cost)
        self.action_cost = non_negative("action_cost", action_cost)
        self._state_size = 4

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


