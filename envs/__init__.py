"""Environment registry: ``diffpg.envs.make(name)`` builds any environment of this package.

* Analytic environments (``diffpg.envs.analytic``, pure JAX, differentiable in closed form):
  ``"lqr"``, ``"pendulum"``, ``"cartpole_swingup"``, ``"contact"``, ``"double_pendulum"``,
  ``"curling"``.
* Brax environments (``diffpg.envs.brax_envs``): ``"ant"``, ``"halfcheetah"``, ``"hopper"``, ...,
  each with a physics ``backend`` (default: ``diffpg.envs.brax_envs.DEFAULT_BACKEND[name]``);
  ``backend="mjx"`` is differentiable (``diffpg.envs.mjx``).
* MuJoCo Playground environments (``diffpg.envs.playground``, the ``playground`` extra):
  ``"playground:CheetahRun"``, ``"playground:HopperHop"``, ... on MJX, differentiable.
* A user's: ``register(name, EnvClass)`` (one file; ``diffpg --import MODULE`` brings it to
  every command).

What an env offers it declares on its class (``setting_names``, ``has_exact_return``, its
``frame_drawer``), so that no command names an env.

Every environment comes back wrapped in ``TimeLimitAutoReset`` (single instance; ``vmap`` to
batch). All arguments are checked before anything is built or compiled.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from diffpg.envs import playground
from diffpg.envs.brax_envs import (
    BACKENDS,
    BRAX_ENV_NAMES,
    DEFAULT_EPISODE_LENGTH,
    FALLING_ENV_NAMES,
    BraxEnvironment,
    check_brax_name_and_backend,
    check_solver_setting,
)
from diffpg.envs.core import Environment, SettingError, State, import_brax_envs
from diffpg.envs.wrappers import (
    HEALTH_TOLERANCE,
    HealthShaping,
    SoftTermination,
    StateGradientClip,
    TimeLimitAutoReset,
    check_episode_length,
)


def _mujoco_warning(message: str) -> None:
    """MuJoCo's warnings go to the "mujoco" logger instead of the console and a MUJOCO_LOG.TXT
    in the working directory: its model compiler's deprecation notes (e.g. on Brax's halfcheetah
    file, which diffpg uses unchanged) at debug level, anything else (e.g. a simulation
    instability) as a warning, which Python prints when logging is not configured."""
    level = logging.DEBUG if "deprecated" in message else logging.WARNING
    logging.getLogger("mujoco").log(level, message)


def route_mujoco_warnings() -> None:
    """Send MuJoCo's warnings to the ``mujoco`` logger (process-wide; ``diffpg.setup()`` calls
    it): without it MuJoCo prints them and appends them to a ``MUJOCO_LOG.TXT`` in the working
    directory."""
    import mujoco  # MuJoCo alone (0.2 s), not its MJX

    mujoco.set_mju_user_warning(_mujoco_warning)

__all__ = [
    "ANALYTIC_ENV_CLASSES",
    "BACKENDS",
    "BRAX_ENV_NAMES",
    "Environment",
    "FALLING_ENV_NAMES",
    "HEALTH_TOLERANCE",
    "HealthShaping",
    "SoftTermination",
    "State",
    "StateGradientClip",
    "TimeLimitAutoReset",
    "check",
    "check_name",
    "DEFAULT_ENV",
    "default_episode_length",
    "has_exact_return",
    "make",
    "route_mujoco_warnings",
    "make_raw",
    "names",
    "names_in_brief",
    "names_without_simulator",
    "register",
    "setting_names",
    "unregister",
]

#: Analytic env name -> class name in ``diffpg.envs.analytic`` (imported when first made).
ANALYTIC_ENV_CLASSES: dict[str, str] = {
    "lqr": "LinearQuadratic",
    "pendulum": "PendulumSwingUp",
    "cartpole_swingup": "CartPoleSwingUp",
    "contact": "WallContact",
    "double_pendulum": "DoublePendulum",
    "curling": "Curling",
}


class EnvFamily(NamedTuple):
    """One kind of environment ``make`` builds. Each function takes the env's name; ``FAMILIES``
    is the table every function of this module loops over."""

    names: Callable[[], tuple[str, ...]]
    """The names it builds (those ``names()`` lists)."""
    owns: Callable[[str], bool]
    """Whether a name is this family's (a Playground name even when not installed)."""
    check_settings: Callable[[str, str | None, dict[str, Any]], None]
    """``(name, backend, settings)``: a ``SettingError`` naming what is wrong, cheaply."""
    make: Callable[[str, str | None, dict[str, Any]], Environment]
    """``(name, backend, settings) -> raw env`` (termination only, no time limit)."""
    default_episode_length: Callable[[str], int]
    setting_names: Callable[[str], tuple[str, ...]]
    """The constructor settings ``make(name, **settings)`` accepts (nothing is built)."""
    env_class: Callable[[str], type[Environment]]
    """The class ``make`` builds, whose attributes declare what the env offers."""
    check_name: Callable[[str], Any] = lambda name: None
    """Refuses a name it owns but cannot build (Playground: not installed, assets missing)."""


def _no_backend(name: str, backend: str | None) -> None:
    if backend is not None:
        raise SettingError(
            f"backend={backend!r} given for environment {name!r}; backend is only for Brax "
            f"environments {BRAX_ENV_NAMES} (allowed backends: {BACKENDS})")


def _analytic_class(name: str) -> type:
    from diffpg.envs import analytic  # lazy: the analytic module is optional at import time

    return getattr(analytic, ANALYTIC_ENV_CLASSES[name])


def _constructor_settings(env_class: Callable) -> tuple[str, ...]:
    """The keyword settings of an env's constructor."""
    return tuple(p for p in inspect.signature(env_class).parameters
                 if p not in ("self", "kwargs", "backend"))


def _check_setting_names(name: str, settings: dict[str, Any]) -> None:
    allowed = list(setting_names(name))
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise SettingError(f"env {name!r} has no setting(s) {unknown}; allowed settings: "
                           f"{allowed}")


def _make_from_class(env_class: type[Environment], name: str, backend: str | None,
                     settings: dict[str, Any]) -> Environment:
    """``env_class(**settings)`` after checking the names (a class's own checks its values)."""
    _no_backend(name, backend)
    _check_setting_names(name, settings)
    return env_class(**settings)


def _make_analytic(name: str, backend: str | None, settings: dict[str, Any]) -> Environment:
    return _make_from_class(_analytic_class(name), name, backend, settings)


def _brax_setting_names(name: str) -> tuple[str, ...]:
    return _constructor_settings(import_brax_envs()._envs[name]) + ("solver_iterations",)


def _check_brax(name: str, backend: str | None, settings: dict[str, Any]) -> None:
    check_solver_setting(check_brax_name_and_backend(name, backend), settings)
    _check_setting_names(name, settings)
    _check_brax_values(name, settings)


def _check_brax_values(name: str, settings: dict[str, Any]) -> None:
    """Each Brax constructor setting holds the kind of its default: Brax checks none (a word
    such as ``terminate_when_unhealthy=maybe`` reads as true; ``ctrl_cost_weight=abc`` fails
    deep inside its first step)."""
    parameters = inspect.signature(import_brax_envs()._envs[name]).parameters
    for setting, value in settings.items():
        default = parameters[setting].default if setting in parameters else None
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise SettingError(f"{setting}={value!r} must be true or false (env {name!r})")
        elif isinstance(default, int | float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SettingError(f"{setting}={value!r} must be a number (env {name!r}; its "
                                   f"default: {default!r})")
        elif isinstance(default, tuple) and not (isinstance(value, tuple) and all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in value)):
            raise SettingError(f"{setting}={value!r} must be a tuple of numbers like its "
                               f"default {default!r} (env {name!r})")


def _check_playground(name: str, backend: str | None, settings: dict[str, Any]) -> None:
    _no_backend(name, backend)
    playground.check_settings(name, settings)


def _make_playground(name: str, backend: str | None, settings: dict[str, Any]) -> Environment:
    _no_backend(name, backend)
    return playground.PlaygroundEnvironment(name, **settings)


_REGISTERED: dict[str, type[Environment]] = {}
"""Environments registered with ``register``: name -> class."""


def _make_registered(name: str, backend: str | None, settings: dict[str, Any]) -> Environment:
    return _make_from_class(_REGISTERED[name], name, backend, settings)


FAMILIES: tuple[EnvFamily, ...] = (
    EnvFamily(  # analytic: costs nothing to build, so building it is its check
        names=lambda: tuple(ANALYTIC_ENV_CLASSES),
        owns=lambda name: name in ANALYTIC_ENV_CLASSES,
        check_settings=_make_analytic,
        make=_make_analytic,
        default_episode_length=lambda name: int(_analytic_class(name).default_episode_length),
        setting_names=lambda name: _constructor_settings(_analytic_class(name)),
        env_class=_analytic_class),
    EnvFamily(  # Brax, on a physics backend
        names=lambda: BRAX_ENV_NAMES,
        owns=lambda name: name in BRAX_ENV_NAMES,
        check_settings=_check_brax,
        make=lambda name, backend, settings: BraxEnvironment(
            name, backend=check_brax_name_and_backend(name, backend), **settings),
        default_episode_length=lambda name: DEFAULT_EPISODE_LENGTH[name],
        setting_names=_brax_setting_names,
        env_class=lambda name: BraxEnvironment),
    EnvFamily(  # MuJoCo Playground ("playground:TASK", the playground extra)
        names=playground.task_names,
        owns=lambda name: name.startswith(playground.PREFIX),
        check_settings=_check_playground,
        make=_make_playground,
        default_episode_length=playground.default_episode_length,
        setting_names=playground.setting_names,
        env_class=lambda name: playground.PlaygroundEnvironment,
        check_name=playground.check_name),
    EnvFamily(  # a user's, registered with ``register`` (e.g. ``diffpg --import MODULE``);
        # like an analytic env, building it (its constructor's checks) is its check
        names=lambda: tuple(_REGISTERED),
        owns=lambda name: name in _REGISTERED,
        check_settings=_make_registered,
        make=_make_registered,
        default_episode_length=lambda name: int(_REGISTERED[name].default_episode_length),
        setting_names=lambda name: _constructor_settings(_REGISTERED[name]),
        env_class=_REGISTERED.__getitem__),
)

DEFAULT_ENV = "lqr"
"""The env a comparison runs when none is named: the linear-quadratic regulator, whose
gradient is known exactly (``linear_gaussian_return``)."""


def register(name: str, env_class: type[Environment]) -> None:
    """Make ``make(name, **settings)`` build ``env_class(**settings)``, beside the built-in
    envs, for every command (``diffpg --import MODULE`` imports a module that calls this).

    ``env_class``: an ``Environment`` subclass whose constructor takes keyword settings,
    checks their values (raising ``SettingError``) and is cheap: ``check`` builds it, as it
    builds an analytic env, before anything compiles. Its class attributes declare what it
    offers: ``default_episode_length``, ``linear_gaussian_return`` (an exact reference for
    ``diffpg compare``), ``frame_drawer`` (``diffpg video``); a ``stiffness`` setting makes
    ``diffpg compare --sweep stiffness`` apply.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise SettingError(f"env name {name!r} must be a Python identifier (letters, digits, _)")
    if name in names():
        raise SettingError(f"env={name!r} exists already; allowed: a new name")
    if not (isinstance(env_class, type) and issubclass(env_class, Environment)):
        raise SettingError(f"env {name!r}: {env_class!r} is not a subclass of "
                           "diffpg.envs.Environment")
    _REGISTERED[name] = env_class


def unregister(name: str) -> None:
    """Remove an env added with ``register`` (built-in envs stay)."""
    if name not in _REGISTERED:
        raise SettingError(f"env={name!r} was not registered; registered: {list(_REGISTERED)}")
    del _REGISTERED[name]


def setting_names(name: str) -> tuple[str, ...]:
    """The constructor settings ``make(name, **settings)`` accepts (nothing is built)."""
    return _family(name).setting_names(name)


def has_exact_return(name: str) -> bool:
    """Whether env ``name`` knows the exact expected return of a linear-Gaussian policy
    (``Environment.linear_gaussian_return``; nothing is built)."""
    return _family(name).env_class(name).linear_gaussian_return is not None


def names() -> tuple[str, ...]:
    """Every environment name ``make`` accepts: the analytic ones, Brax's, then Playground's
    (``"playground:TASK"``, when the ``playground`` extra is installed)."""
    return tuple(name for family in FAMILIES for name in family.names())


def names_in_brief() -> tuple[str, ...]:
    """``names()`` without importing a simulator, Playground's tasks as one
    ``"playground:TASK"`` (an option's help, read whenever a command line is: importing
    Playground takes seconds; ``diffpg --help`` lists its tasks)."""
    return (*ANALYTIC_ENV_CLASSES, *BRAX_ENV_NAMES,
            *([playground.PREFIX + "TASK"] if playground.installed() else []), *_REGISTERED)


def _family(name: str) -> EnvFamily:
    """The family that builds ``name``; a ``SettingError`` naming ``env`` if none does."""
    for family in FAMILIES if isinstance(name, str) else ():
        if family.owns(name):
            family.check_name(name)
            return family
    raise SettingError(f"env={name!r} is not known; allowed values: {list(names())}")


def names_without_simulator() -> tuple[str, ...]:
    """The envs described without importing a simulator (the analytic and registered ones):
    those an error message can search for a capability (``setting_names``,
    ``has_exact_return``) in milliseconds."""
    return (*ANALYTIC_ENV_CLASSES, *_REGISTERED)


def check_name(name: str) -> None:
    """``SettingError`` naming ``env`` unless ``make`` knows ``name`` (for a Playground name: also
    when Playground is not installed or a robot's assets are missing, saying what to do)."""
    _family(name)


def check(name: str, episode_length: int | None = None, backend: str | None = None,
          health_shaping: float = 0.0, anticipate_jumps: bool = False,
          health_tolerance: float = HEALTH_TOLERANCE, soft_termination: float = 0.0,
          anticipate_landings: bool = False, state_gradient_clip: float = 0.0,
          **settings: Any) -> None:
    """Validate what ``make`` would be given, without building a Brax system (cheap): the name,
    episode length, backend, health shaping, soft termination and the state gradient clip
    (numbers >= 0; the first two above 0 only for ``FALLING_ENV_NAMES``), and the names of the
    constructor settings (an analytic env, which costs nothing to build, also checks their
    values). Raises ``SettingError`` naming the setting."""
    family = _family(name)
    if episode_length is not None:
        check_episode_length(episode_length)
    for setting, value in (("health_shaping", health_shaping),
                           ("soft_termination", soft_termination)):
        _check_number_at_least_zero(setting, value)
        if value and name not in FALLING_ENV_NAMES:
            raise SettingError(f"{setting}={value!r} needs an env that ends on a fall; "
                               f"allowed envs: {list(FALLING_ENV_NAMES)}")
    _check_shaping_options(health_shaping, anticipate_jumps, health_tolerance,
                           anticipate_landings)
    _check_number_at_least_zero("state_gradient_clip", state_gradient_clip)
    family.check_settings(name, backend, settings)


def _check_number_at_least_zero(setting: str, value: Any) -> None:
    """A training device's weight or width: a finite number >= 0 (0: off)."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise SettingError(f"{setting}={value!r} must be a number >= 0 (0: off)")


def _check_shaping_options(health_shaping: float, anticipate_jumps: bool,
                           health_tolerance: float, anticipate_landings: bool = False) -> None:
    """``anticipate_jumps``, ``anticipate_landings`` and ``health_tolerance`` change
    ``health_shaping``'s warning."""
    for name, value in (("anticipate_jumps", anticipate_jumps),
                        ("anticipate_landings", anticipate_landings)):
        if not isinstance(value, bool):
            raise SettingError(f"{name}={value!r} must be True or False")
    if not (isinstance(health_tolerance, int | float) and math.isfinite(health_tolerance)
            and health_tolerance > 0):
        raise SettingError(f"health_tolerance={health_tolerance!r} must be a positive number")
    for name, value, default in (("anticipate_jumps", anticipate_jumps, False),
                                 ("anticipate_landings", anticipate_landings, False),
                                 ("health_tolerance", health_tolerance, HEALTH_TOLERANCE)):
        if value != default and not health_shaping:
            raise SettingError(f"{name}={value!r} changes health_shaping's warning and needs "
                               "health_shaping > 0")


def default_episode_length(name: str) -> int:
    """The time limit ``make(name)`` uses when none is given (nothing is built)."""
    return _family(name).default_episode_length(name)


def make_raw(name: str, backend: str | None = None, **settings: Any) -> Environment:
    """The raw environment ``name`` (termination only, no time limit, no auto-reset).

    ``backend`` applies to Brax envs only; ``settings`` go to the env's constructor.
    """
    return _family(name).make(name, backend, settings)


def make(
    name: str, episode_length: int | None = None, backend: str | None = None,
    health_shaping: float = 0.0, anticipate_jumps: bool = False,
    health_tolerance: float = HEALTH_TOLERANCE, soft_termination: float = 0.0,
    anticipate_landings: bool = False, state_gradient_clip: float = 0.0, **settings: Any
) -> TimeLimitAutoReset:
    """Build environment ``name`` with a time limit and auto-reset.

    Args:
        name: one of ``names()``.
        episode_length: time limit in steps (>= 1); ``None``: the env's
            ``default_episode_length``.
        backend: Brax physics backend (one of ``BACKENDS``), Brax envs only; ``None``: the
            measured default for that env.
        health_shaping: above 0, the reward gains ``HealthShaping``'s differentiable warning of
            a fall with this weight (envs that end on a fall only; a training device).
        anticipate_jumps: the warning measures the margin below a maximum height at the
            torso's ballistic apex (``HealthShaping``); needs ``health_shaping``.
        health_tolerance: how far inside a healthy bound the warning starts (metres or
            radians; ``HealthShaping``'s ``tolerance``); needs ``health_shaping``.
        anticipate_landings: the warning measures the torso's height where it will land, the
            posture held (``HealthShaping``); needs ``health_shaping``.
        soft_termination: above 0, each step records a differentiable probability of going on,
            ``SoftTermination`` with this width (metres or radians; envs that end on a fall
            only; a training device for the pathwise estimators).
        state_gradient_clip: above 0, the gradient through each step is clipped to this norm
            per environment (``StateGradientClip``; a training device for the pathwise
            estimators).
        **settings: keyword arguments of the env's constructor.

    Returns:
        ``TimeLimitAutoReset`` around the raw env: ``reset(key)``, ``step(state, action)``.

    Raises:
        SettingError: unknown ``name``, ``backend`` for an analytic env or not a Brax backend,
            or ``episode_length`` <= 0; all raised before anything compiles.
    """
    if episode_length is not None:
        check_episode_length(episode_length)
    raw_env = make_raw(name, backend=backend, **settings)
    _check_shaping_options(health_shaping, anticipate_jumps, health_tolerance,
                           anticipate_landings)
    if health_shaping:
        raw_env = HealthShaping(raw_env, health_shaping, tolerance=health_tolerance,
                                anticipate_jumps=anticipate_jumps,
                                anticipate_landings=anticipate_landings)
    if soft_termination:
        raw_env = SoftTermination(raw_env, soft_termination)
    _check_number_at_least_zero("state_gradient_clip", state_gradient_clip)
    if state_gradient_clip:
        raw_env = StateGradientClip(raw_env, state_gradient_clip)
    if episode_length is None:
        episode_length = int(raw_env.default_episode_length)
    return TimeLimitAutoReset(raw_env, episode_length)
