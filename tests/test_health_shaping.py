"""``diffpg.envs.HealthShaping``: the differentiable warning of a fall, exact in its formula, zero far
from the healthy ranges' boundaries, and refused where an env does not end on a fall; likewise
``diffpg.envs.SoftTermination``'s probability of going on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffpg.envs.core import Environment

from diffpg import envs
from diffpg.training import settings_for


class _Margins(Environment):
    """A stand-in env whose health margins are the state's observation."""

    ends_on_a_fall = True
    observation_size = action_size = default_episode_length = 3

    def health_margins(self, state):
        return state

    def reset(self, key):  # pragma: no cover - not used
        raise NotImplementedError

    def step(self, state, action):  # pragma: no cover - not used
        raise NotImplementedError


def test_penalty_is_the_documented_quadratic_and_zero_beyond_the_tolerance():
    shaping = envs.HealthShaping(_Margins(), weight=2.0, tolerance=0.1)
    margins = jnp.array([0.5, 0.05, -0.02])  # far, inside the tolerance, past the boundary
    expected = 2.0 * ((0.05 / 0.1) ** 2 + (0.12 / 0.1) ** 2)
    assert float(shaping.penalty(margins)) == pytest.approx(expected, rel=1e-6)
    gradient = jax.grad(shaping.penalty)(margins)
    # d/dm 2 ((0.1 - m) / 0.1)^2 = -4 (0.1 - m) / 0.01; 0 where the margin exceeds 0.1.
    np.testing.assert_allclose(gradient, [0.0, -4 * 0.05 / 0.01, -4 * 0.12 / 0.01], rtol=1e-5)


def test_hopper_margins_and_an_upright_hopper_is_not_penalised():
    """At a reset the hopper stands 1.25 m high (minimum 0.7) with its pitch near 0 (range
    +-0.2): margins about (0.55, 0.2, 0.2), every one beyond the tolerance, so the shaped and
    the task's rewards of the first step agree."""
    key = jax.random.PRNGKey(0)
    shaped, plain = envs.make("hopper", health_shaping=2.0), envs.make("hopper")
    state = shaped.reset(key)
    margins = shaped.unwrapped.health_margins(state)
    np.testing.assert_allclose(margins, [0.55, 0.2, 0.2], atol=0.02)
    assert shaped.unwrapped.health_bound_names() == ("height_low", "pitch_low", "pitch_high")
    action = jnp.zeros(shaped.action_size)
    after, reference = jax.jit(shaped.step)(state, action), jax.jit(plain.step)(
        plain.reset(key), action)
    assert float(after.reward) == pytest.approx(float(reference.reward), abs=1e-6)
    assert float(after.metrics["health_shaping"]) == 0.0


@pytest.mark.parametrize("make", [
    lambda: envs.make("halfcheetah", health_shaping=1.0),
    lambda: envs.make("pendulum", health_shaping=1.0),
    lambda: envs.check("halfcheetah", health_shaping=1.0),
    lambda: envs.HealthShaping(_Margins(), weight=-1.0),
    lambda: settings_for(env="cartpole_swingup", health_shaping=1.0),
    lambda: settings_for(env="hopper", health_shaping=float("nan")),
])
def test_shaping_where_nothing_falls_or_with_a_bad_weight_is_refused(make):
    with pytest.raises(ValueError, match="health_shaping="):
        make()


def test_anticipated_margin_is_measured_at_the_torsos_ballistic_apex():
    """The ant's torso rising at v_z will top out v_z^2 / 2g higher: the margin below its
    maximum height (1.0 m) is measured there; falling or at rest, the apex is where it is."""
    ant = envs.make_raw("ant")
    state = ant.reset(jax.random.PRNGKey(0))
    height = float(state.pipeline_state.x.pos[0, 2])

    def with_vertical_velocity(v_z):
        velocity = state.pipeline_state.xd.vel.at[0, 2].set(v_z)
        return state.replace(pipeline_state=state.pipeline_state.replace(
            xd=state.pipeline_state.xd.replace(vel=velocity)))

    rising, falling = with_vertical_velocity(2.0), with_vertical_velocity(-2.0)
    np.testing.assert_allclose(ant.health_margins(rising, anticipate_jumps=True),
                               [height - 0.2, 1.0 - (height + 2.0**2 / (2 * 9.81))], rtol=1e-5)
    np.testing.assert_allclose(ant.health_margins(falling, anticipate_jumps=True),
                               ant.health_margins(falling), rtol=1e-6)
    np.testing.assert_allclose(ant.health_margins(rising), [height - 0.2, 1.0 - height],
                               rtol=1e-6)
    assert ant.health_bound_names() == ("height_low", "height_high")
    # Compiled as training compiles it (the model's arrays are traced there), the shaped step
    # gives the reward of the eager one.
    shaped = envs.make("ant", health_shaping=2.0, anticipate_jumps=True)
    start, action = shaped.reset(jax.random.PRNGKey(1)), jnp.full(shaped.action_size, 0.5)
    assert float(jax.jit(shaped.step)(start, action).reward) == pytest.approx(
        float(shaped.step(start, action).reward), abs=1e-4)
    # The warning's gradient reaches the take-off velocity: d margin / d v_z = -v_z / g.
    gradient = jax.grad(lambda v: ant.health_margins(with_vertical_velocity(v),
                                                     anticipate_jumps=True)[1])(2.0)
    assert float(gradient) == pytest.approx(-2.0 / 9.81, rel=1e-5)


def test_anticipate_jumps_reaches_the_margins_and_needs_health_shaping():
    class _Asked(_Margins):
        def health_margins(self, state, anticipate_jumps=False):
            return state - jnp.array([0.0, 1.0 if anticipate_jumps else 0.0])

    margins = jnp.array([0.5, 1.05])
    plain = envs.HealthShaping(_Asked(), weight=2.0)
    anticipating = envs.HealthShaping(_Asked(), weight=2.0, anticipate_jumps=True)
    assert float(plain.penalty(margins)) == 0.0
    # float32: 1.05 - 1.0 carries an error of ~1.2e-7 on 0.05 (2.4e-6 relative), doubled by the
    # square.
    assert float(anticipating.penalty(margins)) == pytest.approx(2.0 * (0.05 / 0.1) ** 2,
                                                                  rel=1e-5)
    for make in (lambda: envs.check("ant", anticipate_jumps=True),
                 lambda: envs.make("ant", anticipate_jumps=True),
                 lambda: settings_for(env="ant", anticipate_jumps=True),
                 lambda: envs.HealthShaping(_Margins(), weight=1.0, anticipate_jumps="yes")):
        with pytest.raises(ValueError, match="anticipate_jumps="):
            make()
    for make in (lambda: settings_for(env="ant", health_tolerance=0.2),
                 lambda: settings_for(env="ant", health_shaping=1.0, health_tolerance=0.0),
                 lambda: envs.make("ant", health_shaping=1.0, health_tolerance=float("inf"))):
        with pytest.raises(ValueError, match="health_tolerance="):
            make()


def test_training_shapes_with_the_runs_weight_tolerance_and_anticipation():
    from diffpg.training import make_trainer

    trainer = make_trainer(settings_for(env="ant", health_shaping=2.0, anticipate_jumps=True,
                                        health_tolerance=0.25, num_envs=2, updates=1,
                                        updates_per_call=1))
    shaping = trainer.env.env
    assert isinstance(shaping, envs.HealthShaping)
    assert (shaping.weight, shaping.tolerance, shaping.anticipate_jumps) == (2.0, 0.25, True)


def test_survival_probability_is_the_product_of_sigmoids_of_the_margins():
    soft = envs.SoftTermination(_Margins(), width=0.05)
    margins = jnp.array([0.5, 0.05, -0.02])
    expected = np.prod(1.0 / (1.0 + np.exp(-np.array([0.5, 0.05, -0.02]) / 0.05)))
    assert float(soft.probability(margins)) == pytest.approx(expected, rel=1e-5)
    # d log p / d m_i = sigmoid(-m_i / width) / width: largest at the bound, ~0 far inside it
    gradient = jax.grad(lambda m: jnp.log(soft.probability(m)))(margins)
    np.testing.assert_allclose(
        gradient, 1.0 / (1.0 + np.exp(np.array([0.5, 0.05, -0.02]) / 0.05)) / 0.05, rtol=1e-4)


def test_hopper_records_its_survival_probability_and_the_estimators_read_it():
    from diffpg.acting import unroll
    from diffpg.normalization import init_statistics
    from diffpg.policy import make_linear_gaussian_policy

    env = envs.make("hopper", soft_termination=0.02)
    state = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(0), 2))
    np.testing.assert_array_equal(state.info["survival_probability"], [1.0, 1.0])
    policy = make_linear_gaussian_policy(env.observation_size, env.action_size)
    params = policy.init(jax.random.PRNGKey(1))
    _, tr = unroll(env, policy, params, init_statistics(env.observation_size), state,
                   jax.random.PRNGKey(2), 2)
    # upright: margins (0.55, 0.2, 0.2) at a 0.02 width, each sigmoid 1 - e^-10 or closer
    assert tr.survival_probability.shape == (2, 2)
    np.testing.assert_allclose(tr.survival_probability, 1.0, atol=1e-3)
    assert unroll(envs.make("hopper"), policy, params, init_statistics(env.observation_size),
                  jax.vmap(envs.make("hopper").reset)(jax.random.split(jax.random.PRNGKey(0), 2)),
                  jax.random.PRNGKey(2), 1)[1].survival_probability is None


@pytest.mark.parametrize(("make", "setting"), [
    (lambda: envs.make("halfcheetah", soft_termination=0.05), "soft_termination="),
    (lambda: envs.check("pendulum", soft_termination=0.05), "soft_termination="),
    (lambda: envs.SoftTermination(_Margins(), width=0.0), "soft_termination="),
    (lambda: settings_for(env="hopper", soft_termination=-1.0), "soft_termination="),
    (lambda: settings_for(env="hopper", estimator="ppo", soft_termination=0.05),
     "soft_termination=0.05 weights a pathwise"),
])
def test_soft_termination_where_nothing_falls_or_with_another_estimator_is_refused(make, setting):
    with pytest.raises(ValueError, match=setting):
        make()


def test_training_weights_survival_and_evaluates_on_the_task():
    from diffpg.training import make_envs

    env, eval_env = make_envs(settings_for(env="hopper", estimator="ahac", soft_termination=0.03,
                                           num_envs=2, updates=1, updates_per_call=1))
    assert isinstance(env.env, envs.SoftTermination) and env.env.width == 0.03
    assert not isinstance(eval_env.env, (envs.SoftTermination, envs.HealthShaping))


def test_anticipated_landing_is_measured_where_the_lowest_body_touches_the_ground():
    """A hopper lifted 0.5 m off its start: the plain margin above Brax's 0.7 m grows by 0.5,
    the anticipated one is the standing hopper's (it lands as it stands); on the ground the
    two agree, and in flight the margin falls one for one as the lowest body rises."""
    hopper = envs.make_raw("hopper")
    state = hopper.reset(jax.random.PRNGKey(0))
    bodies = state.pipeline_state

    def lifted(by):
        positions = bodies.x.pos.at[:, 2].add(by)
        return state.replace(pipeline_state=bodies.replace(x=bodies.x.replace(pos=positions)))

    standing = hopper.health_margins(state)
    np.testing.assert_allclose(hopper.health_margins(state, anticipate_landings=True), standing,
                               atol=0.01)
    in_flight = hopper.health_margins(lifted(0.5))
    assert float(in_flight[0]) == pytest.approx(float(standing[0]) + 0.5, abs=1e-5)
    np.testing.assert_allclose(hopper.health_margins(lifted(0.5), anticipate_landings=True),
                               standing, atol=0.01)

    def landing_margin(foot_height):
        positions = bodies.x.pos.at[:, 2].add(0.5).at[-1, 2].set(foot_height)
        return hopper.health_margins(state.replace(pipeline_state=bodies.replace(
            x=bodies.x.replace(pos=positions))), anticipate_landings=True)[0]

    assert float(jax.grad(landing_margin)(0.3)) == pytest.approx(-1.0)
    shaped = envs.make("hopper", health_shaping=2.0, anticipate_landings=True)
    assert shaped.env.anticipate_landings
    for make in (lambda: envs.make("hopper", anticipate_landings=True),
                 lambda: settings_for(env="ant", anticipate_landings=True),
                 lambda: envs.HealthShaping(_Margins(), weight=1.0, anticipate_landings=1)):
        with pytest.raises(ValueError, match="anticipate_landings="):
            make()


def test_a_run_folder_written_before_the_newest_settings_reads_with_their_defaults(tmp_path):
    import json

    from diffpg.run_files import SETTINGS_ADDED_LATER, load_settings, save_settings

    settings = settings_for(env="hopper", num_envs=2, updates=1, updates_per_call=1)
    save_settings(settings, tmp_path)
    values = json.loads((tmp_path / "settings.json").read_text())
    for name in ("soft_termination", "anticipate_landings", "anticipate_jumps",
                 "health_tolerance"):
        assert name in SETTINGS_ADDED_LATER
        del values[name]
    (tmp_path / "settings.json").write_text(json.dumps(values))
    assert load_settings(tmp_path) == settings
