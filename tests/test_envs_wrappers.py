"""Tests for envs.wrappers.TimeLimitAutoReset, the envs registry and one Brax smoke test."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffpg.envs.core import Environment, State
from diffpg.envs.wrappers import TimeLimitAutoReset

from diffpg import envs


class CounterEnv(Environment):
    """Toy env: position ``x`` moves by the action; reward = new ``x``; terminates at ``x >= 3``.

    ``obs = [x]`` (shape [1]), ``action`` shape [1]; ``reset`` starts at ``x = start``.
    ``info['raw_counter']`` counts raw steps (never reset by the wrapper) to check pass-through.
    """

    default_episode_length = 10

    observation_size = 1
    action_size = 1

    def __init__(self, threshold: float = 3.0, start: float = 0.0):
        self.threshold = threshold
        self.start = start

    def reset(self, key: jax.Array) -> State:
        position = jnp.full((1,), self.start, jnp.float32)
        zero = jnp.zeros((), jnp.float32)
        return State(
            pipeline_state={"x": position},
            obs=position,
            reward=zero,
            done=zero,
            metrics={"x": zero},
            info={"raw_counter": jnp.zeros((), jnp.int32)},
        )

    def step(self, state: State, action: jax.Array) -> State:
        position = state.pipeline_state["x"] + action
        done = jnp.where(position[0] >= self.threshold, 1.0, 0.0).astype(jnp.float32)
        return state.replace(
            pipeline_state={"x": position},
            obs=position,
            reward=position[0],
            done=done,
            metrics={"x": position[0]},
            info={**state.info, "raw_counter": state.info["raw_counter"] + 1},
        )


ONE = jnp.ones((1,))
KEY = jax.random.PRNGKey(0)


def run_steps(env: TimeLimitAutoReset, actions: list[float]) -> list[State]:
    state = env.reset(KEY)
    states = []
    for action in actions:
        state = env.step(state, jnp.array([action], jnp.float32))
        states.append(state)
    return states


def test_reset_fields():
    state = TimeLimitAutoReset(CounterEnv(), 5).reset(KEY)
    assert float(state.done) == 0.0
    assert int(state.info["steps"]) == 0
    assert float(state.info["termination"]) == 0.0
    assert float(state.info["truncation"]) == 0.0
    np.testing.assert_array_equal(state.info["terminal_obs"], state.obs)
    np.testing.assert_array_equal(state.info["first_obs"], state.obs)


def test_termination_resets_to_first_state_and_records_terminal_obs():
    env = TimeLimitAutoReset(CounterEnv(threshold=3.0), episode_length=10)
    states = run_steps(env, [1.0, 1.0, 1.0, 1.0])
    for state, expected_steps in zip(states[:2], [1, 2], strict=True):
        assert float(state.done) == 0.0
        assert int(state.info["steps"]) == expected_steps
        np.testing.assert_array_equal(state.info["terminal_obs"], state.obs)
    ended = states[2]
    assert float(ended.done) == 1.0
    assert float(ended.info["termination"]) == 1.0
    assert float(ended.info["truncation"]) == 0.0
    np.testing.assert_allclose(ended.info["terminal_obs"], [3.0])  # before the reset
    np.testing.assert_allclose(ended.obs, [0.0])  # after the reset
    np.testing.assert_allclose(ended.pipeline_state["x"], [0.0])
    assert float(ended.reward) == 3.0  # reward of the terminating step is kept
    assert int(ended.info["steps"]) == 0
    assert float(ended.info["episode_return"]) == 0.0
    assert float(ended.info["last_episode_return"]) == 1.0 + 2.0 + 3.0
    assert int(ended.info["last_episode_length"]) == 3
    # The next episode starts from the stored initial state.
    after = states[3]
    assert float(after.done) == 0.0
    assert int(after.info["steps"]) == 1
    np.testing.assert_allclose(after.obs, [1.0])
    assert float(after.info["episode_return"]) == 1.0
    assert float(after.info["last_episode_return"]) == 6.0  # kept until the next episode ends
    assert int(after.info["raw_counter"]) == 4  # the raw env's own info passes through


def test_truncation_at_time_limit():
    env = TimeLimitAutoReset(CounterEnv(threshold=100.0), episode_length=2)
    first, second, third = run_steps(env, [1.0, 1.0, 1.0])
    assert float(first.done) == 0.0
    assert float(second.done) == 1.0
    assert float(second.info["truncation"]) == 1.0
    assert float(second.info["termination"]) == 0.0
    np.testing.assert_allclose(second.info["terminal_obs"], [2.0])
    np.testing.assert_allclose(second.obs, [0.0])
    assert int(second.info["last_episode_length"]) == 2
    assert float(second.info["last_episode_return"]) == 3.0
    assert float(third.done) == 0.0
    assert int(third.info["steps"]) == 1


def test_termination_at_the_time_limit_is_not_truncation():
    env = TimeLimitAutoReset(CounterEnv(threshold=2.0), episode_length=2)
    _, second = run_steps(env, [1.0, 1.0])
    assert float(second.done) == 1.0
    assert float(second.info["termination"]) == 1.0
    assert float(second.info["truncation"]) == 0.0


def test_state_structure_is_stable_under_vmap_and_scan():
    env = TimeLimitAutoReset(CounterEnv(threshold=3.0), episode_length=4)
    reset_state = env.reset(KEY)
    stepped = env.step(reset_state, ONE)
    assert jax.tree_util.tree_structure(reset_state) == jax.tree_util.tree_structure(stepped)
    for before, after in zip(
        jax.tree_util.tree_leaves(reset_state), jax.tree_util.tree_leaves(stepped), strict=True
    ):
        assert before.shape == after.shape and before.dtype == after.dtype

    batch, horizon = 3, 7
    states = jax.vmap(env.reset)(jax.random.split(KEY, batch))
    actions = jnp.ones((horizon, batch, 1))

    def body(state, action):
        next_state = jax.vmap(env.step)(state, action)
        return next_state, (next_state.done, next_state.info["steps"])

    final, (dones, steps) = jax.jit(lambda s: jax.lax.scan(body, s, actions))(states)
    # Terminates every 3 steps (x = 1, 2, 3): done at steps 3 and 6.
    np.testing.assert_array_equal(dones[:, 0], [0, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(steps[:, 0], [1, 2, 0, 1, 2, 0, 1])
    assert final.obs.shape == (batch, 1)


def test_gradient_flows_within_an_episode():
    env = TimeLimitAutoReset(CounterEnv(threshold=100.0), episode_length=10)

    def total_reward(actions):  # actions [2, 1]; reward_t = x_t = sum of actions so far
        state = env.reset(KEY)
        total = 0.0
        for action in actions:
            state = env.step(state, action)
            total = total + state.reward
        return total

    grads = jax.grad(total_reward)(jnp.full((2, 1), 0.5))
    np.testing.assert_allclose(grads[:, 0], [2.0, 1.0])


def test_gradient_is_zero_across_an_auto_reset():
    env = TimeLimitAutoReset(CounterEnv(threshold=100.0), episode_length=2)

    def third_reward(actions):  # episode 1: steps 1-2; step 3 starts again from x = 0
        state = env.reset(KEY)
        for action in actions:
            state = env.step(state, action)
        return state.reward

    grads = jax.grad(third_reward)(jnp.full((3, 1), 0.5))
    np.testing.assert_allclose(grads[:, 0], [0.0, 0.0, 1.0])
    # The terminal observation still depends on the episode's actions.
    terminal = jax.grad(
        lambda a: env.step(env.step(env.reset(KEY), a[0]), a[1]).info["terminal_obs"][0]
    )(jnp.full((2, 1), 0.5))
    np.testing.assert_allclose(terminal[:, 0], [1.0, 1.0])


@pytest.mark.parametrize("max_norm", [0.5, 1.5, 2.5, 1e30])
def test_state_gradient_clip_is_the_plain_loop_of_clipped_cotangents(max_norm):
    """``J = sum_t x_t`` over 4 steps of ``x_t = x_(t-1) + a_t``. The cotangent reaching the
    state ``x_t`` from the steps after it is ``g_t = min(c, 1 + g_(t+1))`` (``g_4 = 0``), and
    ``dJ/da_t = 1 + g_t``: the recursion written as a plain loop. Values are unchanged."""
    from diffpg.envs.wrappers import StateGradientClip

    steps = 4
    clipped = TimeLimitAutoReset(StateGradientClip(CounterEnv(threshold=100.0), max_norm),
                                 episode_length=10)
    plain = TimeLimitAutoReset(CounterEnv(threshold=100.0), episode_length=10)

    def total_reward(env, actions):
        state, total = env.reset(KEY), 0.0
        for action in actions:
            state = env.step(state, action)
            total = total + state.reward
        return total

    actions = jnp.full((steps, 1), 0.5)
    cotangent, expected = 0.0, []
    for _ in range(steps):  # t = 4, 3, 2, 1
        expected.insert(0, 1.0 + cotangent)
        cotangent = min(max_norm, 1.0 + cotangent)
    value, grads = jax.value_and_grad(lambda a: total_reward(clipped, a))(actions)
    np.testing.assert_allclose(grads[:, 0], expected, rtol=1e-6)
    assert value == total_reward(plain, actions)
    if max_norm > steps:
        np.testing.assert_array_equal(grads, jax.grad(lambda a: total_reward(plain, a))(actions))


def test_state_gradient_clip_scales_every_leaf_by_one_factor():
    """The clip is one global norm over the state's floating-point leaves (an integer leaf's
    cotangent passes as it is): each leaf of the cotangent is scaled by the same factor."""
    from diffpg.envs.wrappers import clip_cotangent

    tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(4.0), "n": jnp.array(2, jnp.int32)}

    def f(t):
        clipped = clip_cotangent(t, 1.0)
        return jnp.sum(clipped["a"] * jnp.array([1.0, 0.0]) * t["a"]) + clipped["b"] * t["b"] / 2

    grads = jax.grad(f, allow_int=True)(tree)
    # the cotangent at the clip is (a: [3, 0], b: 2), norm sqrt(13), scaled by 1 / sqrt(13);
    # the direct paths add (a: [3, 0], b: 2) unclipped
    scale = 1.0 / np.sqrt(13.0)
    np.testing.assert_allclose(grads["a"], [3.0 + 3.0 * scale, 0.0], rtol=1e-6)
    np.testing.assert_allclose(grads["b"], 2.0 + 2.0 * scale, rtol=1e-6)


@pytest.mark.parametrize("max_norm", [-1.0, float("nan"), float("inf"), "x"])
def test_a_bad_state_gradient_clip_is_refused(max_norm):
    with pytest.raises(envs.SettingError, match="state_gradient_clip"):
        envs.make("pendulum", state_gradient_clip=max_norm)
    with pytest.raises(envs.SettingError, match="state_gradient_clip"):
        envs.check("pendulum", state_gradient_clip=max_norm)


def test_wrapper_properties_and_bad_episode_length():
    raw = CounterEnv()
    env = TimeLimitAutoReset(raw, 7)
    assert env.episode_length == 7
    assert env.observation_size == 1 and env.action_size == 1
    assert env.unwrapped is raw and env.env is raw
    for bad in (0, -3):
        with pytest.raises(ValueError, match="episode_length"):
            TimeLimitAutoReset(raw, bad)


# ---------------------------------------------------------------- registry


def test_names_lists_analytic_and_brax():
    all_names = envs.names()
    for name in ("lqr", "pendulum", "cartpole_swingup", "contact", "ant", "inverted_pendulum"):
        assert name in all_names


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError, match="no_such_env") as error:
        envs.make("no_such_env")
    assert "lqr" in str(error.value) and "ant" in str(error.value)


@pytest.mark.parametrize("name", ["lqr", "pendulum", "cartpole_swingup", "contact"])
def test_backend_for_analytic_env_is_rejected(name):
    with pytest.raises(ValueError, match="backend"):
        envs.make(name, backend="spring")


@pytest.mark.parametrize("episode_length", [0, -1])
def test_bad_episode_length_is_rejected(episode_length):
    with pytest.raises(ValueError, match="episode_length"):
        envs.make("lqr", episode_length=episode_length)
    with pytest.raises(ValueError, match="episode_length"):
        envs.make("ant", episode_length=episode_length)


def test_bad_brax_backend_is_rejected_quickly():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="backend='warp'") as error:
        envs.make("ant", backend="warp")
    assert "generalized" in str(error.value)
    with pytest.raises(ValueError, match="backend='spring'"):
        envs.make("swimmer", backend="spring")
    assert time.perf_counter() - start < 1.0  # nothing built or compiled


def test_make_analytic_env_if_available():
    analytic = pytest.importorskip("diffpg.envs.analytic")
    env = envs.make("lqr", episode_length=5)
    assert isinstance(env, TimeLimitAutoReset)
    assert isinstance(env.unwrapped, analytic.LinearQuadratic)
    assert env.episode_length == 5
    assert envs.make("lqr").episode_length == analytic.LinearQuadratic.default_episode_length


# ---------------------------------------------------------------- Brax smoke test


# ~17 s on 2 idle CPU cores with the spring backend (not marked slow); minutes under load.
@pytest.mark.slow
def test_brax_inverted_pendulum_steps_and_differentiates():
    from diffpg.envs.brax_envs import DEFAULT_BACKEND, DEFAULT_EPISODE_LENGTH

    env = envs.make("inverted_pendulum")
    assert env.unwrapped.backend == DEFAULT_BACKEND["inverted_pendulum"]
    assert env.episode_length == DEFAULT_EPISODE_LENGTH["inverted_pendulum"]
    assert (env.observation_size, env.action_size) == (4, 1)

    def objective(actions):  # actions [4, 1]
        state = env.reset(KEY)

        def body(state, action):
            state = env.step(state, action)
            return state, state.reward

        final, rewards = jax.lax.scan(body, state, actions)
        # inverted_pendulum's reward is 1 per step, so add the final pole state to test dynamics.
        return jnp.sum(rewards) + jnp.sum(final.obs**2), (final, rewards)

    actions = jnp.full((4, 1), 0.1)
    grads, (final, rewards) = jax.jit(jax.grad(objective, has_aux=True))(actions)
    assert final.obs.shape == (4,)
    assert bool(jnp.all(jnp.isfinite(rewards)))
    assert bool(jnp.all(jnp.isfinite(grads)))
    assert float(jnp.max(jnp.abs(grads))) > 0.0
    np.testing.assert_array_equal(final.info["steps"], 4)


def test_mujoco_warnings_go_to_the_log_not_the_console(caplog):
    """MuJoCo's compiler deprecation notes are debug lines; anything else it warns about (e.g.
    an unstable simulation) stays a warning; nothing is written to MUJOCO_LOG.TXT."""
    import logging

    import mujoco

    assert mujoco.get_mju_user_warning() is envs._mujoco_warning
    with caplog.at_level(logging.DEBUG, logger="mujoco"):
        envs._mujoco_warning("compiler attribute 'settotalmass' is deprecated")
        envs._mujoco_warning("Nan, Inf or huge value in QACC at DOF 0")
    assert [record.levelno for record in caplog.records] == [logging.DEBUG, logging.WARNING]
