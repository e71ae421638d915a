"""A point mass against a wall, with a penalty or rigid contact of a given stiffness."""

from __future__ import annotations

from typing import final

import jax
import jax.numpy as jnp
import numpy as np
from diffpg.envs.analytic.base import (
    AnalyticEnv,
    finite,
    non_negative,
    positive,
    positive_int,
    require,
    semi_implicit_euler,
)

_CONTACT_MODELS = ("penalty", "rigid")


@final
class WallContact(AnalyticEnv):
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

    observation_size = 2
    action_size = 1

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
        require(
            contact_model in _CONTACT_MODELS,
            "contact_model",
            contact_model,
            f"one of {_CONTACT_MODELS}",
        )
        self.contact_model = contact_model
        self.stiffness = positive("stiffness", stiffness)
        self.damping = non_negative("damping", damping)
        self.mass = positive("mass", mass)
        self.max_force = positive("max_force", max_force)
        self.wall = finite("wall", wall)
        self.target = self.wall if target is None else finite("target", target)
        self.start = finite("start", start)
        self.init_noise = non_negative("init_noise", init_noise)
        self.dt = positive("dt", dt)
        self.substeps = positive_int("substeps", substeps)
        self.action_cost = non_negative("action_cost", action_cost)
        require(
            self.start + self.init_noise < self.wall,
            "start",
            start,
            f"such that start + init_noise < wall={self.wall} (start in free space)",
        )
        if contact_model == "penalty":
            h = self.dt / self.substeps
            limit = 4.0 * self.mass / h**2
            require(
                self.stiffness < limit,
                "stiffness",
                stiffness,
                f"< 4 * mass / (dt / substeps)^2 = {limit:g} for stable semi-implicit "
                "Euler (increase substeps for a stiffer wall)",
            )
        self._state_size = 2

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
            p, v = semi_implicit_euler(
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

    def frame_drawer(self, positions):
        """The point mass, its wall and its target on a line (``diffpg.envs.drawing``;
        ``positions [T + 1, 2]``: the raw states)."""
        low = min(float(np.min(positions[:, 0])), self.start) - 0.2
        high = self.wall + 0.3

        def draw(axis, x):
            axis.axvline(self.wall, color="black", lw=4)
            axis.plot([self.target], [0], "x", color="tab:green", ms=10)
            axis.plot([x[0]], [0], "o", color="tab:red", ms=14)
            axis.set(xlim=(low, high), ylim=(-0.5, 0.5), yticks=[])

        return draw
