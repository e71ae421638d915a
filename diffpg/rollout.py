"""Simulating a batch of environments under a policy, once, for every estimator.

The same function serves the score-function estimator (called with ``stop_gradient`` parameters:
data only) and the pathwise ones (differentiated end to end through ``env.step``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffpg.normalization import RunningStatistics, normalize
from diffpg.policy import Params, Policy
from envs.core import Environment, State


class Transitions(NamedTuple):
    """One window of experience; every field has leading axes ``[T, B]``."""

    obs: jax.Array  # [T, B, obs] observation the action was taken from (unnormalised)
    noise: jax.Array  # [T, B, act] standard-normal draw behind the action
    raw_action: jax.Array  # [T, B, act] Gaussian sample u (the env receives tanh(u) if squashed)
    reward: jax.Array  # [T, B]
    done: jax.Array  # [T, B] episode ended at this step (termination or truncation)
    termination: jax.Array  # [T, B] ended by the task: the next state has value 0
    truncation: jax.Array  # [T, B] ended by the time limit: bootstrap from next_obs
    next_obs: jax.Array  # [T, B, obs] observation reached, before any auto-reset


def rollout(
    env: Environment,
    policy: Policy,
    params: Params,
    obs_stats: RunningStatistics,
    env_state: State,
    key: jax.Array,
    horizon: int,
    remat_segment: int = 0,
) -> tuple[State, Transitions]:
    """Run ``horizon`` steps of a batch of ``B`` environments (``env_state`` has leading axis B).

    Actions are ``policy.to_action(mean + std * noise)`` on normalised observations, with the
    statistics ``obs_stats`` frozen for the whole window. Differentiable in ``params`` and
    ``env_state`` through the environment's dynamics. Returns the final state and the transitions.

    ``remat_segment = S > 0`` (``S`` divides ``horizon``) rematerialises: the scan runs as
    ``horizon / S`` segments of ``S`` steps under ``jax.checkpoint``, so reverse mode keeps only
    the states at segment boundaries plus one segment's intermediates (memory about
    ``O(horizon / S + S)`` steps instead of ``O(horizon)``) and recomputes each segment's forward
    pass once. The values and gradients are those of the plain scan.
    """
    step_batch = jax.vmap(env.step)

    def step(state, step_key):
        obs = state.obs
        mean, std = policy.distribution(params, normalize(obs_stats, obs))
        noise = jax.random.normal(step_key, mean.shape, mean.dtype)
        raw_action = mean + std * noise
        next_state = step_batch(state, policy.to_action(raw_action))
        info = next_state.info
        transition = Transitions(
            obs=obs,
            noise=noise,
            raw_action=raw_action,
            reward=next_state.reward,
            done=next_state.done,
            termination=info["termination"],
            truncation=info["truncation"],
            next_obs=info["terminal_obs"],
        )
        return next_state, transition

    keys = jax.random.split(key, horizon)
    if not remat_segment:
        return jax.lax.scan(step, env_state, keys)
    if horizon % remat_segment:
        raise ValueError(f"remat_segment={remat_segment} must divide horizon={horizon}")

    @jax.checkpoint
    def segment(state, segment_keys):
        return jax.lax.scan(step, state, segment_keys)

    segments = keys.reshape((horizon // remat_segment, remat_segment) + keys.shape[1:])
    end_state, transitions = jax.lax.scan(segment, env_state, segments)
    return end_state, jax.tree.map(lambda x: x.reshape((horizon,) + x.shape[2:]), transitions)


def repeat_states(env_state: State, repeats: int) -> State:
    """Each of ``B`` states repeated ``repeats`` times in a row: ``[B] -> [B * repeats]``."""
    return jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=0), env_state)
