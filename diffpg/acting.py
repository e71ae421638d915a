"""Running a policy in an environment: one unroll and one evaluator for the whole package.

Every estimator simulates its experience with ``unroll`` (the score-function estimator with
``stop_gradient`` parameters: data only; the pathwise ones differentiate straight through
``env.step``), training evaluates with ``evaluate``, and videos record an episode with ``unroll``
too. The policy always sees observations normalised by statistics that are frozen for the call
(``diffpg.normalization``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffpg.envs.core import Environment, SettingError, State
from diffpg.normalization import RunningStatistics, normalize
from diffpg.policy import Params, Policy


class Transitions(NamedTuple):
    """Experience of ``T`` steps of ``B`` environments; every field has leading axes ``[T, B]``."""

    obs: jax.Array  # [T, B, obs] observation the action was taken from (unnormalised)
    noise: jax.Array  # [T, B, act] standard-normal draw behind the action (0 if deterministic)
    raw_action: jax.Array  # [T, B, act] Gaussian sample u (the env receives tanh(u) if squashed)
    reward: jax.Array  # [T, B]
    done: jax.Array  # [T, B] episode ended at this step (termination or truncation)
    termination: jax.Array  # [T, B] ended by the task: the next state has value 0
    truncation: jax.Array  # [T, B] ended by the time limit: bootstrap from next_obs
    next_obs: jax.Array  # [T, B, obs] observation reached, before any auto-reset
    measurement: Any = None
    """``[T, ...]``: what a ``StepHook``'s own simulation measured at each step (``None``
    without one); e.g. AHAC's action sensitivity."""
    survival_probability: Any = None
    """``[T, B]``: the env's differentiable probability that the step did not end the episode
    (``info["survival_probability"]``, ``diffpg.envs.SoftTermination``); ``None`` where the env gives
    none."""


def transition_bytes(observation_size: int, action_size: int) -> int:
    """Bytes of one step of one env in ``Transitions`` (float32 observations before and after,
    noise and raw action, reward, three flags and a survival probability)."""
    return 4 * (2 * observation_size + 2 * action_size + 5)


class StepHook(NamedTuple):
    """An estimator's change to every step of ``unroll``, which knows no estimator.

    ``inputs``: a pytree with leading axis ``[steps]``; step ``t`` receives slice ``t``.
    ``around(step, state, inputs_t, key) -> (next_state, transition)`` runs the step by calling
    unroll's own ``step(state, key, offset=0.0, simulate=None)``, with the state it chooses
    (AHAC cuts the gradient there), an ``offset`` added to the raw action (IVW differentiates
    the return by it), or a ``simulate(state, action, key) -> (next_state, measurement)`` that
    replaces the batch's environment step (AHAC measures the action Jacobian with a ``jvp``);
    the measurement becomes ``Transitions.measurement``.
    """

    inputs: Any
    around: Callable[..., tuple[State, Transitions]]


def policy_step(step_batch: Callable[[State, jax.Array], State], policy: Policy, params: Params,
                obs_stats: RunningStatistics, deterministic: bool, state: State,
                step_key: jax.Array, offset=0.0, simulate=None) -> tuple[State, Transitions]:
    """One step of the batch: the policy's action on the normalised observation (``offset``
    added to the raw action), then ``step_batch(state, action)``, or ``simulate(state, action,
    step_key) -> (next_state, measurement)`` in its place (``StepHook``)."""
    obs = state.obs
    mean, std = policy.distribution(params, normalize(obs_stats, obs))
    if deterministic:
        noise = jnp.zeros_like(mean)
    else:
        noise = jax.random.normal(step_key, mean.shape, mean.dtype)
    raw_action = mean + std * noise + offset
    action = policy.to_action(raw_action)
    if simulate is None:
        next_state, measurement = step_batch(state, action), None
    else:
        next_state, measurement = simulate(state, action, step_key)
    info = next_state.info
    return next_state, Transitions(
        obs=obs,
        noise=noise,
        raw_action=raw_action,
        reward=next_state.reward,
        done=next_state.done,
        termination=info["termination"],
        truncation=info["truncation"],
        next_obs=info["terminal_obs"],
        measurement=measurement,
        survival_probability=info.get("survival_probability"),
    )


def unroll(
    env: Environment,
    policy: Policy,
    params: Params,
    obs_stats: RunningStatistics,
    env_state: State,
    key: jax.Array,
    steps: int,
    *,
    deterministic: bool = False,
    remat_segment: int = 0,
    record: Callable[[State], Any] | None = None,
    hook: StepHook | None = None,
) -> tuple[State, Transitions] | tuple[State, Transitions, Any]:
    """Run ``steps`` steps of a batch of ``B`` environments (``env_state`` has leading axis B).

    Actions are ``policy.to_action(mean + std * noise)`` on normalised observations (the mean
    alone with ``deterministic=True``). Differentiable in ``params`` and ``env_state`` through the
    environment's dynamics. Returns the final state and the transitions ``[T, B]``; with
    ``record``, also ``record(state)`` of the state reached by each step, stacked ``[T, ...]``.

    ``remat_segment = S > 0`` (``S`` divides ``steps``) rematerialises: the scan runs as
    ``steps / S`` segments of ``S`` steps under ``jax.checkpoint``, so reverse mode keeps only
    the states at segment boundaries plus one segment's intermediates (memory about
    ``O(steps / S + S)`` steps instead of ``O(steps)``) and recomputes each segment's forward
    pass once. The values and gradients are those of the plain scan.

    ``hook``: an estimator's change to every step (``StepHook``); none by default.
    """
    own_step = functools.partial(policy_step, jax.vmap(env.step), policy, params, obs_stats,
                                 deterministic)

    def step(state, inputs):
        step_key, hook_inputs = inputs  # hook_inputs: None without a hook (an empty pytree)
        if hook is None:
            next_state, transition = own_step(state, step_key)
        else:
            next_state, transition = hook.around(own_step, state, hook_inputs, step_key)
        if record is None:
            return next_state, transition
        return next_state, (transition, record(next_state))

    inputs = (jax.random.split(key, steps), None if hook is None else hook.inputs)
    if not remat_segment:
        end_state, outputs = jax.lax.scan(step, env_state, inputs)
    else:
        if steps % remat_segment:
            raise SettingError(f"remat_segment={remat_segment} must divide steps={steps}")

        @jax.checkpoint
        def segment(state, segment_inputs):
            return jax.lax.scan(step, state, segment_inputs)

        segments = jax.tree.map(
            lambda x: x.reshape((steps // remat_segment, remat_segment) + x.shape[1:]), inputs)
        end_state, outputs = jax.lax.scan(segment, env_state, segments)
        outputs = jax.tree.map(lambda x: x.reshape((steps,) + x.shape[2:]), outputs)
    if record is None:
        return end_state, outputs
    transitions, recorded = outputs
    return end_state, transitions, recorded


def repeat_states(env_state: State, repeats: int) -> State:
    """Each of ``B`` states repeated ``repeats`` times in a row: ``[B] -> [B * repeats]``."""
    return jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=0), env_state)


def first_episode_mask(done: jax.Array) -> jax.Array:
    """``alive [T, B]``: 1 for the steps of each environment's first episode (the step that ends
    it included), 0 after it; ``done [T, B]``."""
    ended_before = jnp.cumsum(done, axis=0) - done
    return (ended_before == 0).astype(done.dtype)


class Episodes(NamedTuple):
    """What ``evaluate`` measures of its episodes, one entry each ``[N]``."""

    returns: jax.Array
    lengths: jax.Array
    """Steps until the episode ended (a fall, a blow-up or the time limit)."""
    blew_up: jax.Array


def evaluate(
    env: Environment,
    policy: Policy,
    params: Params,
    obs_stats: RunningStatistics,
    key: jax.Array,
    num_episodes: int,
    *,
    deterministic: bool,
) -> Episodes:
    """Undiscounted return of one episode from each of ``num_episodes`` fresh starts ``[N]``,
    its length in steps ``[N]`` and whether the physics blew up in it ``[N]`` (bool).

    Each environment runs for ``env.episode_length`` steps; only the rewards of its first
    episode count (an early termination ends it). A blow-up (a non-finite reward or
    observation) ends the episode too: its return is the sum of the rewards before it.
    """
    key_reset, key_noise = jax.random.split(key)
    starts = jax.vmap(env.reset)(jax.random.split(key_reset, num_episodes))
    _, transitions = unroll(env, policy, params, obs_stats, starts, key_noise,
                            env.episode_length, deterministic=deterministic)
    finite = (jnp.isfinite(transitions.reward)
              & jnp.all(jnp.isfinite(transitions.next_obs), axis=-1))  # [T, N]
    first_episode = first_episode_mask(transitions.done) > 0
    counted = first_episode & (jnp.cumprod(finite, axis=0) > 0)
    blew_up = jnp.any(first_episode & ~finite, axis=0)
    return Episodes(returns=jnp.sum(jnp.where(counted, transitions.reward, 0.0), axis=0),
                    lengths=jnp.sum(counted, axis=0), blew_up=blew_up)
