"""Brax's own environments behind the ``diffpg.envs.core.Environment`` contract.

``BraxEnvironment`` is a thin adapter: ``reset``/``step`` pass straight through to the raw
``brax.envs.get_environment(name, backend=...)`` environment, which already reports falls in
``done`` and adds no time limit (``diffpg.envs.wrappers.TimeLimitAutoReset`` does that). None of Brax's
training wrappers are used.

Backends (Brax's physics pipelines):

* ``"generalized"``: reduced coordinates, articulated-body dynamics (Brax's default);
* ``"positional"``: maximal coordinates with position-based constraint solving;
* ``"spring"``: maximal coordinates with impulse/spring constraints (the cheapest);
* ``"mjx"``: MuJoCo XLA, built with ``solver_iterations`` constraint-solver iterations
  (default 1, the setting with which MJX's step is differentiable: ``diffpg.envs.mjx``). With more,
  the env still simulates, and differentiating its step raises an error naming the setting.

``DEFAULT_BACKEND`` was chosen per environment from ``experiments/measure_brax_backends.py``
(finite gradients first, then a moderate gradient norm, then speed); see
``docs/brax_backends.md`` for the measured table.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from diffpg.envs import mjx
from diffpg.envs.core import Environment, SettingError, State, import_brax_envs

__all__ = [
    "BACKENDS",
    "BRAX_ENV_NAMES",
    "DEFAULT_BACKEND",
    "DEFAULT_EPISODE_LENGTH",
    "FALLING_ENV_NAMES",
    "SUPPORTED_BACKENDS",
    "BraxEnvironment",
    "check_solver_setting",
]

#: Every physics backend Brax offers.
BACKENDS: tuple[str, ...] = ("generalized", "positional", "spring", "mjx")

#: The Brax environments this package exposes (Brax's registry minus its ``fast`` test env).
BRAX_ENV_NAMES: tuple[str, ...] = (
    "ant",
    "halfcheetah",
    "hopper",
    "humanoid",
    "humanoidstandup",
    "walker2d",
    "swimmer",
    "reacher",
    "pusher",
    "inverted_pendulum",
    "inverted_double_pendulum",
)

#: Backends each environment can be built with (Brax's swimmer only has a generalized model).
SUPPORTED_BACKENDS: Mapping[str, tuple[str, ...]] = {
    name: (("generalized",) if name == "swimmer" else BACKENDS) for name in BRAX_ENV_NAMES
}

#: Episode lengths (steps of the env, i.e. after Brax's frame skip) following the Gym/MuJoCo
#: conventions Brax's envs reproduce: Reacher-v4 is 50 steps, Pusher-v4 100, everything else
#: (locomotion, pendulums, swimmer, humanoid standup) 1000, which is also Brax's training default.
DEFAULT_EPISODE_LENGTH: Mapping[str, int] = {
    name: {"reacher": 50, "pusher": 100}.get(name, 1000) for name in BRAX_ENV_NAMES
}

#: The environments that end an episode on a fall (a torso height or pitch out of its range).
FALLING_ENV_NAMES: tuple[str, ...] = ("ant", "hopper", "humanoid", "walker2d")

#: Backend used when none is given, chosen by measurement (docs/brax_backends.md).
DEFAULT_BACKEND: Mapping[str, str] = {
    # Measured on CPU (batch 8, 16 steps, 3 seeds; docs/brax_backends.md). All non-MJX
    # backends gave finite gradients; spring was the fastest with gradient norms no larger
    # than generalized's, except on halfcheetah, where spring's exploded (~4e4 vs ~20).
    "inverted_pendulum": "spring",
    "inverted_double_pendulum": "spring",
    "reacher": "spring",
    "hopper": "spring",
    "halfcheetah": "generalized",
    "ant": "spring",  # generalized's gradient norm was ~2e5, spring's ~1e2
    "walker2d": "spring",
    # Brax only models swimmer in the generalized backend.
    "swimmer": "generalized",
    # Not measured in the time available on CPU: spring, by extension from the envs above.
    "pusher": "spring",
    "humanoid": "spring",
    "humanoidstandup": "spring",
}


def check_solver_setting(backend: str, settings: Mapping[str, Any]) -> None:
    """``solver_iterations`` is a setting of ``backend="mjx"`` only, an int >= 1."""
    if "solver_iterations" not in settings:
        return
    if backend != "mjx":
        raise SettingError(f"solver_iterations={settings['solver_iterations']!r} applies to "
                           f"backend='mjx' only (MuJoCo's constraint solver), not "
                           f"backend={backend!r}")
    mjx.check_solver_iterations(settings["solver_iterations"])


def check_brax_name_and_backend(name: str, backend: str | None) -> str:
    """Validate ``name``/``backend`` without building anything; returns the backend to use.

    Raises ``SettingError`` naming the setting, the bad value and the allowed values.
    """
    if name not in BRAX_ENV_NAMES:
        raise SettingError(f"name={name!r} is not a Brax environment; allowed: {BRAX_ENV_NAMES}")
    if backend is None:
        return DEFAULT_BACKEND[name]
    if backend not in BACKENDS:
        raise SettingError(f"backend={backend!r} is not a Brax backend; allowed: {BACKENDS}")
    if backend not in SUPPORTED_BACKENDS[name]:
        raise SettingError(
            f"backend={backend!r} is not available for Brax env {name!r}; "
            f"allowed: {SUPPORTED_BACKENDS[name]}"
        )
    return backend


def _converted(state: Any, state_class: type) -> Any:
    """``state`` (Brax's ``State`` or ``diffpg.envs.State``: the same fields) as a ``state_class``."""
    return state_class(pipeline_state=state.pipeline_state, obs=state.obs, reward=state.reward,
                       done=state.done, metrics=state.metrics, info=state.info)


class BraxEnvironment(Environment):
    """One raw Brax environment (no time limit, no auto-reset), single instance.

    Args:
        name: one of ``BRAX_ENV_NAMES``.
        backend: one of ``BACKENDS`` (``None``: ``DEFAULT_BACKEND[name]``).
        solver_iterations: ``backend="mjx"`` only: MuJoCo's constraint-solver iterations per
            physics step (``None``: 1, differentiable; see ``diffpg.envs.mjx``).
        **kwargs: passed to the Brax environment's constructor (e.g. ``ctrl_cost_weight``).

    ``reset(key) -> State`` and ``step(state, action [action_size]) -> State`` are Brax's own,
    their states converted to ``diffpg.envs.State`` (the same fields); ``State.obs`` has shape
    ``[observation_size]``, ``reward`` and ``done`` are scalars.
    """

    def __init__(self, name: str, backend: str | None = None,
                 solver_iterations: int | None = None, **kwargs: Any):
        self.name = name
        self.backend = check_brax_name_and_backend(name, backend)
        if solver_iterations is not None:
            check_solver_setting(self.backend, {"solver_iterations": solver_iterations})
        # Imported here so that importing ``diffpg.envs`` does not pay for Brax/MuJoCo.
        brax_envs = import_brax_envs()
        self._brax_state = brax_envs.State

        with warnings.catch_warnings():
            # Brax notes on every env it builds that its own physics pipelines are no longer
            # developed (MJX is); the README says so once, the warning is not repeated here.
            warnings.filterwarnings("ignore", message="Brax System, piplines and environments")
            self._brax_env = brax_envs.get_environment(name, backend=self.backend, **kwargs)
        self.default_episode_length = DEFAULT_EPISODE_LENGTH[name]
        #: The model's gravitational acceleration, m/s^2 (positive), read once from the concrete
        #: model (inside a compiled step its arrays are traced).
        self.gravity = abs(float(np.asarray(self._brax_env.sys.gravity)[2]))
        self._step = self._brax_env.step
        if self.backend == "mjx":
            #: The model's own solver iterations, before diffpg set ``solver_iterations``.
            self.native_solver_iterations = mjx.solver_iterations(self._brax_env.sys)
            iterations = solver_iterations or mjx.DIFFERENTIABLE_SOLVER_ITERATIONS
            self._brax_env.sys = mjx.with_solver_iterations(self._brax_env.sys, iterations)
            if iterations != mjx.DIFFERENTIABLE_SOLVER_ITERATIONS:
                self._step = mjx.guard_gradient(self._brax_env.step, repr(self), iterations)

    def reset(self, key: jax.Array) -> State:
        """Start an episode (Brax randomizes the initial pose from ``key``)."""
        return _converted(self._brax_env.reset(key), State)

    def step(self, state: State, action: jax.Array) -> State:
        """One Brax step (``n_frames`` physics substeps) with ``action [action_size]``."""
        return _converted(self._step(_converted(state, self._brax_state), action), State)

    @functools.cached_property
    def observation_size(self) -> int:
        # Brax's own property runs an eager reset; an abstract trace costs no compile.
        state_shape = jax.eval_shape(lambda: self._brax_env.reset(jax.random.PRNGKey(0)))
        return int(state_shape.obs.shape[-1])

    @property
    def action_size(self) -> int:
        return int(self._brax_env.action_size)

    @property
    def dt(self) -> float:
        """Seconds of simulated time per ``step``."""
        return float(self._brax_env.dt)

    @property
    def brax_env(self) -> Any:
        """The underlying ``brax.envs.base.PipelineEnv``."""
        return self._brax_env

    def as_brax_env(self) -> Any:
        """This environment as a ``brax.envs.Env``, for Brax's own trainers: Brax's own."""
        return self._brax_env

    @property
    def ends_on_a_fall(self) -> bool:
        """Whether the env ends an episode when its torso leaves a healthy range (Brax's
        ``terminate_when_unhealthy`` envs with a ``healthy_z_range``)."""
        return (hasattr(self._brax_env, "_healthy_z_range")
                and bool(getattr(self._brax_env, "_terminate_when_unhealthy", False)))

    def health_margins(self, state: State, anticipate_jumps: bool = False,
                       anticipate_landings: bool = False) -> jax.Array:
        """How far ``state`` is inside each finite bound of the env's healthy ranges ``[k]``
        (positive: healthy; 0 on the boundary): the torso's height above its minimum (and below
        its maximum, where finite), in metres, and for the planar walkers (hopper, walker2d) its
        pitch inside its range, in radians. The quantities and ranges are the ones Brax's
        ``step`` tests to end the episode.

        ``anticipate_jumps=True`` measures the margin below the maximum height at the torso's
        ballistic apex, ``z + max(v_z, 0)^2 / (2 g)`` (``v_z`` its vertical velocity, ``g``
        the model's gravity), where a jump started now will take it: a jump out of the range
        is then seen at take-off rather than at the top of its flight.

        ``anticipate_landings=True`` measures the margin above the minimum height where the
        torso will be when the lowest body touches the ground, the posture held: ``z -
        max(min_i z_i, 0)`` over the bodies' origins (on the ground the same as ``z``): a
        landing in a crouch too deep for the healthy range is then seen in flight, from the
        moment the leg folds, rather than as the torso passes the minimum."""
        brax_env, pipeline_state = self._brax_env, state.pipeline_state
        height = pipeline_state.x.pos[0, 2]
        bottom = height
        if anticipate_landings:
            bottom = height - jax.nn.relu(jax.numpy.min(pipeline_state.x.pos[:, 2]))
        top = height
        if anticipate_jumps:
            rising = jax.nn.relu(pipeline_state.xd.vel[0, 2])
            top = height + rising**2 / (2.0 * self.gravity)
        margin = {  # by bound name; a bound the env does not have is never evaluated
            "height_low": lambda: bottom - brax_env._healthy_z_range[0],
            "height_high": lambda: brax_env._healthy_z_range[1] - top,
            "pitch_low": lambda: pipeline_state.q[2] - brax_env._healthy_angle_range[0],
            "pitch_high": lambda: brax_env._healthy_angle_range[1] - pipeline_state.q[2],
        }
        return jax.numpy.stack([margin[name]() for name in self.health_bound_names()])

    def health_bound_names(self) -> tuple[str, ...]:
        """The bounds ``health_margins`` measures, in its order: ``height_low`` (a sink),
        ``height_high`` (a jump, where the range is bounded above), and for the planar walkers
        ``pitch_low`` (leaning back) and ``pitch_high`` (leaning forward)."""
        if not self.ends_on_a_fall:
            raise SettingError(f"env {self.name!r} does not end on a fall; health margins exist "
                               f"for {list(FALLING_ENV_NAMES)}")
        names = ["height_low"]
        if self._brax_env._healthy_z_range[1] != float("inf"):
            names.append("height_high")
        if hasattr(self._brax_env, "_healthy_angle_range"):
            names += ["pitch_low", "pitch_high"]
        return tuple(names)

    def body_segments(self, state: State) -> jax.Array:
        """``[..., links, 2, 3]`` (a state of any batch shape ``...``): each link's frame origin
        and the far end of a uniform rod through its centre of mass (origin + 2 R com_offset),
        for drawing the body."""
        from brax import math

        pipeline = state.pipeline_state
        rotation = pipeline.x.rot  # [..., links, 4]
        offset = jax.numpy.broadcast_to(self._brax_env.sys.link.inertia.transform.pos,
                                        rotation.shape[:-1] + (3,))
        far_end = pipeline.x.pos + 2.0 * jax.vmap(math.rotate)(
            offset.reshape(-1, 3), rotation.reshape(-1, 4)).reshape(pipeline.x.pos.shape)
        return jax.numpy.stack([pipeline.x.pos, far_end], axis=-2)

    @property
    def link_parents(self) -> tuple[int, ...]:
        """Each link's parent link (-1: the world)."""
        return tuple(int(p) for p in self._brax_env.sys.link_parents)

    def frame_drawer(self, positions):
        """The bodies from the side (``diffpg.envs.drawing.side_view``; ``positions``: the
        episode's ``body_segments``)."""
        from diffpg.envs import drawing

        return drawing.side_view(positions, self.link_parents)

    def __repr__(self) -> str:
        return f"BraxEnvironment({self.name!r}, backend={self.backend!r})"
