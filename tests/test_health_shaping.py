"""``envs.HealthShaping``: the differentiable warning of a fall, exact in its formula, zero far
from the healthy ranges' boundaries, and refused where an env does not end on a fall."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from diffpg.training import settings_for
from envs.core import Environment


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
