"""MuJoCo Playground's environments behind the ``diffpg.envs.core.Environment`` contract.

``diffpg.envs.make("playground:CheetahRun")`` builds Playground's ``registry.load("CheetahRun")`` with
MJX's JAX implementation (``impl="jax"``; Playground's default, Warp, is not differentiable by
JAX) and one constraint-solver iteration (``diffpg.envs.mjx``: MJX's step is then differentiable), and
adapts its ``State`` (``data``, ``obs``, ``reward``, ``done``, ``metrics``, ``info``) to Brax's
(``pipeline_state`` = Playground's ``data``). Like every raw env it adds no time limit:
``diffpg.envs.make`` wraps it in ``TimeLimitAutoReset`` with Playground's own ``episode_length``.

Installed with the ``playground`` extra (``pip install -e ".[playground]"``). The DM Control
suite tasks (``CheetahRun``, ``HopperHop``, ``WalkerWalk``, ...) ship their models inside the
package. Playground's robots (locomotion and manipulation) load their meshes from the MuJoCo
Menagerie, which Playground clones from GitHub on first use: without it, ``make`` stops with one
line saying where to put it, before Playground tries the network.

**One change to Playground's rewards, values unchanged.** Its DM Control rewards are built from
``reward.tolerance`` (a port of dm_control's), which computes the out-of-bounds sigmoid
everywhere and masks it inside the bounds with ``jnp.where``. Inside the bounds, when a bound is
infinite (``WalkerWalk``'s torso height >= 1.2), that sigmoid is evaluated at infinity: its value
is masked, but its gradient is NaN, and the mask multiplies it by 0, giving NaN. Every gradient of
such a reward was NaN (``docs/mjx_playground.md``). diffpg replaces ``reward.tolerance`` by
``finite_gradient_tolerance(reward.tolerance)``: the same values, with Playground's own function
evaluated only where it is finite.

A Playground observation that is a dict (the robots' ``state``/``privileged_state``) is read
from its ``"state"`` entry; the DM Control suite's are vectors.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import math
from collections.abc import Callable
from typing import Any

import jax
from diffpg.envs import mjx
from diffpg.envs.core import Environment, SettingError, State

__all__ = ["EXTRA", "PREFIX", "PlaygroundEnvironment", "check_name", "check_settings",
           "default_episode_length", "installed", "setting_names", "task_names"]

#: How Playground env names are spelled in ``diffpg.envs.make``: ``"playground:" + Playground's name``.
PREFIX = "playground:"

#: The install command that provides MuJoCo Playground.
EXTRA = 'pip install -e ".[playground]"'


def installed() -> bool:
    """Whether MuJoCo Playground (module ``mujoco_playground``) can be imported."""
    return importlib.util.find_spec("mujoco_playground") is not None


def finite_gradient_tolerance(tolerance: Callable) -> Callable:
    """Playground's ``reward.tolerance(x, bounds, margin, sigmoid, value_at_margin)`` (1 inside
    ``bounds``, a sigmoid of the distance in units of ``margin`` outside) with the same values
    and a finite gradient: inside the bounds the original is called at a point one margin
    outside (where its value is finite and unused), and 1 is returned there."""

    @functools.wraps(tolerance)
    def finite(x, bounds=(0.0, 0.0), margin=0.0, sigmoid="gaussian", value_at_margin=0.1):
        lower, upper = bounds
        if margin <= 0 or lower > upper:  # no sigmoid, or the original's own error
            return tolerance(x, bounds, margin, sigmoid, value_at_margin)
        in_bounds = (lower <= x) & (x <= upper)
        if math.isinf(lower) and math.isinf(upper):
            return jax.numpy.ones_like(x * 1.0)
        outside = lower - margin if math.isfinite(lower) else upper + margin
        value = tolerance(jax.numpy.where(in_bounds, outside, x), bounds, margin, sigmoid,
                          value_at_margin)
        return jax.numpy.where(in_bounds, 1.0, value)

    return finite


@functools.cache
def _playground() -> Any:
    """The ``mujoco_playground`` module, imported without its import-time console output, its
    ``reward.tolerance`` replaced by ``finite_gradient_tolerance`` (module docstring)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import mujoco_playground
        from mujoco_playground._src import reward  # the rewards' module, used by attribute
    reward.tolerance = finite_gradient_tolerance(reward.tolerance)
    return mujoco_playground


def task_names() -> tuple[str, ...]:
    """Every Playground env as ``diffpg.envs.make`` spells it (empty when Playground is not
    installed)."""
    if not installed():
        return ()
    return tuple(PREFIX + name for name in _playground().registry.ALL_ENVS)


def _needs_menagerie(task: str) -> bool:
    playground = _playground()
    return task in playground.locomotion.ALL_ENVS or task in playground.manipulation.ALL_ENVS


def _menagerie_path() -> Any:
    from mujoco_playground._src import mjx_env  # where Playground looks for the Menagerie

    return mjx_env.MENAGERIE_PATH


def check_name(name: str) -> str:
    """Playground's task name for ``name`` (``"playground:TASK"``), or a one-line
    ``SettingError``: Playground not installed, an unknown task, or a robot whose Menagerie
    assets are missing."""
    task = name.removeprefix(PREFIX)
    if not installed():
        raise SettingError(f"env {name!r} needs MuJoCo Playground: {EXTRA}")
    if name not in task_names():
        raise SettingError(f"env {name!r} is not a Playground environment; allowed: "
                           f"{list(task_names())}")
    if _needs_menagerie(task) and not _menagerie_path().exists():
        path = _menagerie_path()
        raise SettingError(
            f"env {name!r} loads its robot from the MuJoCo Menagerie, not found at {path}; "
            f"on a machine with internet: git clone https://github.com/google-deepmind/"
            f"mujoco_menagerie {path}")
    return task


def _default_config(task: str) -> Any:
    return _playground().registry.get_default_config(task)


def check_settings(name: str, settings: dict[str, Any]) -> str:
    """Playground's task name for ``name``, or a one-line ``SettingError`` naming the setting:
    the name (``check_name``), ``solver_iterations``, a key that is not in the task's config,
    or an ``impl`` other than ``"jax"``. Cheap: reads the task's config, builds no model."""
    task = check_name(name)
    if "solver_iterations" in settings:
        mjx.check_solver_iterations(settings["solver_iterations"])
    allowed = setting_names(name)
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise SettingError(f"env {name!r} has no setting(s) {unknown}; allowed settings: "
                           f"{list(allowed)}")
    if settings.get("impl", "jax") != "jax":
        raise SettingError(f"impl={settings['impl']!r}: diffpg runs Playground on MJX's JAX "
                           f"implementation only; allowed: 'jax'")
    return task


def setting_names(name: str) -> tuple[str, ...]:
    """The settings of env ``name``: the keys of its task's config and ``solver_iterations``
    (reads the config, builds no model)."""
    return (*sorted(_default_config(check_name(name)).keys()), "solver_iterations")


def default_episode_length(name: str) -> int:
    """The episode length of Playground's config for ``name`` (nothing is built)."""
    return int(_default_config(check_name(name)).episode_length)


class PlaygroundEnvironment(Environment):
    """One raw MuJoCo Playground environment (no time limit, no auto-reset), single instance.

    Args:
        name: ``"playground:" + task`` (``task_names()``).
        solver_iterations: MJX constraint-solver iterations per physics step (1, the default:
            differentiable; more: differentiating the step raises, see ``diffpg.envs.mjx``).
        **config_overrides: entries of Playground's config for this task
            (``registry.get_default_config(task)``), e.g. ``episode_length=500``.

    ``reset(key) -> State``, ``step(state, action [action_size]) -> State``, Brax's ``State``
    with ``obs [observation_size]``, scalar ``reward`` and ``done`` (Playground's termination).
    """

    def __init__(self, name: str, solver_iterations: int = mjx.DIFFERENTIABLE_SOLVER_ITERATIONS,
                 **config_overrides: Any):
        self.name = name
        task = check_settings(name, config_overrides | {"solver_iterations": solver_iterations})
        with contextlib.redirect_stdout(io.StringIO()):  # MuJoCo's model-compiler notes
            self._env = _playground().registry.load(
                task, config_overrides=config_overrides | {"impl": "jax"})
        #: The model's own solver iterations, before diffpg set ``solver_iterations``.
        self.native_solver_iterations = mjx.solver_iterations(self._env.mjx_model)
        self._env._mjx_model = mjx.with_solver_iterations(self._env.mjx_model, solver_iterations)
        if mjx.solver_iterations(self._env.mjx_model) != solver_iterations:
            raise SettingError(f"env {name!r}: solver_iterations={solver_iterations} could not be set "
                               f"on this Playground environment's model")
        self.default_episode_length = int(self._env._config.episode_length)
        self._step = self._playground_step
        if solver_iterations != mjx.DIFFERENTIABLE_SOLVER_ITERATIONS:
            self._step = mjx.guard_gradient(self._playground_step, repr(self), solver_iterations)

    @staticmethod
    def _to_brax(state: Any) -> State:
        obs = state.obs["state"] if isinstance(state.obs, dict) else state.obs
        return State(pipeline_state=state.data, obs=obs, reward=state.reward, done=state.done,
                     metrics=dict(state.metrics), info=dict(state.info))

    def _playground_step(self, state: State, action: jax.Array) -> State:
        playground_state = _playground().State(
            data=state.pipeline_state, obs=state.obs, reward=state.reward, done=state.done,
            metrics=state.metrics, info=state.info)
        return self._to_brax(self._env.step(playground_state, action))

    def reset(self, key: jax.Array) -> State:
        """Start an episode (Playground randomizes the initial pose from ``key``)."""
        return self._to_brax(self._env.reset(key))

    def step(self, state: State, action: jax.Array) -> State:
        """One control step (``ctrl_dt`` seconds: Playground's physics substeps)."""
        return self._step(state, action)

    @functools.cached_property
    def observation_size(self) -> int:
        state_shape = jax.eval_shape(lambda: self.reset(jax.random.PRNGKey(0)))
        return int(state_shape.obs.shape[-1])

    @property
    def action_size(self) -> int:
        return int(self._env.action_size)

    @property
    def dt(self) -> float:
        """Seconds of simulated time per ``step``."""
        return float(self._env.dt)

    @property
    def playground_env(self) -> Any:
        """The underlying ``mujoco_playground.MjxEnv``."""
        return self._env

    def body_segments(self, state: State) -> jax.Array:
        """``[..., bodies, 2, 3]`` (a state of any batch shape ``...``): each body's frame
        origin and the far end of a uniform rod through its centre of mass (MJX's ``xpos`` and
        ``xipos``), for drawing the body."""
        data = state.pipeline_state
        origin, centre = data.xpos[..., 1:, :], data.xipos[..., 1:, :]  # body 0: the world
        return jax.numpy.stack([origin, 2.0 * centre - origin], axis=-2)

    @property
    def link_parents(self) -> tuple[int, ...]:
        """Each body's parent body (-1: the world)."""
        return tuple(int(p) - 1 for p in self._env.mj_model.body_parentid[1:])

    @functools.cache  # noqa: B019 - one adapter per environment, which lives as long
    def as_brax_env(self) -> Any:
        """This environment as a ``brax.envs.Env``, for Brax's own trainers."""
        from brax.envs.base import Env

        outer = self

        class _AsBraxEnv(Env):
            def reset(self, rng):
                return outer.reset(rng)

            def step(self, state, action):
                return outer.step(state, action)

            observation_size = property(lambda self: outer.observation_size)
            action_size = property(lambda self: outer.action_size)
            backend = property(lambda self: "mjx")

        return _AsBraxEnv()

    def frame_drawer(self, positions):
        """The bodies from the side (``diffpg.envs.drawing.side_view``; ``positions``: the
        episode's ``body_segments``)."""
        from diffpg.envs import drawing

        return drawing.side_view(positions, self.link_parents)

    def __repr__(self) -> str:
        return f"PlaygroundEnvironment({self.name!r})"
