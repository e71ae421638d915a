"""MJX made differentiable (``diffpg.envs.mjx``) and MuJoCo Playground behind ``diffpg.envs.make``.

Playground comes with the ``playground`` extra, which the README's test command installs: these
tests fail, rather than skip, without it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffpg.envs import mjx, playground
from jax.flatten_util import ravel_pytree

from diffpg import envs, estimators
from diffpg.normalization import init_statistics
from diffpg.policy import make_gaussian_mlp_policy
from diffpg.runs import train
from diffpg.training import settings_for

CHEETAH = "playground:CheetahRun"


# ---------------------------------------------------------------- settings, checked before a build


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "1"])
def test_bad_solver_iterations_name_the_setting(value):
    with pytest.raises(ValueError, match="solver_iterations="):
        envs.check("halfcheetah", backend="mjx", solver_iterations=value)
    with pytest.raises(ValueError, match="solver_iterations="):
        envs.check(CHEETAH, solver_iterations=value)


def test_solver_iterations_belong_to_mjx_only():
    for backend in ("spring", "generalized", None):  # halfcheetah's default is generalized
        with pytest.raises(ValueError, match="backend='mjx' only"):
            envs.make("halfcheetah", backend=backend, solver_iterations=1)
    with pytest.raises(ValueError, match="backend='spring'"):
        envs.make(CHEETAH, backend="spring")


def test_playground_names_and_their_errors(monkeypatch):
    assert playground.installed(), f"MuJoCo Playground is missing: {playground.EXTRA}"
    names = envs.names()
    for task in ("CheetahRun", "HopperHop", "WalkerWalk", "CartpoleSwingup"):
        assert playground.PREFIX + task in names
    with pytest.raises(ValueError, match="'playground:NoSuchTask' is not a Playground"):
        envs.make("playground:NoSuchTask")
    with pytest.raises(ValueError, match="no setting.*'no_such_key'"):
        envs.make_raw(CHEETAH, no_such_key=1)
    with pytest.raises(ValueError, match="impl='warp'"):
        envs.make_raw(CHEETAH, impl="warp")

    # A robot without its Menagerie assets: one line saying where they go, no clone attempted.
    monkeypatch.setattr(playground, "_menagerie_path", lambda: Path("/no/menagerie"))
    with pytest.raises(ValueError, match="MuJoCo Menagerie, not found at /no/menagerie; .*git "
                                         "clone") as error:
        envs.make("playground:Go1JoystickFlatTerrain")
    assert "\n" not in str(error.value)

    # Without Playground: every Playground name says how to install it.
    monkeypatch.setattr(playground, "installed", lambda: False)
    assert not any(name.startswith(playground.PREFIX) for name in envs.names())
    with pytest.raises(ValueError, match=r'needs MuJoCo Playground: pip install -e "\.\[playground\]"'):
        settings_for(env=CHEETAH)


# ---------------------------------------------------------------- MJX gradients


@pytest.mark.parametrize("bounds", [(1.2, np.inf), (-np.inf, 0.5), (-1.0, 1.0), (0.0, 0.0),
                                    (-np.inf, np.inf)])
@pytest.mark.parametrize("sigmoid", ["gaussian", "hyperbolic", "long_tail", "reciprocal",
                                     "cosine", "linear", "quadratic", "tanh_squared"])
@pytest.mark.parametrize("margin", [0.0, 0.6])
def test_playground_tolerance_keeps_its_values_and_gets_a_finite_gradient(bounds, sigmoid,
                                                                          margin):
    """Playground's reward.tolerance, as diffpg installs it: equal values to the original
    everywhere, a finite gradient everywhere, equal to the original's wherever that is finite
    (the original's is NaN inside a half-infinite bound: WalkerWalk's standing reward)."""
    playground._playground()
    from mujoco_playground._src import reward

    original, installed = reward.tolerance.__wrapped__, reward.tolerance
    value_at_margin = 0.0 if sigmoid == "linear" else 0.1
    x = jnp.linspace(-3.0, 3.0, 601)

    def values_and_gradients(function):
        def one(y):
            return function(y, bounds, margin, sigmoid, value_at_margin)
        return np.asarray(jax.vmap(one)(x)), np.asarray(jax.vmap(jax.grad(one))(x))

    (values, gradients), (old_values, old_gradients) = (values_and_gradients(installed),
                                                        values_and_gradients(original))
    np.testing.assert_array_equal(values, old_values)
    assert np.all(np.isfinite(gradients))
    finite = np.isfinite(old_gradients)
    np.testing.assert_array_equal(gradients[finite], old_gradients[finite])
    if bounds == (1.2, np.inf) and sigmoid == "gaussian" and margin:
        assert not finite.all()  # the case the replacement exists for


def test_halfcheetah_on_mjx_is_differentiable_in_reverse_mode_through_16_steps():
    """Brax's halfcheetah model runs MJX's solver for 4 iterations, a while_loop JAX cannot
    differentiate in reverse mode; envs.make sets one iteration. The gradient of the summed
    reward of a linear tanh policy through the raw env (no time limit), from 2 starts, traced
    abstractly (``jax.eval_shape``: reverse mode through a while_loop fails while tracing, so
    nothing needs compiling; compiling it took minutes of the suite). Its values, finite but
    growing about 2x per step, are BENCHMARKS section 2g's."""
    env = envs.make_raw("halfcheetah", backend="mjx")
    assert env.native_solver_iterations > 1
    assert mjx.solver_iterations(env.brax_env.sys) == 1
    starts = jax.eval_shape(jax.vmap(env.reset), jax.random.split(jax.random.PRNGKey(1), 2))

    def summed_reward(weights, starts):  # weights [action, observation]
        def one_step(states, _):
            states = jax.vmap(env.step)(states, jnp.tanh(states.obs @ weights.T))
            return states, states.reward
        _, rewards = jax.lax.scan(one_step, starts, None, length=16)
        return jnp.sum(rewards)

    weights = jnp.zeros((env.action_size, env.observation_size))
    gradient = jax.eval_shape(jax.grad(summed_reward), weights, starts)
    assert gradient.shape == weights.shape and gradient.dtype == weights.dtype


@pytest.fixture(scope="module")
def iterated_mjx_env():
    return envs.make("inverted_pendulum", backend="mjx", solver_iterations=4)


@pytest.mark.parametrize("name", estimators.names())
def test_more_solver_iterations_simulate_but_only_score_function_estimators_run(
        name, iterated_mjx_env):
    """With 4 solver iterations (MJX's while_loop) the step still runs forward: the estimators
    that do not differentiate the physics trace; the others stop with one line naming
    solver_iterations, at trace time (abstract evaluation here: nothing compiles)."""
    env = iterated_mjx_env
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size, hidden_sizes=(8,))
    params = policy.init(jax.random.PRNGKey(0))
    starts = jax.eval_shape(jax.vmap(env.reset), jax.random.split(jax.random.PRNGKey(1), 2))
    estimator = estimators.make(name, env, policy,
                                **estimators.comparison_settings(name, 4, 0.99))
    state = jax.eval_shape(estimator.init, jax.random.PRNGKey(2), params)

    def estimate():
        return jax.eval_shape(estimator.estimate, params, init_statistics(env.observation_size),
                              state, starts, jax.random.PRNGKey(3))

    if name in ("reinforce", "ppo", "critic_backprop"):
        estimate()
    else:
        with pytest.raises(ValueError, match="solver_iterations=4 .*use solver_iterations=1"):
            estimate()


# ---------------------------------------------------------------- Playground


def test_playground_state_follows_the_env_contract():
    """Brax's State with Playground's data as pipeline_state; the time limit is Playground's
    episode length; termination and truncation are split like every other env's."""
    env = envs.make("playground:CartpoleSwingup", episode_length=3)  # the cheapest to compile
    raw = env.unwrapped
    assert raw.default_episode_length == 1000
    assert (env.observation_size, env.action_size) == (5, 1)
    assert mjx.solver_iterations(raw.playground_env.mjx_model) == 1
    state = jax.jit(env.reset)(jax.random.PRNGKey(0))
    assert state.obs.shape == (5,)
    step = jax.jit(env.step)
    for _ in range(3):
        state = step(state, jnp.full(env.action_size, 0.5))
    assert float(state.done) == 1.0
    assert float(state.info["truncation"]) == 1.0 and float(state.info["termination"]) == 0.0
    assert 0.0 <= float(state.info["last_episode_return"]) <= 3.0  # rewards in [0, 1]
    np.testing.assert_array_equal(state.obs, state.info["first_obs"])


@pytest.mark.slow
def test_shac_trains_and_resumes_on_a_playground_env(tmp_path):
    """SHAC updates on Playground's CartpoleSwingup (its cheapest model to compile): finite
    metrics, a checkpoint (MJX's state holds zero-size arrays, which orbax cannot save as they
    are), and a run that resumes from it and changes the policy."""
    settings = settings_for(env="playground:CartpoleSwingup", estimator="shac", num_envs=4,
                            horizon=8, updates=2, updates_per_call=1, eval_envs=2,
                            episode_length=32, hidden_sizes=(16,),
                            estimator_options={"window": 4, "critic_hidden_sizes": (16,)})
    run = tmp_path / "run"
    first = train(settings, run, stop_at_update=1)  # interrupted after the first update
    resumed = train(settings, run, resume=True)
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["update"]) for row in rows] == [1, 2]
    for row in rows:
        assert np.isfinite(float(row["eval/episode_reward"]))
        assert float(row["training/nonfinite_updates"]) == 0.0
    before, after = ravel_pytree(first.params)[0], ravel_pytree(resumed.params)[0]
    assert bool(jnp.all(jnp.isfinite(after))) and not bool(jnp.all(before == after))
