"""One training loop for every estimator: ``theta <- theta + Adam(clip(grad J / horizon))``.

Each update asks the estimator for ``grad J`` on the batch of environments it carries (SHAC: one
window of ``horizon`` steps continuing from where the last one stopped, bootstrapped by its critic)
and applies the optimiser (by default SHAC's, REFERENCES: Adam with betas (0.7, 0.95), learning
rate decaying linearly to ``final_learning_rate``, global-norm clip 1.0 on the gradient of the
per-step objective ``J / horizon``, the scale of SHAC's actor loss). Then the estimator learns
from the batch (``update``: critics, replay) and the observation statistics take in its
observations. An estimator that can reuse a batch (``reuse``, PPO) may instead take ``epochs``
passes of ``minibatches`` optimiser steps on it.

A non-finite gradient never reaches the parameters: the update is skipped and counted
(``training/nonfinite_updates``), environments whose state blew up restart, and
``max_consecutive_nonfinite`` skipped updates in a row stop the run (``diffpg.runs``).

``updates_per_call`` updates run as one compiled ``lax.scan``; Python only runs between those
calls (evaluation, logging, checkpoints: ``diffpg.runs``). Everything is explicit state
(``TrainState``) and keys. ``seeds > 1`` vmaps whole runs over a leading seed axis;
``devices > 1`` splits the environment batch over devices (``diffpg.devices``).
This module does no file input or output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from diffpg import configs, envs, estimators
from diffpg.acting import Transitions, transition_bytes
from diffpg.acting import evaluate as evaluate_policy
from diffpg.devices import (
    available_memory_bytes,
    batch_sharding,
    check_device_split,
    check_devices_available,
    replicated,
    state_bytes,
)
from diffpg.envs.core import SettingError, State
from diffpg.estimators.base import (
    LARGEST_INT,
    EstimatorState,
    check_betas,
    check_bool_fields,
    check_hidden_sizes,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from diffpg.networks import check_activation
from diffpg.normalization import (
    RunningStatistics,
    init_statistics,
    normalize,
    update_statistics,
)
from diffpg.options import check_not_owned, check_seed, parse_options, seed_key
from diffpg.policy import Params, Policy, make_gaussian_mlp_policy
from diffpg.sampling import STATE_COPIES_WHILE_UPDATING
from diffpg.stats import (
    interquartile_mean,
    interquartile_mean_interval,
    mean_confidence_half_width,
)


def pathwise_estimators() -> list[str]:
    """The registered estimators that differentiate the return through the dynamics."""
    return [name for name in estimators.names()
            if estimators.registration(name).family == "pathwise"]


def estimator_choices():
    """The registered estimators' settings classes as one type: on the command line, each is a
    subcommand named after its estimator (``diffpg train ... shac --window 16``)."""
    return Union[tuple(  # noqa: UP007 (a Union built at run time)
        Annotated[estimators.registration(name).settings_class,
                  tyro.conf.subcommand(name, description=estimators.registration(name).description)]
        for name in estimators.names())]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every setting of a training run: the command line's, else the env's configuration, else the
    estimator's, else these defaults (diffpg.training.settings_for layers them)."""

    env: Annotated[str, tyro.conf.arg(
        help="Environment: " + ", ".join(envs.names_in_brief()) + ".")] = configs.DEFAULT_ENV
    env_options: tuple[str, ...] = ()
    """Environment constructor settings as key=value (e.g. velocity_cost=0.01 for pendulum)."""
    backend: str | None = None
    """Brax physics backend; None: the env's measured default."""
    episode_length: int | None = None
    """Time limit; None: the env's default."""
    health_shaping: float = 0.0
    """Above 0: training rollouts' reward gains a differentiable warning of a fall with this
    weight (envs.HealthShaping; envs that end on a fall); evaluation keeps the task's reward."""
    anticipate_jumps: bool = False
    """With health_shaping: warn of a jump out of the healthy height range at take-off, by
    measuring the margin at the torso's ballistic apex z + max(v_z, 0)^2 / 2g (the ant's falls
    are such jumps: BENCHMARKS.md section 2d)."""
    health_tolerance: float = envs.HEALTH_TOLERANCE
    """With health_shaping: how far inside a healthy bound its warning starts (m or rad)."""
    anticipate_landings: bool = False
    """With health_shaping: warn of a landing below the healthy height range in flight, by
    measuring the torso's height above the lowest body (where it lands, the posture held; the
    hopper's falls are such landings in a crouch: BENCHMARKS.md section 2)."""
    soft_termination: float = 0.0
    """Above 0: the pathwise estimators weight each training reward and bootstrapped value by
    the probability of still being alive, each step going on with probability
    prod_i sigmoid(margin_i / soft_termination) over the healthy margins (m or rad;
    envs.SoftTermination): a fall's expected cost with a gradient. Envs that end on a fall;
    evaluation keeps the task's episodes."""
    state_gradient_clip: float = 0.0
    """Above 0: the gradient through each step of the physics is clipped to this norm per
    environment, the cotangent reaching each state from the steps after it scaled to at most
    it (envs.StateGradientClip; values unchanged): bounds a gradient that grows with every
    stiff step (halfcheetah), at the price of a bias where it acts. Pathwise estimators."""
    estimator: Annotated[str, tyro.conf.Suppress] = configs.DEFAULT_ESTIMATOR
    """Estimator name (diffpg.estimators.names())."""
    estimator_settings: Annotated[Any, tyro.conf.arg(constructor_factory=estimator_choices)] = None
    """The estimator's settings object (its horizon is the steps per update); None: its
    defaults for training (diffpg.estimators.training_settings)."""
    num_envs: int = 64
    """Environments simulated in parallel."""
    updates: int = 500
    """Policy updates (batches) in the whole run."""
    updates_per_call: int = 25
    """Updates compiled into one scanned call; evaluation and logging happen between calls."""
    epochs: int = 1
    """Passes over each batch (above 1: the estimator must be able to reuse a batch, e.g. ppo)."""
    minibatches: int = 1
    """Optimiser steps per pass, each on a share of the batch's environments."""
    learning_rate: float = 2e-3
    """The actor's Adam learning rate at the first update (it decays linearly to
    final_learning_rate)."""
    final_learning_rate: float = 1e-5
    """Linear decay target of the actor's learning rate (equal to learning_rate: constant)."""
    betas: tuple[float, float] = (0.7, 0.95)
    """Adam's beta1 and beta2."""
    grad_clip: float | None = 1.0
    """Global-norm clip on the gradient of J / horizon; None: no clipping."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layers of the policy MLP."""
    activation: str = "elu"
    """Activation of the policy MLP's hidden layers (elu, relu, silu, tanh; SHAC: elu)."""
    layer_norm: bool = True
    """LayerNorm after each hidden layer of the policy MLP (SHAC's networks)."""
    init_log_std: float = -1.0
    """Initial log standard deviation of the policy's Gaussian (SHAC: -1)."""
    normalize_observations: bool = True
    """Normalise the policy's (and critics') observations by running statistics, updated after
    each batch and frozen within it."""
    eval_envs: int = 16
    """Episodes per evaluation (each from its own start)."""
    seed: int = 0
    """Seed of the run's keys (policy, critics, environments, exploration; evaluation: seed + 1)."""
    devices: int = 1
    """Devices the environment batch is split over (data parallel; num_envs must divide evenly).
    On one CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N host devices."""
    max_consecutive_nonfinite: int = 100
    """Non-finite updates in a row after which the run stops (its last checkpoint, with finite
    parameters, is kept)."""
    seeds: int = 1
    """Independent runs trained at once with jax.vmap, seeds seed .. seed + seeds - 1; metrics
    report their mean, a 95% confidence interval and each seed's value."""

    def __post_init__(self):
        envs.check_name(self.env)
        estimators.registration(self.estimator)  # a clear error for an unknown name
        settings_class = estimators.registration(self.estimator).settings_class
        if self.estimator_settings is not None and type(self.estimator_settings) is not (
                settings_class):
            raise SettingError(f"estimator_settings must be a {settings_class.__name__} for "
                               f"estimator={self.estimator!r}, not {self.estimator_settings!r}")
        for name in ("num_envs", "updates", "updates_per_call", "epochs", "minibatches",
                     "eval_envs", "seeds", "max_consecutive_nonfinite"):
            check_positive_int(name, getattr(self, name))
        steps = self.updates * self.epochs * self.minibatches  # (the optimiser's step count)
        if steps > LARGEST_INT:
            raise SettingError(f"updates x epochs x minibatches = {steps:,} optimiser steps is "
                               f"above {LARGEST_INT:,} (JAX's int32 step count); lower one")
        check_positive("learning_rate", self.learning_rate)
        check_non_negative("final_learning_rate", self.final_learning_rate)
        check_non_negative("health_shaping", self.health_shaping)
        check_positive("health_tolerance", self.health_tolerance)
        check_non_negative("soft_termination", self.soft_termination)
        check_non_negative("state_gradient_clip", self.state_gradient_clip)
        family = estimators.registration(self.estimator).family
        for name, what in (("soft_termination", "weights a pathwise estimator's return"),
                           ("state_gradient_clip", "clips a pathwise estimator's gradient")):
            if getattr(self, name) and family != "pathwise":
                raise SettingError(f"{name}={getattr(self, name)} {what}; estimator="
                                   f"{self.estimator!r} is {family}; allowed: {name}=0, or one "
                                   f"of {pathwise_estimators()}")
        if self.grad_clip is not None:
            check_positive("grad_clip", self.grad_clip)
        check_betas("betas", self.betas)
        check_hidden_sizes("hidden_sizes", self.hidden_sizes)
        check_activation(self.activation)
        low, high = (math.log(float(np.finfo(np.float32).tiny)),
                     math.log(float(np.finfo(np.float32).max)))
        if (not isinstance(self.init_log_std, int | float) or isinstance(self.init_log_std, bool)
                or not low <= self.init_log_std <= high):
            raise SettingError(f"init_log_std={self.init_log_std!r} must be a number in "
                               f"[{low:.1f}, {high:.1f}] (its exp, the standard deviation, is "
                               "then a finite, non-zero float32)")
        if self.episode_length is not None:
            check_positive_int("episode_length", self.episode_length)
        check_seed("seed", self.seed, offsets=self.seeds)  # seeds seed..seed+seeds (eval: +1)
        if not (isinstance(self.env_options, tuple)
                and all(isinstance(item, str) for item in self.env_options)):
            raise SettingError(f"env_options={self.env_options!r} must be a list of "
                               "'key=value' texts (e.g. ['ctrl_cost_weight=0.01'])")
        check_not_owned(self.env_settings, {
            name: "--" + name.replace("_", "-") for name in (
                "episode_length", "backend", "health_shaping", "anticipate_jumps",
                "health_tolerance", "soft_termination", "anticipate_landings",
                "state_gradient_clip")}, "env_options")
        check_device_split(self.devices, self.num_envs)  # (available: make_trainer)
        if not 0 <= self.final_learning_rate <= self.learning_rate:  # also rejects NaN
            raise SettingError(f"final_learning_rate={self.final_learning_rate} must be in "
                               f"[0, learning_rate={self.learning_rate}]")
        if self.updates % self.updates_per_call:
            raise SettingError(f"updates={self.updates} is not a multiple of updates_per_call="
                               f"{self.updates_per_call} (each call runs that many); allowed: a "
                               f"multiple of {self.updates_per_call}, or (in a new run) "
                               f"--updates-per-call set to a divisor of {self.updates}")
        if self.minibatches > 1 and self.num_envs % (self.minibatches * self.devices):
            raise SettingError(f"num_envs={self.num_envs} does not split into minibatches="
                               f"{self.minibatches} (on devices={self.devices}); allowed: "
                               f"num_envs a multiple of {self.minibatches * self.devices}")
        check_bool_fields(self)
        check_bool_fields(self.resolved_estimator_settings)  # (built, so validated, here too)
        envs.check(self.env, self.episode_length, self.backend, self.health_shaping,
                   self.anticipate_jumps, self.health_tolerance, self.soft_termination,
                   self.anticipate_landings, state_gradient_clip=self.state_gradient_clip,
                   **self.env_settings)
        episode_length = self.episode_length or envs.default_episode_length(self.env)
        if self.horizon > episode_length:
            raise SettingError(f"horizon={self.horizon} is longer than the episode (episode_length="
                               f"{episode_length}); allowed: 1..{episode_length}")

    @property
    def resolved_estimator_settings(self):
        """The estimator's settings object (its training defaults when none was given)."""
        if self.estimator_settings is not None:
            return self.estimator_settings
        return estimators.make_settings(self.estimator,
                                        **estimators.training_settings(self.estimator))

    @property
    def horizon(self) -> int:
        """Steps per update (the estimator's horizon; SHAC's window within it)."""
        return self.resolved_estimator_settings.horizon

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.horizon

    @property
    def env_settings(self) -> dict[str, Any]:
        return parse_options(self.env_options, "env_options")

    def to_json(self) -> dict[str, Any]:
        """Plain values (the estimator's settings resolved, as a dict)."""
        values = dataclasses.asdict(self)
        values["estimator_settings"] = dataclasses.asdict(self.resolved_estimator_settings)
        return values

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> TrainSettings:
        """The settings written by ``to_json`` (lists become tuples)."""
        def plain(value):
            return tuple(value) if isinstance(value, list) else value

        values = {k: plain(v) for k, v in values.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingError(f"unknown training setting(s) {unknown}; allowed: {sorted(known)}")
        nested = values.get("estimator_settings")
        if isinstance(nested, Mapping):
            values["estimator_settings"] = estimators.make_settings(
                values.get("estimator", cls.estimator), **{k: plain(v) for k, v in nested.items()})
        return cls(**values)


CHANGEABLE_ON_RESUME = ("updates", "eval_envs", "max_consecutive_nonfinite", "devices")
"""Settings a resumed run may change: its length (the learning rate then decays linearly to the
new total), how it evaluates and stops, and over how many devices its batch is split (the same
computation, summed in another order). Everything else is the run's."""


def check_resumable_with(settings: TrainSettings, recorded: Mapping[str, Any] | None,
                         where: str) -> None:
    """Refuse to resume (or evaluate, or draw) under ``settings`` where they differ from
    ``recorded`` (what the run's checkpoint ``where`` was trained with; ``None``: a checkpoint
    older than the record) in anything but ``CHANGEABLE_ON_RESUME``: settings.json edited by
    hand would continue the run under other settings, and then describe all of it (or evaluate
    its policy on another env and key under the run's name)."""
    if recorded is None:
        return
    current = json.loads(json.dumps(settings.to_json()))  # (tuples as the record's lists)
    for name, value in current.items():
        if name in CHANGEABLE_ON_RESUME or name not in recorded:
            continue
        pairs = ([(f"{name}.{key}", value[key], recorded[name][key]) for key in value
                  if key in recorded[name]]
                 if isinstance(value, dict) and isinstance(recorded[name], dict)
                 else [(name, value, recorded[name])])
        for setting, given, kept in pairs:
            if given != kept:
                raise SettingError(f"settings.json has {setting}={given!r}, but {where} was "
                                   f"trained with {kept!r} (was settings.json edited?); put it "
                                   "back to resume, evaluate or draw the run, or start a new "
                                   "run with the new value")


def settings_for(env: str = TrainSettings.env, estimator: str = TrainSettings.estimator,
                 estimator_options: Mapping[str, Any] | None = None, sizes: str = "cpu",
                 **overrides: Any) -> TrainSettings:
    """The settings of a run, each value from the first of these that gives it:

    1. ``overrides`` (``TrainSettings`` fields, and ``horizon`` and ``discount``, which every
       estimator has) and ``estimator_options`` (any of the estimator's settings);
    2. the environment's configuration for that estimator at ``sizes`` (``cpu`` or ``gpu``;
       ``diffpg.configs``);
    3. the estimator's declarations (``diffpg.estimators.registry``: ``trainer`` and ``training``);
    4. the defaults of ``TrainSettings`` and of the estimator's settings class, except that a
       default horizon longer than the env's episode becomes the episode's length (the LQR's
       20 steps).
    """
    estimators.registration(estimator)
    config = configs.config_for(env, estimator, sizes)
    shared = {k: overrides.pop(k) for k in ("horizon", "discount") if k in overrides}
    allowed = {f.name for f in dataclasses.fields(TrainSettings)} - {"env", "estimator",
                                                                     "estimator_settings"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise SettingError(f"unknown training setting(s) {unknown}; allowed: {sorted(allowed)}")
    trainer = dict(estimators.registration(estimator).trainer) | dict(config.trainer) | overrides
    estimator_values = estimators.training_settings(estimator, **config.estimator)
    estimator_values |= shared | dict(estimator_options or {})
    if "horizon" not in estimator_values:
        envs.check_name(env)
        episode_length = trainer.get("episode_length") or envs.default_episode_length(env)
        default_horizon = estimators.make_settings(estimator, **estimator_values).horizon
        if default_horizon > episode_length:
            estimator_values["horizon"] = episode_length
    return TrainSettings(env=env, estimator=estimator,
                         estimator_settings=estimators.make_settings(estimator, **estimator_values),
                         **trainer)


class TrainState(NamedTuple):
    """Everything a run needs to continue."""

    params: Params
    opt_state: optax.OptState
    obs_stats: RunningStatistics
    estimator_state: EstimatorState
    env_state: State
    key: jax.Array
    update: jax.Array  # [] updates done
    env_steps: jax.Array  # [] environment steps simulated


class Trainer(NamedTuple):
    """The pieces of a run, built once from the settings."""

    settings: TrainSettings
    env: Any
    policy: Policy
    estimator: estimators.Estimator
    optimizer: optax.GradientTransformation
    init: Callable[[jax.Array], TrainState]
    run_updates: Callable[[TrainState], tuple[TrainState, dict]]
    evaluate: Callable[[TrainState, jax.Array], dict]
    init_run: Callable[[], TrainState]
    """The run's initial state: init(PRNGKey(seed)), or with seeds > 1 the states of
    seeds seed + i stacked on a leading axis [seeds] (then run_updates and
    evaluate are vmapped over it and return per-seed metrics [seeds])."""


def make_policy(settings: TrainSettings, env) -> Policy:
    """The run's policy on ``env``, built from every policy setting of ``settings`` (the one
    definition, so that whoever reloads a run's parameters applies them to the same network)."""
    return make_gaussian_mlp_policy(env.observation_size, env.action_size,
                                    hidden_sizes=settings.hidden_sizes,
                                    activation=settings.activation,
                                    layer_norm=settings.layer_norm,
                                    init_log_std=settings.init_log_std)


def keep_finite_parameters(params: Params, opt_state: optax.ApplyIfFiniteState,
                           new_params: Params, new_opt_state: optax.ApplyIfFiniteState):
    """``new_params`` and ``new_opt_state`` when every parameter is finite; else the previous
    ones, with the step counted as non-finite (as ``apply_if_finite`` counts a non-finite
    gradient): a finite gradient can still overflow float32 parameters."""
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))
    skipped = opt_state._replace(notfinite_count=opt_state.notfinite_count + 1,
                                 last_finite=jnp.array(False),
                                 total_notfinite=opt_state.total_notfinite + 1)
    # A gradient apply_if_finite skipped left the parameters as they were (finite): it alone
    # counts that step.
    choose = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    return choose(new_params, params), choose(new_opt_state, skipped)


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    """The actor's optimiser; ``apply_if_finite`` skips an update whose gradient is not finite."""
    steps = settings.updates * settings.epochs * settings.minibatches
    schedule = optax.linear_schedule(settings.learning_rate, settings.final_learning_rate, steps)
    clip = (optax.identity() if settings.grad_clip is None
            else optax.clip_by_global_norm(settings.grad_clip))
    return optax.apply_if_finite(
        optax.chain(clip, optax.adam(schedule, b1=settings.betas[0], b2=settings.betas[1])),
        # Never apply a non-finite update: the count cannot exceed the number of steps.
        # Stopping after max_consecutive_nonfinite is diffpg.runs' job.
        max_consecutive_errors=steps + 1,
    )


def check_memory(settings: TrainSettings, env) -> None:
    """Refuse, before compiling, a batch whose simulated states alone cannot fit: every step of
    the horizon keeps the batch's states for the reverse pass (a lower bound of what a run needs),
    and an evaluation's ``eval_envs`` episodes run at once."""
    per_env = state_bytes(env)
    available = available_memory_bytes()
    if available is None:
        return
    available *= settings.devices
    per_env_run = per_env * settings.seeds * (settings.horizon + 1)
    needed = per_env_run * settings.num_envs
    if needed > available:
        fitting = int(available // per_env_run)
        advice = (f"lower num_envs (at most {fitting:,} fit) or seeds" if fitting
                  else "lower seeds or horizon (even num_envs=1 does not fit)")
        raise SettingError(
            f"num_envs={settings.num_envs} (x seeds={settings.seeds}, horizon={settings.horizon}) "
            f"needs at least {needed / 2**30:,.1f} GiB for the simulated states alone, and about "
            f"{available / 2**30:,.1f} GiB are available; {advice}")
    # An evaluation runs eval_envs episodes at once: a state and its successor, and each step's
    # transition of the whole episode (observations, actions, rewards and flags).
    per_episode = (2 * per_env + env.episode_length
                   * transition_bytes(env.observation_size, env.action_size)) * settings.seeds
    needed = per_episode * settings.eval_envs
    if needed > available:
        fitting = int(available // per_episode)
        advice = (f"lower eval_envs (at most {fitting:,} fit)" if fitting
                  else "lower episode_length or seeds (even eval_envs=1 does not fit)")
        raise SettingError(
            f"eval_envs={settings.eval_envs} (x seeds={settings.seeds}, episode_length="
            f"{env.episode_length}) needs at least {needed / 2**30:,.1f} GiB for the "
            f"evaluation's states and steps alone, and about {available / 2**30:,.1f} GiB are "
            f"available; {advice}")


def did_not_blow_up(transitions: Transitions) -> jax.Array:
    """``[1, B, ...]`` whether each environment's rollout stayed finite (``obs`` and
    ``next_obs`` over all ``T`` steps). A physics blow-up grows through finite but absurd states
    (joint angles of 1e5 rad) before it reaches inf or NaN; leaving out every row of an
    environment that blew up keeps those states out of the observation statistics."""
    finite = jnp.isfinite(transitions.obs) & jnp.isfinite(transitions.next_obs)
    return jnp.all(finite, axis=(0, -1), keepdims=True)[..., 0]


def batch_diagnostics(policy: Policy, params: Params, obs_stats: RunningStatistics,
                      estimate: estimators.Estimate) -> dict[str, jax.Array]:
    """What tells why a run is stuck, from the batch an estimate simulated (docs/diagnostics.md):
    how often episodes end by termination, their length, action saturation, the policy's std."""
    tr = estimate.batch.transitions
    info = estimate.env_state.info
    completed = info["last_episode_length"] > 0
    metrics = {
        "training/termination_rate": jnp.mean(tr.termination),
        "training/episode_length": jnp.sum(jnp.where(completed, info["last_episode_length"], 0))
        / jnp.maximum(jnp.sum(completed), 1),
        "training/episode_return": jnp.sum(jnp.where(completed, info["last_episode_return"], 0))
        / jnp.maximum(jnp.sum(completed), 1),
        "training/policy_log_std": jnp.mean(jnp.log(
            policy.distribution(params, normalize(obs_stats, tr.obs[0]))[1])),
    }
    if policy.squash:
        metrics["training/action_saturation"] = jnp.mean(jnp.abs(jnp.tanh(tr.raw_action)) > 0.99)
    return metrics


class _Parts(NamedTuple):
    """What every inner step of a run uses, built once by ``make_trainer``."""

    settings: TrainSettings
    env: Any  # training env (with the settings' health shaping)
    eval_env: Any  # evaluation env (the task's own reward)
    policy: Policy
    estimator: estimators.Estimator
    optimizer: optax.GradientTransformation
    horizon: int  # steps per update


def make_envs(settings: TrainSettings) -> tuple[Any, Any]:
    """The training env (with ``health_shaping``, ``soft_termination`` and
    ``state_gradient_clip``) and the evaluation env (without; the clip changes no value, so
    with it alone the two are one)."""
    shaping = {"anticipate_jumps": settings.anticipate_jumps,
               "anticipate_landings": settings.anticipate_landings,
               "health_tolerance": settings.health_tolerance} if settings.health_shaping else {}

    def make_env(training: bool):
        devices = {"health_shaping": settings.health_shaping, **shaping,
                   "soft_termination": settings.soft_termination,
                   "state_gradient_clip": settings.state_gradient_clip} if training else {}
        return envs.make(settings.env, episode_length=settings.episode_length,
                         backend=settings.backend, **devices, **settings.env_settings)

    env = make_env(training=True)
    shaped = settings.health_shaping or settings.soft_termination
    return env, (make_env(training=False) if shaped else env)


def make_trainer(settings: TrainSettings, env=None) -> Trainer:
    """Build env, policy, estimator and the compiled update and evaluation functions.

    ``env`` replaces the environment named by the settings (same sizes; for custom or
    instrumented environments), for training and evaluation. Otherwise training runs on the
    settings' env with its ``health_shaping`` and evaluation on the same env without it.
    """
    check_devices_available(settings.devices)  # (a run's settings hold on any machine)
    env, eval_env = make_envs(settings) if env is None else (env, env)
    policy = make_policy(settings, env)
    estimator_settings = settings.resolved_estimator_settings
    estimator = estimators.make(settings.estimator, env, policy,
                                **dataclasses.asdict(estimator_settings))
    check_memory(settings, env)
    if settings.epochs * settings.minibatches > 1 and estimator.reuse is None:
        raise SettingError(f"estimator={settings.estimator!r} (with these settings) cannot reuse a "
                           f"batch; allowed: epochs=1 and minibatches=1, not epochs="
                           f"{settings.epochs}, minibatches={settings.minibatches}")
    parts = _Parts(settings, env, eval_env, policy, estimator, make_optimizer(settings),
                   estimator_settings.horizon)
    trainer = compile_over_seeds_and_devices(parts)
    check_state_memory(settings, trainer)
    return trainer


def run_state_bytes(trainer: Trainer) -> int:
    """Bytes of the run's whole state (``init_run``'s shapes: nothing computed or allocated;
    ``init_run`` is jitted, so its trace serves every later call)."""
    shapes = jax.eval_shape(trainer.init_run)
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def check_state_memory(settings: TrainSettings, trainer: Trainer) -> None:
    """Refuse, before anything is allocated or compiled, a run whose state (networks, critics,
    optimiser state, replay buffer, environments: ``init_run``'s shapes) cannot fit, held
    ``STATE_COPIES_WHILE_UPDATING`` times."""
    available = available_memory_bytes()
    if available is None:
        return
    state = run_state_bytes(trainer)
    needed = STATE_COPIES_WHILE_UPDATING * state
    if needed > available * settings.devices:
        raise SettingError(
            f"the run's state (networks of hidden_sizes={list(settings.hidden_sizes)}, critics, "
            f"optimiser state, replay buffer and environments, x seeds={settings.seeds}) is "
            f"{state / 2**30:,.1f} GiB, about {needed / 2**30:,.1f} GiB while updating, and "
            f"about {available * settings.devices / 2**30:,.1f} GiB are available; lower "
            "hidden_sizes, critic_hidden_sizes, the replay buffer's size, num_envs or seeds")


def init_state(parts: _Parts, key: jax.Array) -> TrainState:
    """A run's state at update 0: fresh parameters, optimiser, statistics and environments."""
    settings, env, policy = parts.settings, parts.env, parts.policy
    key_policy, key_estimator, key_env, key_run = jax.random.split(key, 4)
    params = policy.init(key_policy)
    env_state = jax.vmap(env.reset)(jax.random.split(key_env, settings.num_envs))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(params, parts.optimizer.init(params), init_statistics(env.observation_size),
                      parts.estimator.init(key_estimator, params), env_state, key_run, zero, zero)


def optimizer_step(parts: _Parts, params: Params, opt_state, grad: Params):
    """One actor step on ``grad`` (an ascent direction of J): minimises -J / horizon, SHAC's
    per-step actor loss; a step that would make a parameter non-finite is skipped."""
    loss_grad = jax.tree.map(lambda g: -g / parts.horizon, grad)
    updates, new_opt_state = parts.optimizer.update(loss_grad, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_params, new_opt_state = keep_finite_parameters(params, opt_state, new_params,
                                                       new_opt_state)
    return new_params, new_opt_state, optax.global_norm(loss_grad)


def reuse_batch(parts: _Parts, params: Params, opt_state, state: TrainState, batch,
                key: jax.Array):
    """``epochs`` passes of ``minibatches`` steps, each on a share of the environments."""
    settings = parts.settings
    num_envs = batch.transitions.reward.shape[1]
    size = num_envs // settings.minibatches

    def one_step(carry, inputs):
        params, opt_state = carry
        indices, step_key = inputs
        minibatch = jax.tree.map(lambda x: x[:, indices], batch)
        grad, metrics = parts.estimator.reuse(params, state.obs_stats, state.estimator_state,
                                              minibatch, step_key)
        params, opt_state, norm = optimizer_step(parts, params, opt_state, grad)
        return (params, opt_state), (norm, metrics)

    def one_epoch(carry, epoch_key):
        key_order, key_steps = jax.random.split(epoch_key)
        order = jax.random.permutation(key_order, num_envs).reshape(settings.minibatches, size)
        return jax.lax.scan(one_step, carry, (order, jax.random.split(
            key_steps, settings.minibatches)))

    (params, opt_state), (norms, metrics) = jax.lax.scan(
        one_epoch, (params, opt_state), jax.random.split(key, settings.epochs))
    return params, opt_state, norms, jax.tree.map(jnp.mean, metrics)


def one_update(parts: _Parts, state: TrainState, _=None) -> tuple[TrainState, dict]:
    """Estimate on a fresh batch, step the actor (or reuse the batch for several steps), update
    the estimator's own state (critics) and the observation statistics."""
    settings = parts.settings
    key, key_estimate, key_update, key_reuse, key_reset = jax.random.split(state.key, 5)
    estimate = parts.estimator.estimate(state.params, state.obs_stats, state.estimator_state,
                                        state.env_state, key_estimate)
    env_state, env_resets = reset_nonfinite_envs(parts.env, estimate.env_state, key_reset)
    if settings.epochs * settings.minibatches > 1:
        params, opt_state, norms, reused = reuse_batch(parts, state.params, state.opt_state,
                                                       state, estimate.batch, key_reuse)
    else:
        params, opt_state, norms = optimizer_step(parts, state.params, state.opt_state,
                                                  estimate.grad)
        reused = {}
    estimator_state, learned = parts.estimator.update(state.params, state.obs_stats,
                                                      state.estimator_state, estimate.batch,
                                                      key_update)
    obs_stats = state.obs_stats
    if settings.normalize_observations:
        obs_stats = update_statistics(obs_stats, estimate.batch.transitions.obs,
                                      include=did_not_blow_up(estimate.batch.transitions))
    new_state = TrainState(params, opt_state, obs_stats, estimator_state, env_state, key,
                           state.update + 1, state.env_steps + settings.num_envs * parts.horizon)
    metrics = {f"training/{k}": v for k, v in reused.items()} | update_metrics(
        parts, norms, estimate, env_resets) | {f"training/{k}": v for k, v in learned.items()}
    metrics |= batch_diagnostics(parts.policy, state.params, state.obs_stats, estimate)
    return new_state, metrics


def update_metrics(parts: _Parts, norms: jax.Array, estimate: estimators.Estimate,
                   env_resets: jax.Array) -> dict[str, jax.Array]:
    """The actor step's metrics: gradient norms (of the finite steps), the share clipped, the
    objective per step, environments reset, and the estimate's own metrics."""
    norms = jnp.ravel(norms)
    finite_norms = jnp.where(jnp.isfinite(norms), norms, jnp.nan)
    metrics = {
        "training/grad_norm": jnp.nanmean(finite_norms),
        "training/grad_norm_max": jnp.nanmax(finite_norms),
        "training/objective_per_step": estimate.metrics["objective"] / parts.horizon,
        "training/nonfinite_env_resets": env_resets,
    }
    if parts.settings.grad_clip is not None:
        metrics["training/clipped_share"] = jnp.mean(norms > parts.settings.grad_clip)
    return metrics | {f"training/{k}": v for k, v in estimate.metrics.items() if k != "objective"}


def run_updates(parts: _Parts, state: TrainState) -> tuple[TrainState, dict]:
    """``updates_per_call`` updates as one ``lax.scan``; metrics averaged over them."""
    state, metrics = jax.lax.scan(functools.partial(one_update, parts), state, None,
                                  parts.settings.updates_per_call)
    grad_norm_max = jnp.nanmax(metrics.pop("training/grad_norm_max"))
    metrics = jax.tree.map(jnp.nanmean, metrics)  # skipped updates are counted apart
    metrics["training/grad_norm_max"] = grad_norm_max
    # apply_if_finite counts the steps it skipped (and the ones in a row, for diffpg.runs).
    metrics["training/nonfinite_updates"] = state.opt_state.total_notfinite
    return state, metrics


def evaluate(parts: _Parts, state: TrainState, key: jax.Array) -> dict:
    """Undiscounted return of one episode per eval env, deterministic and stochastic, and the
    deterministic episodes' length."""
    def episode_returns(deterministic: bool):
        return evaluate_policy(parts.eval_env, parts.policy, state.params, state.obs_stats, key,
                               parts.settings.eval_envs, deterministic=deterministic)

    deterministic = episode_returns(True)
    return {"eval/episode_reward": jnp.mean(deterministic.returns),
            "eval/episode_reward_std": jnp.std(deterministic.returns),
            "eval/episode_length": jnp.mean(deterministic.lengths),
            "eval/blown_up_share": jnp.mean(deterministic.blew_up),
            "eval/stochastic_episode_reward": jnp.mean(episode_returns(False).returns)}


def compile_over_seeds_and_devices(parts: _Parts) -> Trainer:
    """The ``Trainer``: the run's functions vmapped over ``seeds`` (when above 1) and compiled,
    their environment batch split over ``devices`` (when above 1)."""
    settings = parts.settings
    init = functools.partial(init_state, parts)
    run, evaluate_one = functools.partial(run_updates, parts), functools.partial(evaluate, parts)
    if settings.seeds == 1:
        def init_run() -> TrainState:
            return init(seed_key(settings.seed))

        evaluate_all = evaluate_one
    else:
        def init_run() -> TrainState:
            keys = [seed_key(settings.seed + index) for index in range(settings.seeds)]
            return jax.vmap(init)(jnp.stack(keys))

        # Every seed is evaluated on the same starts and noise (common random numbers).
        run, evaluate_all = jax.vmap(run), jax.vmap(evaluate_one, (0, None))
    pieces = (settings, parts.env, parts.policy, parts.estimator, parts.optimizer, init)
    if settings.devices == 1:
        # init_run jitted: one cached executable instead of many small eager compiles.
        return Trainer(*pieces, jax.jit(run), jax.jit(evaluate_all), jax.jit(init_run))
    state_sharding, everywhere = shard_over_batch(jax.eval_shape(init_run), settings)
    return Trainer(
        *pieces,
        jax.jit(run, in_shardings=(state_sharding,), out_shardings=(state_sharding, everywhere)),
        jax.jit(evaluate_all, in_shardings=(state_sharding, everywhere), out_shardings=everywhere),
        jax.jit(init_run, out_shardings=state_sharding),
    )


def shard_over_batch(abstract_state: TrainState, settings: TrainSettings):
    """Shardings for data parallelism over ``settings.devices`` devices (``diffpg.devices``):
    the environment batch is split along its batch axis (axis 1 with several seeds), everything
    else (parameters, optimiser and critic states, replay buffer, key) is replicated.

    Returns ``(state shardings, the replicated sharding)``.
    """
    everywhere = replicated(settings.devices)
    split = batch_sharding(settings.devices, leading_axes=1 if settings.seeds > 1 else 0)
    state_sharding = jax.tree.map(lambda _: everywhere, abstract_state)._replace(
        env_state=jax.tree.map(lambda _: split, abstract_state.env_state))
    return state_sharding, everywhere


def reset_nonfinite_envs(env, env_state: State, key: jax.Array) -> tuple[State, jax.Array]:
    """Replace every environment of the batch ``[B]`` whose observation or reward is not finite
    by a fresh episode, so one physics blow-up does not poison every later update.

    Returns the batch and the number of environments reset (a float scalar, for the metrics).
    The fresh episodes are only simulated when some environment needs one (``lax.cond``).
    """
    flat_obs = env_state.obs.reshape(env_state.obs.shape[0], -1)
    finite = jnp.all(jnp.isfinite(flat_obs), axis=1) & jnp.isfinite(env_state.reward)

    def replace_blown_up(batch):
        fresh = jax.vmap(env.reset)(jax.random.split(key, finite.shape[0]))

        def pick(kept, new):
            mask = finite.reshape(finite.shape + (1,) * (kept.ndim - 1))
            return jnp.where(mask, kept, new)

        return jax.tree.map(pick, batch, fresh)

    env_state = jax.lax.cond(jnp.all(finite), lambda batch: batch, replace_blown_up, env_state)
    return env_state, jnp.sum(~finite).astype(jnp.float32)


def select_seed(state: TrainState, index: int) -> TrainState:
    """Seed ``index`` of a multi-seed run's state (leaves ``[seeds, ...] -> [...]``)."""
    return jax.tree.map(lambda x: x[index], state)


def summarize_seeds(values: dict[str, jax.Array], seeds: int) -> dict[str, float]:
    """Per-seed metrics ``[seeds]`` -> their mean; for ``eval/`` metrics also the half-width of
    a 95% Student-t confidence interval of the mean (``NAME_ci95``) and each seed's value
    (``NAME/seed_i``); for the evaluation return also its interquartile mean over seeds with a
    95% percentile-bootstrap interval (``_iqm``, ``_iqm_low``, ``_iqm_high``).
    ``training/nonfinite_updates`` is summed over seeds. One seed: as is."""
    if seeds == 1:
        return {k: float(v) for k, v in values.items()}
    row = {}
    for name, value in values.items():
        value = np.asarray(value, dtype=np.float64)
        if name == "training/nonfinite_updates":
            row[name] = float(value.sum())
            continue
        row[name] = float(value.mean())
        if name.startswith("eval/") and not name.endswith("_std"):
            row[f"{name}_ci95"] = mean_confidence_half_width(value)
            row |= {f"{name}/seed_{i}": float(v) for i, v in enumerate(value)}
        if name == "eval/episode_reward":
            row[f"{name}_iqm"] = interquartile_mean(value)
            row[f"{name}_iqm_low"], row[f"{name}_iqm_high"] = interquartile_mean_interval(value)
    return row
