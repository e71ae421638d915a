"""Time limit and auto-reset for single-instance environments (see ``diffpg.envs.core``).

``TimeLimitAutoReset`` turns a raw environment, which only reports *termination*, into one with
episodes of at most ``episode_length`` steps that restart by themselves, so a trainer can
``lax.scan`` a (``vmap``-ed) rollout of any length without branching on ``done``.

After every ``step`` the returned ``State`` has:

* ``done``: 1.0 if this step ended the episode, by termination or by the time limit;
* ``reward``: the reward of this step (of the episode that just ended, if ``done``);
* ``obs``/``pipeline_state``: those reached by this step or, if ``done``, those of the
  *stored initial state* of this env instance (see below);
* ``info['termination']``: 1.0 if the raw env reported ``done`` (the task ended the episode);
* ``info['truncation']``: 1.0 if ``steps`` reached ``episode_length`` and the env did not
  terminate (bootstrap from ``info['terminal_obs']``);
* ``info['terminal_obs'] [observation_size]``: the observation reached by this step, *before*
  any auto-reset (equal to ``obs`` when not ``done``);
* ``info['steps']`` (int32): steps taken in the current episode, counting this one; set back to
  0 when the episode ends and the env resets;
* ``info['episode_return']``: the sum of rewards in the current episode so far; likewise set
  back to 0 on an auto-reset;
* ``info['last_episode_return']``, ``info['last_episode_length']`` (int32): return and length
  of the most recently completed episode of this instance (0 until one completes);
* ``info['first_pipeline_state']``, ``info['first_obs']``: the stored initial state.

**Resets go to the stored initial state.** As in Brax's ``AutoResetWrapper``, an auto-reset does
not draw a new initial state: it restores the one this instance got from its ``reset(key)``,
stored in ``info``. Every episode of one instance thus starts from the same state; diversity
comes from the batch (different keys per instance) and from calling ``reset`` again.

Gradients: the reset is a ``jnp.where`` (no ``lax.cond``), so ``step`` is differentiable through
the raw env whenever ``done`` is 0; across an auto-reset the next observation is the stored
initial state, whose gradient w.r.t. earlier actions is exactly 0.
"""

from __future__ import annotations

import functools
import math
from typing import final

import jax
import jax.numpy as jnp
from diffpg.envs.core import Environment, SettingError, State

__all__ = ["HEALTH_TOLERANCE", "HealthShaping", "SoftTermination", "StateGradientClip",
           "TimeLimitAutoReset", "Wrapper", "clip_cotangent"]

HEALTH_TOLERANCE = 0.1
"""How far inside a healthy bound ``HealthShaping``'s warning starts by default (m or rad)."""

#: Keys this wrapper adds to ``State.info``.
WRAPPER_INFO_KEYS = (
    "steps",
    "termination",
    "truncation",
    "terminal_obs",
    "episode_return",
    "last_episode_return",
    "last_episode_length",
    "first_pipeline_state",
    "first_obs",
)


def check_episode_length(episode_length: int) -> int:
    """Return ``episode_length`` as an int, or raise ``SettingError`` if it is not >= 1."""
    if isinstance(episode_length, bool) or not isinstance(episode_length, int):
        raise SettingError(f"episode_length must be a positive int, got {episode_length!r}")
    if episode_length <= 0:
        raise SettingError(f"episode_length must be >= 1, got episode_length={episode_length}")
    return episode_length


class Wrapper(Environment):
    """An environment around another one (``env``): sizes, episode length and ``unwrapped`` are
    the wrapped env's unless a wrapper says otherwise."""

    def __init__(self, env: Environment):
        self._env = env

    @property
    def env(self) -> Environment:
        """The environment this wrapper wraps."""
        return self._env

    @property
    def unwrapped(self) -> Environment:
        return self._env.unwrapped

    @property
    def observation_size(self) -> int:
        return self._env.observation_size

    @property
    def action_size(self) -> int:
        return self._env.action_size

    @property
    def default_episode_length(self) -> int:  # type: ignore[override]
        return self._env.default_episode_length


@final
class TimeLimitAutoReset(Wrapper):
    """Episodes of at most ``episode_length`` steps, auto-reset to the stored initial state.

    Single instance (``obs [observation_size]``, scalar ``reward``/``done``); batch with
    ``jax.vmap``. See the module docstring for everything ``step`` records in ``info``.

    Args:
        env: a raw environment (reports termination only).
        episode_length: the time limit, in steps (>= 1).
    """

    def __init__(self, env: Environment, episode_length: int):
        super().__init__(env)
        self._episode_length = check_episode_length(episode_length)

    @property
    def episode_length(self) -> int:
        return self._episode_length

    @property
    def default_episode_length(self) -> int:  # type: ignore[override]
        return self._episode_length

    def reset(self, key: jax.Array) -> State:
        """Start an episode with ``key`` and store its state as this instance's reset target."""
        state = self._env.reset(key)
        flag_zero = jnp.zeros((), jnp.float32)
        count_zero = jnp.zeros((), jnp.int32)
        return_zero = jnp.zeros_like(state.reward)
        info = {
            **state.info,
            "steps": count_zero,
            "termination": flag_zero,
            "truncation": flag_zero,
            "terminal_obs": state.obs,
            "episode_return": return_zero,
            "last_episode_return": return_zero,
            "last_episode_length": count_zero,
            "first_pipeline_state": state.pipeline_state,
            "first_obs": state.obs,
        }
        return state.replace(done=flag_zero, info=info)

    def step(self, state: State, action: jax.Array) -> State:
        """Step the raw env with ``action [action_size]``, apply the time limit, auto-reset."""
        # The raw env sees a live state: a previous auto-reset has already restored its start.
        raw_next = self._env.step(state.replace(done=jnp.zeros_like(state.done)), action)
        info = state.info

        steps = info["steps"] + 1
        termination = jnp.where(raw_next.done > 0, 1.0, 0.0).astype(jnp.float32)
        time_up = steps >= self._episode_length
        truncation = jnp.where(time_up & (termination == 0), 1.0, 0.0).astype(jnp.float32)
        done = jnp.maximum(termination, truncation)
        ended = done > 0
        episode_return = info["episode_return"] + raw_next.reward

        def restart_if_ended(first: jax.Array, reached: jax.Array) -> jax.Array:
            return jnp.where(ended, first, reached)

        pipeline_state = jax.tree_util.tree_map(
            restart_if_ended, info["first_pipeline_state"], raw_next.pipeline_state
        )
        obs = restart_if_ended(info["first_obs"], raw_next.obs)

        new_info = {
            **raw_next.info,
            "steps": jnp.where(ended, 0, steps).astype(jnp.int32),
            "termination": termination,
            "truncation": truncation,
            "terminal_obs": raw_next.obs,
            "episode_return": jnp.where(ended, jnp.zeros_like(episode_return), episode_return),
            "last_episode_return": jnp.where(ended, episode_return, info["last_episode_return"]),
            "last_episode_length": jnp.where(ended, steps, info["last_episode_length"]).astype(
                jnp.int32
            ),
            "first_pipeline_state": info["first_pipeline_state"],
            "first_obs": info["first_obs"],
        }
        return raw_next.replace(pipeline_state=pipeline_state, obs=obs, done=done, info=new_info)

    def __repr__(self) -> str:
        return f"TimeLimitAutoReset({self._env!r}, episode_length={self._episode_length})"


class HealthShaping(Wrapper):
    """A differentiable warning of a coming fall, added to the reward of an env that ends on
    one (``env.health_margins(state)``: distances inside the healthy ranges)::

        reward' = reward - weight * sum_i (max(tolerance - m_i, 0) / tolerance)^2

    0 while every margin ``m_i`` exceeds ``tolerance``, rising quadratically to ``weight`` per
    bound at the boundary (DiffRL's hopper reward is shaped so). Its gradient lets a pathwise
    estimator see a fall coming, which the constant healthy reward and the non-differentiable
    end of the episode hide. A training device: evaluate on the unshaped env. The shaping is
    recorded in ``metrics["health_shaping"]``. ``anticipate_jumps`` measures the margin below
    a maximum height at the torso's ballistic apex (``env.health_margins``), so that a jump out
    of the healthy range is penalised from its take-off; ``anticipate_landings`` the margin above
    the minimum height where the torso will land, so that a crouch in flight is penalised from
    when the leg folds.
    """

    def __init__(self, env: Environment, weight: float, tolerance: float = HEALTH_TOLERANCE,
                 anticipate_jumps: bool = False, anticipate_landings: bool = False):
        if not getattr(env, "ends_on_a_fall", False):
            raise SettingError(f"health_shaping={weight!r} needs an env that ends on a fall "
                               "(ant, hopper, humanoid, walker2d)")
        for name, value in (("health_shaping", weight), ("health_tolerance", tolerance)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise SettingError(f"{name}={value!r} must be a positive number")
        for name, value in (("anticipate_jumps", anticipate_jumps),
                            ("anticipate_landings", anticipate_landings)):
            if not isinstance(value, bool):
                raise SettingError(f"{name}={value!r} must be True or False")
        super().__init__(env)
        self.weight, self.tolerance = float(weight), float(tolerance)
        self.anticipate_jumps, self.anticipate_landings = anticipate_jumps, anticipate_landings

    def penalty(self, state: State) -> jax.Array:
        """``weight * sum_i (max(tolerance - m_i, 0) / tolerance)^2`` at ``state``."""
        anticipations = {name: True for name, value in (
            ("anticipate_jumps", self.anticipate_jumps),
            ("anticipate_landings", self.anticipate_landings)) if value}
        margins = self._env.health_margins(state, **anticipations)
        short = jax.nn.relu(self.tolerance - margins) / self.tolerance
        return self.weight * jnp.sum(short**2)

    def reset(self, key: jax.Array) -> State:
        state = self._env.reset(key)
        return state.replace(metrics=state.metrics | {"health_shaping": jnp.zeros_like(
            state.reward)})

    def step(self, state: State, action: jax.Array) -> State:
        next_state = self._env.step(state, action)
        penalty = self.penalty(next_state).astype(next_state.reward.dtype)
        return next_state.replace(reward=next_state.reward - penalty,
                                  metrics=next_state.metrics | {"health_shaping": -penalty})


class SoftTermination(Wrapper):
    """A differentiable probability that each step does not end the episode, recorded for the
    pathwise estimators (``info["survival_probability"]``; the episode still ends as the task
    says)::

        p = prod_i sigmoid(m_i / width)

    over the margins ``m_i`` inside the healthy ranges (``env.health_margins(state)``) of the
    state reached: 1 far inside every range, 1/2 on a boundary. The estimators weight each
    reward and bootstrapped value by the product of these probabilities since their objective
    started (``diffpg.returns.survival``), so that a state near a fall costs, in expectation,
    the value a fall would lose, with a gradient, where the hard end of an episode has none.
    A training device: evaluate on the env without it.
    """

    def __init__(self, env: Environment, width: float):
        if not getattr(env.unwrapped, "ends_on_a_fall", False):
            raise SettingError(f"soft_termination={width!r} needs an env that ends on a fall "
                               "(ant, hopper, humanoid, walker2d)")
        if not (isinstance(width, int | float) and math.isfinite(width) and width > 0):
            raise SettingError(f"soft_termination={width!r} must be a positive number")
        super().__init__(env)
        self.width = float(width)

    def probability(self, state: State) -> jax.Array:
        """``prod_i sigmoid(m_i / width)`` at ``state`` (a scalar)."""
        margins = self.unwrapped.health_margins(state)
        return jnp.exp(jnp.sum(jax.nn.log_sigmoid(margins / self.width)))

    def reset(self, key: jax.Array) -> State:
        state = self._env.reset(key)
        return state.replace(info=state.info | {"survival_probability": jnp.ones_like(
            state.reward)})

    def step(self, state: State, action: jax.Array) -> State:
        next_state = self._env.step(state, action)
        probability = self.probability(next_state).astype(next_state.reward.dtype)
        return next_state.replace(info=next_state.info | {"survival_probability": probability})


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def clip_cotangent(tree, max_norm: float):
    """``tree`` unchanged; in reverse mode its cotangent ``g`` (over its floating-point leaves)
    is scaled to a global norm of at most ``max_norm``: ``g * min(1, max_norm / ||g||)``."""
    return tree


def _clip_cotangent_forward(tree, max_norm):
    return tree, None


def _clip_cotangent_backward(max_norm, _, cotangent):
    floats = [leaf for leaf in jax.tree.leaves(cotangent)
              if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in floats))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    return (jax.tree.map(lambda leaf: leaf * scale.astype(leaf.dtype)
                         if jnp.issubdtype(leaf.dtype, jnp.inexact) else leaf, cotangent),)


clip_cotangent.defvjp(_clip_cotangent_forward, _clip_cotangent_backward)


class StateGradientClip(Wrapper):
    """The gradient through each step of the physics clipped per environment (values unchanged):
    the cotangent ``g_t = dJ/ds_t`` that reaches the state ``s_t`` from every step after it is
    scaled to a global norm of at most ``max_norm`` before it passes back through the step that
    made ``s_t``::

        g_t <- g_t * min(1, max_norm / ||g_t||)

    A chain of stiff contacts multiplies ``g`` by the step's Jacobian at every step (halfcheetah
    on MJX: about 2x a step, BENCHMARKS.md section 2g); the clip bounds what each step passes
    back, as ``grad_clip`` bounds an update, at the price of a biased gradient where it acts.
    The policy's own path from an observation to its action is not clipped. A training device
    for the pathwise estimators.
    """

    def __init__(self, env: Environment, max_norm: float):
        if not (isinstance(max_norm, int | float) and math.isfinite(max_norm) and max_norm > 0):
            raise SettingError(f"state_gradient_clip={max_norm!r} must be a positive number")
        super().__init__(env)
        self.max_norm = float(max_norm)

    def reset(self, key: jax.Array) -> State:
        return self._env.reset(key)

    def step(self, state: State, action: jax.Array) -> State:
        return self._env.step(clip_cotangent(state, self.max_norm), action)
