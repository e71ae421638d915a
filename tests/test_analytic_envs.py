"""Tests for the analytic environments in ``diffpg.envs.analytic`` and the exact LQR returns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffpg.envs.analytic import (
    CartPoleSwingUp,
    Curling,
    DoublePendulum,
    LinearQuadratic,
    PendulumSwingUp,
    WallContact,
    lqr_expected_return,
    lqr_q_value,
    lqr_value,
)
from jax.flatten_util import ravel_pytree

ENV_FACTORIES = {
    "lqr": LinearQuadratic,
    "pendulum": PendulumSwingUp,
    "cartpole_swingup": CartPoleSwingUp,
    "contact_penalty": WallContact,
    "contact_rigid": lambda: WallContact(contact_model="rigid"),
    "double_pendulum": DoublePendulum,
    "curling": lambda: Curling(init_noise=0.05),
}

# A stabilising linear-Gaussian policy for the default LQR env: u = K x + b + std * eps.
GAIN = np.array([[-1.0, -1.5]])
BIAS = np.array([0.2])
STD = np.array([0.5])
DISCOUNT = 0.95


def rollout(env, state, actions):
    """Scan ``env.step`` over ``actions [T, action_size]``; returns (states, rewards [T])."""

    def one_step(carry, action):
        next_state = env.step(carry, action)
        return next_state, (next_state, next_state.reward)

    _, (states, rewards) = jax.lax.scan(one_step, state, actions)
    return states, rewards


def policy_rollout_return(
    env, key, gain, bias, std, horizon, discount, state=None, first_action=None
):
    """Discounted return of one rollout of the linear-Gaussian policy on an LQR env.

    Starts from ``env.reset`` (or ``state``); ``first_action`` replaces the policy's first
    action when given.
    """
    reset_key, noise_key = jax.random.split(key)
    if state is None:
        state = env.reset(reset_key)
    noise = jax.random.normal(noise_key, (horizon, env.action_size))

    def one_step(carry, inputs):
        state, weight = carry
        t, eps = inputs
        action = gain @ state.obs + bias + std * eps
        if first_action is not None:
            action = jnp.where(t == 0, first_action, action)
        state = env.step(state, action)
        return (state, weight * discount), weight * state.reward

    _, rewards = jax.lax.scan(one_step, (state, 1.0), (jnp.arange(horizon), noise))
    return jnp.sum(rewards)


def mean_and_standard_error(samples):
    samples = np.asarray(samples, dtype=np.float64)
    return samples.mean(), samples.std(ddof=1) / np.sqrt(samples.size)


# --------------------------------------------------------------------------------------------
# (a) The contract: shapes, jit, vmap, finite values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ENV_FACTORIES))
def test_reset_step_contract(name):
    env = ENV_FACTORIES[name]()
    state = jax.jit(env.reset)(jax.random.key(0))
    assert state.obs.shape == (env.observation_size,)
    assert state.reward.shape == () and state.done.shape == ()
    assert state.obs.dtype == state.reward.dtype == state.done.dtype == jnp.float32
    assert float(state.done) == 0.0

    next_state = jax.jit(env.step)(state, jnp.zeros(env.action_size))
    assert jax.tree.structure(next_state) == jax.tree.structure(state)
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(next_state), strict=True):
        assert before.shape == after.shape and before.dtype == after.dtype

    keys = jax.random.split(jax.random.key(1), 8)

    def random_rollout(key):  # vmapped over keys below: vmaps reset and step
        reset_key, action_key = jax.random.split(key)
        actions = jax.random.uniform(action_key, (50, env.action_size), minval=-1, maxval=1)
        states, rewards = rollout(env, env.reset(reset_key), actions)
        return states.obs, rewards, states.done

    obs, rewards, done = jax.jit(jax.vmap(random_rollout))(keys)
    assert obs.shape == (8, 50, env.observation_size) and rewards.shape == (8, 50)
    assert np.all(np.isfinite(obs)) and np.all(np.isfinite(rewards))
    assert np.all(np.asarray(done) == 0.0)
    # Different keys give different starts (every env has a random start by default).
    assert not np.allclose(obs[0, 0], obs[1, 0])


def test_bad_action_shape_raises():
    env = PendulumSwingUp()
    with pytest.raises(ValueError, match="action"):
        env.step(env.reset(jax.random.key(0)), jnp.zeros(2))
    with pytest.raises(ValueError, match="physical_state"):
        env.init_state(jnp.zeros(3))


# --------------------------------------------------------------------------------------------
# (b) Pathwise gradients through rollouts equal finite differences (float64)
# --------------------------------------------------------------------------------------------

# (env name, start state or None for env.reset, number of steps). The contact starts put the
# mass next to the wall moving towards it, so the rollouts hit the wall.
GRADIENT_CASES = {
    "lqr": (None, 10),
    "pendulum": (None, 15),
    "cartpole_swingup": (None, 15),
    "contact_penalty": ([0.95, 2.0], 15),
    # The rigid bounce is discontinuous, but a small perturbation of the actions does not
    # change the step at which it happens (almost surely), so the pathwise derivative still
    # equals the finite difference here; it just ignores the jump (Suh et al.'s bias).
    "contact_rigid": ([0.95, 2.0], 15),
    "double_pendulum": (None, 15),
    # Starts in contact with the stone moving towards the pusher: the contact engages and ends.
    "curling": ([0.0, 1.0, 0.0, -0.5], 30),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_CASES))
def test_rollout_gradient_matches_finite_differences(name):
    start, horizon = GRADIENT_CASES[name]
    with jax.enable_x64(True):
        env = ENV_FACTORIES[name]()
        if start is None:
            state = env.reset(jax.random.key(3))
        else:
            state = env.init_state(jnp.asarray(start, dtype=jnp.float64))
        assert state.obs.dtype == jnp.float64
        actions = jax.random.uniform(
            jax.random.key(4),
            (horizon, env.action_size),
            dtype=jnp.float64,
            minval=-0.5,
            maxval=0.5,
        )

        def total_reward(action_sequence):
            return jnp.sum(rollout(env, state, action_sequence)[1])

        gradient = jax.jit(jax.grad(total_reward))(actions)
        eps = 1e-6
        directions = jnp.eye(actions.size, dtype=jnp.float64).reshape((-1, *actions.shape))
        batched_total = jax.jit(jax.vmap(total_reward))
        finite_difference = (
            batched_total(actions + eps * directions) - batched_total(actions - eps * directions)
        ) / (2 * eps)
        finite_difference = np.asarray(finite_difference).reshape(actions.shape)

        assert gradient.dtype == jnp.float64
        scale = np.abs(finite_difference).max()
        assert scale > 0
        np.testing.assert_allclose(gradient, finite_difference, rtol=1e-5, atol=1e-6 * scale)

        if name.startswith("contact"):  # the case really exercises the wall
            positions = rollout(env, state, actions)[0].pipeline_state[:, 0]
            assert np.any(positions > env.wall) or name == "contact_rigid"
            assert np.any(np.diff(np.sign(np.diff(positions))) != 0)  # turned around
        if name == "curling":  # the contact engages and releases within the horizon
            x = rollout(env, state, actions)[0].pipeline_state
            gaps = np.concatenate([[1.0], np.asarray(x[:, 1] - x[:, 0])])
            assert np.any(gaps < 1.0) and gaps[-1] > 1.0


# --------------------------------------------------------------------------------------------
# (c) Exact LQR returns, values and action values
# --------------------------------------------------------------------------------------------


def _random_lqr():
    """A 3-state, 2-action stable system with coupled, non-diagonal costs."""
    rng = np.random.default_rng(0)
    a = 0.9 * np.eye(3) + 0.1 * rng.standard_normal((3, 3))
    b = 0.3 * rng.standard_normal((3, 2))
    lq = rng.standard_normal((3, 3))
    lr = rng.standard_normal((2, 2))
    env = LinearQuadratic(
        A=a,
        B=b,
        Q=lq @ lq.T / 3,
        R=lr @ lr.T / 10 + 0.05 * np.eye(2),
        init_mean=[1.0, -0.5, 0.3],
        init_std=[0.3, 0.2, 0.4],
    )
    policy = (0.2 * rng.standard_normal((2, 3)), np.array([0.1, -0.2]), np.array([0.3, 0.6]))
    return env, policy


@pytest.mark.parametrize("system", ["default", "random_3x2_given_start"])
def test_lqr_expected_return_matches_monte_carlo(system):
    """Default env from its own start distribution; a 3x2 system from a given N(mean, cov)."""
    if system == "default":
        env, (gain, bias, std) = LinearQuadratic(), (GAIN, BIAS, STD)
        start_mean = start_cov = None
    else:
        env, (gain, bias, std) = _random_lqr()
        start_mean = jnp.array([-0.5, 1.0, 0.2])
        start_cov = jnp.array([[0.2, 0.05, 0.0], [0.05, 0.1, -0.02], [0.0, -0.02, 0.3]])
    gain, bias, std = (jnp.asarray(v, jnp.float32) for v in (gain, bias, std))
    horizon = env.default_episode_length
    exact = float(
        lqr_expected_return(
            env, gain, bias, std, horizon, DISCOUNT, init_mean=start_mean, init_cov=start_cov
        )
    )

    def one_return(key):
        start_key, key = jax.random.split(key)
        start = None
        if start_mean is not None:
            noise = jax.random.normal(start_key, start_mean.shape)
            start = env.init_state(start_mean + jnp.linalg.cholesky(start_cov) @ noise)
        return policy_rollout_return(env, key, gain, bias, std, horizon, DISCOUNT, state=start)

    keys = jax.random.split(jax.random.key(7), 20_000)
    mean, se = mean_and_standard_error(jax.jit(jax.vmap(one_return))(keys))
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert se < 0.02 * abs(exact)  # the check has teeth


def test_lqr_value_and_q_value_deterministic_policy_match_simulation():
    """With std = 0 everything is deterministic, so the match must be (float32-)exact."""
    env = LinearQuadratic()
    zero_std = jnp.zeros(1)
    x = jnp.array([0.7, -0.3])
    u = jnp.array([0.4])
    steps = 12
    simulated_value = policy_rollout_return(
        env, jax.random.key(0), GAIN, BIAS, zero_std, steps, DISCOUNT, state=env.init_state(x)
    )
    simulated_q = policy_rollout_return(
        env,
        jax.random.key(0),
        GAIN,
        BIAS,
        zero_std,
        steps,
        DISCOUNT,
        state=env.init_state(x),
        first_action=u,
    )
    value = lqr_value(env, GAIN, BIAS, zero_std, x, steps, DISCOUNT)
    q_value = lqr_q_value(env, GAIN, BIAS, zero_std, x, u, steps, DISCOUNT)
    np.testing.assert_allclose(value, simulated_value, rtol=1e-5)
    np.testing.assert_allclose(q_value, simulated_q, rtol=1e-5)
    # Q(x, u) = r(x, u) + discount * V(x'), and x' is what env.step produces.
    next_state = env.step(env.init_state(x), u)
    np.testing.assert_allclose(
        q_value,
        next_state.reward
        + DISCOUNT * lqr_value(env, GAIN, BIAS, zero_std, next_state.obs, steps - 1, DISCOUNT),
        rtol=1e-6,
    )


def test_lqr_q_value_matches_monte_carlo():
    env = LinearQuadratic()
    x = jnp.array([0.7, -0.3])
    u = jnp.array([-0.8])
    steps = 15
    exact = lqr_q_value(env, GAIN, BIAS, STD, x, u, steps, DISCOUNT)
    returns = jax.jit(
        jax.vmap(
            lambda key: policy_rollout_return(
                env, key, GAIN, BIAS, STD, steps, DISCOUNT, state=env.init_state(x), first_action=u
            )
        )
    )(jax.random.split(jax.random.key(9), 20_000))
    mean, se = mean_and_standard_error(returns)
    assert abs(mean - float(exact)) < 4 * se, (mean, se, float(exact))


def test_lqr_value_is_the_policy_average_of_q_value():
    """V(x) = E_{u ~ pi(x)} Q(x, u), checked by sampling u only (the rest is exact)."""
    env = LinearQuadratic()
    x = jnp.array([1.2, 0.4])
    steps = 10
    value = lqr_value(env, GAIN, BIAS, STD, x, steps, DISCOUNT)
    actions = GAIN @ x + BIAS + STD * jax.random.normal(jax.random.key(2), (50_000, 1))
    q_values = jax.jit(
        jax.vmap(lambda u: lqr_q_value(env, GAIN, BIAS, STD, x, u, steps, DISCOUNT))
    )(actions)
    mean, se = mean_and_standard_error(q_values)
    assert abs(mean - float(value)) < 4 * se, (mean, se, float(value))


def test_lqr_value_edge_cases_and_traced_steps_left():
    env = LinearQuadratic()
    x = jnp.array([0.3, 0.1])
    u = jnp.array([0.5])
    assert float(lqr_value(env, GAIN, BIAS, STD, x, 0, DISCOUNT)) == 0.0
    assert float(lqr_q_value(env, GAIN, BIAS, STD, x, u, 0, DISCOUNT)) == 0.0
    # One step left: Q is just the reward of the given action.
    np.testing.assert_allclose(
        lqr_q_value(env, GAIN, BIAS, STD, x, u, 1, DISCOUNT), env.reward_fn(x, u), rtol=1e-6
    )
    # The value of a fixed state equals the expected return from a point mass distribution.
    np.testing.assert_allclose(
        lqr_value(env, GAIN, BIAS, STD, x, 20, DISCOUNT),
        lqr_expected_return(
            env, GAIN, BIAS, STD, 20, DISCOUNT, init_mean=x, init_cov=jnp.zeros((2, 2))
        ),
        rtol=1e-6,
    )
    # steps_left may be traced (e.g. computed from info['steps'] inside a jitted estimator).
    traced_value = jax.jit(lambda n: lqr_value(env, GAIN, BIAS, STD, x, n, DISCOUNT))
    traced_q = jax.jit(lambda n: lqr_q_value(env, GAIN, BIAS, STD, x, u, n, DISCOUNT))
    for steps_left in (0, 1, 7, 20):
        np.testing.assert_allclose(
            traced_value(steps_left),
            lqr_value(env, GAIN, BIAS, STD, x, steps_left, DISCOUNT),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            traced_q(steps_left),
            lqr_q_value(env, GAIN, BIAS, STD, x, u, steps_left, DISCOUNT),
            rtol=1e-6,
        )
    np.testing.assert_allclose(
        lqr_value(env, GAIN, BIAS, STD, x, 30, DISCOUNT, max_steps=40),
        lqr_expected_return(
            env, GAIN, BIAS, STD, 30, DISCOUNT, init_mean=x, init_cov=jnp.zeros((2, 2))
        ),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="max_steps"):
        lqr_value(env, GAIN, BIAS, STD, x, 21, DISCOUNT)
    with pytest.raises(ValueError, match="gain"):
        lqr_expected_return(env, GAIN.T, BIAS, STD, 5, DISCOUNT)


def test_lqr_closed_form_gradients_match_finite_differences():
    with jax.enable_x64(True):
        env, (gain, bias, std) = _random_lqr()
        x = jnp.array([0.5, -0.2, 0.1])
        params = {"gain": gain, "bias": bias, "std": std, "action": [0.3, -0.4]}
        params = {name: jnp.asarray(value, jnp.float64) for name, value in params.items()}

        # lqr_q_value includes lqr_value; its gradient w.r.t. the action is the exact critic
        # gradient an actor-critic estimator would use.
        objectives = {
            "expected_return": lambda p: lqr_expected_return(
                env, p["gain"], p["bias"], p["std"], 20, DISCOUNT
            ),
            "q_value": lambda p: lqr_q_value(
                env, p["gain"], p["bias"], p["std"], x, p["action"], 13, DISCOUNT
            ),
        }
        flat_params, unflatten = ravel_pytree(params)
        eps = 1e-6
        directions = eps * jnp.eye(flat_params.size, dtype=jnp.float64)
        for objective_name, objective in objectives.items():

            @jax.jit
            def gradient_and_finite_difference(flat, objective=objective):
                def flat_objective(flat_):
                    return objective(unflatten(flat_))

                batched = jax.vmap(flat_objective)
                finite_difference = (batched(flat + directions) - batched(flat - directions)) / (
                    2 * eps
                )
                return jax.grad(flat_objective)(flat), finite_difference

            gradient, finite_difference = gradient_and_finite_difference(flat_params)
            assert np.all(gradient != 0) or objective_name == "expected_return"
            np.testing.assert_allclose(
                gradient, finite_difference, rtol=1e-6, atol=1e-8, err_msg=objective_name
            )


# --------------------------------------------------------------------------------------------
# Dynamics checked against independent formulas
# --------------------------------------------------------------------------------------------


def test_cartpole_matches_the_classic_uniform_rod_equations():
    """With I = m l^2 / 3 our Lagrangian equations reduce to Barto/Florian's cart-pole."""
    cart_mass, pole_mass, half_length, g, force_scale, dt = 1.0, 0.1, 0.5, 9.8, 10.0, 0.02
    env = CartPoleSwingUp(
        cart_mass=cart_mass,
        pole_mass=pole_mass,
        pole_com=half_length,
        pole_inertia=pole_mass * half_length**2 / 3,
        gravity=g,
        force_scale=force_scale,
        dt=dt,
        substeps=1,
    )
    x, x_dot, theta, theta_dot, action = 0.1, -0.2, 0.3, 0.5, 0.7
    force = force_scale * action
    total = cart_mass + pole_mass
    temp = (force + pole_mass * half_length * theta_dot**2 * np.sin(theta)) / total
    theta_acc = (g * np.sin(theta) - np.cos(theta) * temp) / (
        half_length * (4.0 / 3.0 - pole_mass * np.cos(theta) ** 2 / total)
    )
    x_acc = temp - pole_mass * half_length * theta_acc * np.cos(theta) / total
    x_dot_next, theta_dot_next = x_dot + dt * x_acc, theta_dot + dt * theta_acc
    expected = [x + dt * x_dot_next, x_dot_next, theta + dt * theta_dot_next, theta_dot_next]

    state = env.step(env.init_state(jnp.array([x, x_dot, theta, theta_dot])), jnp.array([action]))
    np.testing.assert_allclose(state.pipeline_state, expected, rtol=1e-5)
    np.testing.assert_allclose(
        state.obs,
        [expected[0], expected[1], np.sin(expected[2]), np.cos(expected[2]), expected[3]],
        rtol=1e-5,
    )


def test_pendulum_step_and_equilibria():
    env = PendulumSwingUp()
    theta, omega, action = 2.0, -0.5, 0.3
    state = env.step(env.init_state(jnp.array([theta, omega])), jnp.array([action]))
    torque = env.max_torque * action
    omega_next = omega + env.dt * (env.gravity * np.sin(theta) + torque)
    np.testing.assert_allclose(
        state.pipeline_state, [theta + env.dt * omega_next, omega_next], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        state.reward, -((1 - np.cos(theta)) + 0.1 * omega**2 + 0.001 * torque**2), rtol=1e-5
    )
    # Upright and hanging are equilibria; upright at rest has the best possible reward 0.
    for start in ([0.0, 0.0], [np.pi, 0.0]):
        states, rewards = rollout(env, env.init_state(jnp.array(start)), jnp.zeros((20, 1)))
        np.testing.assert_allclose(states.pipeline_state[-1], start, atol=1e-5)
    assert float(rewards[0]) == pytest.approx(-2.0)


# --------------------------------------------------------------------------------------------
# (d) Settings validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "kwargs", "setting"),
    [
        (LinearQuadratic, {"A": [[1.0, 2.0]]}, "A"),
        (LinearQuadratic, {"B": [[1.0, 0.0, 1.0]]}, "B"),
        (LinearQuadratic, {"Q": [[1.0, 1.0], [0.0, 1.0]]}, "Q"),
        (LinearQuadratic, {"R": [[-1.0]]}, "R"),
        (LinearQuadratic, {"init_mean": [1.0, 0.0, 0.0]}, "init_mean"),
        (LinearQuadratic, {"init_std": -0.5}, "init_std"),
        (PendulumSwingUp, {"dt": 0.0}, "dt"),
        (PendulumSwingUp, {"max_torque": -1.0}, "max_torque"),
        (PendulumSwingUp, {"mass": float("nan")}, "mass"),
        (PendulumSwingUp, {"velocity_cost": -0.1}, "velocity_cost"),
        (CartPoleSwingUp, {"substeps": 0}, "substeps"),
        (CartPoleSwingUp, {"substeps": 2.5}, "substeps"),
        (CartPoleSwingUp, {"pole_mass": 0.0}, "pole_mass"),
        (CartPoleSwingUp, {"init_noise": "big"}, "init_noise"),
        (WallContact, {"contact_model": "soft"}, "contact_model"),
        (Curling, {"stiffness": 1e5}, "stiffness"),  # unstable at dt = 0.005
        (Curling, {"damping": 1.5}, "damping"),
        (Curling, {"mass": 0.0}, "mass"),
        (WallContact, {"stiffness": -1.0}, "stiffness"),
        (WallContact, {"stiffness": 1e6}, "stiffness"),  # unstable at dt = 0.01
        (WallContact, {"start": 2.0}, "start"),
        (WallContact, {"wall": float("inf")}, "wall"),
    ],
)
def test_bad_settings_raise(factory, kwargs, setting):
    with pytest.raises(ValueError, match=setting) as error:
        factory(**kwargs)
    message = str(error.value)
    assert message.startswith(f"{setting}=")
    assert "must be" in message


def test_stiff_wall_is_allowed_with_substeps():
    env = WallContact(stiffness=1e6, substeps=10)
    assert env.stiffness == 1e6


# --------------------------------------------------------------------------------------------
# (e) Contact: stiffness changes behaviour
# --------------------------------------------------------------------------------------------


def _max_penetration(env, steps=100):
    """Push towards the wall at full force from rest 0.2 in front of it."""
    states, _ = rollout(env, env.init_state(jnp.array([0.8, 0.0])), jnp.ones((steps, 1)))
    return float(jnp.max(states.pipeline_state[:, 0] - env.wall)), states


def test_penetration_decreases_with_stiffness():
    stiffnesses = (1e2, 1e3, 1e4)
    depths = [_max_penetration(WallContact(stiffness=k, substeps=4))[0] for k in stiffnesses]
    assert all(stiffer < softer for softer, stiffer in zip(depths, depths[1:], strict=False))
    # Energy balance for a spring wall under the constant force F = 10 N, hit at speed v0 with
    # v0^2 = 2 F * 0.2 / m: k d^2 / 2 = m v0^2 / 2 + F d, so d = (F + sqrt(F^2 + k m v0^2)) / k.
    # (Much stiffer walls need more substeps, and their peak falls between control steps.)
    force, approach_speed_squared = 10.0, 2 * 10.0 * 0.2
    for k, depth in zip(stiffnesses, depths, strict=True):
        predicted = (force + np.sqrt(force**2 + k * approach_speed_squared)) / k
        assert depth == pytest.approx(predicted, rel=0.05)


def test_rigid_wall_reflects_and_never_penetrates():
    depth, states = _max_penetration(WallContact(contact_model="rigid"))
    assert depth <= 0.0
    velocities = np.asarray(states.pipeline_state[:, 1])
    assert np.any(velocities < 0) and np.any(velocities > 0)  # bounced
    # One step that crosses the wall: mirrored position, flipped velocity.
    env = WallContact(contact_model="rigid")
    state = env.step(env.init_state(jnp.array([0.99, 2.0])), jnp.zeros(1))
    np.testing.assert_allclose(state.pipeline_state, [2 * 1.0 - 1.01, -2.0], rtol=1e-5)


def test_penalty_contact_conserves_energy_without_damping():
    """A bounce off an undamped penalty wall returns (almost) the incoming speed."""
    for stiffness in (1e3, 1e4):
        env = WallContact(stiffness=stiffness, substeps=2)
        states, _ = rollout(env, env.init_state(jnp.array([0.9, 1.0])), jnp.zeros((60, 1)))
        final_velocity = float(states.pipeline_state[-1, 1])
        assert final_velocity == pytest.approx(-1.0, rel=0.05)
        damped = WallContact(stiffness=stiffness, substeps=2, damping=20.0)
        states, _ = rollout(damped, damped.init_state(jnp.array([0.9, 1.0])), jnp.zeros((60, 1)))
        assert -1.0 < float(states.pipeline_state[-1, 1]) < -0.05


# --------------------------------------------------------------------------------------------
# (e) Double pendulum and Lyapunov exponents
# --------------------------------------------------------------------------------------------


def test_double_pendulum_conserves_energy_unforced():
    """No torque, no friction: the energy drifts only by the integrator's error, which falls as
    the substeps grow (semi-implicit Euler is first order), and the rods move."""
    drifts = []
    with jax.enable_x64(True):
        for substeps in (4, 64):
            env = DoublePendulum(substeps=substeps, init_noise=0.0)
            start = env.reset(jax.random.key(0))
            states, _ = rollout(env, start, jnp.zeros((100, 2)))
            energies = jax.vmap(env.energy)(states.pipeline_state)
            drifts.append(float(jnp.max(jnp.abs(energies - env.energy(start.pipeline_state)))))
            assert float(jnp.ptp(states.pipeline_state[:, 1])) > 1.0
    assert drifts[1] < drifts[0] / 4  # 16x the substeps: at least 4x less error
    assert drifts[1] < 0.05 * abs(float(DoublePendulum().energy(jnp.array(
        [jnp.pi / 2, jnp.pi / 2, 0.0, 0.0]))) + 1.0)


def test_double_pendulum_at_rest_hanging_stays_and_torque_accelerates():
    env = DoublePendulum()
    hanging = env.init_state(jnp.zeros(4))
    assert np.allclose(env.step(hanging, jnp.zeros(2)).pipeline_state, 0.0)
    # A shoulder torque alone turns rod 1 forward; rod 2 lags (it turns back relative to it).
    pushed = env.step(hanging, jnp.array([1.0, 0.0])).pipeline_state
    assert pushed[2] > 0 and pushed[3] < pushed[2]
    assert float(env.step(env.init_state(jnp.array([jnp.pi, jnp.pi, 0.0, 0.0])),
                          jnp.zeros(2)).reward) == pytest.approx(0.0, abs=1e-6)


def test_lyapunov_exponent_of_a_linear_map_is_its_log_spectral_radius():
    """``x' = A x`` (symmetric, eigenvalues 1.1 and 0.5): the renormalised growths telescope to
    ``log |A^T v_0| / (T dt)`` exactly (float64), which tends to ``log(1.1) / dt``; a linear
    map stretches the same from any state, so the trajectory starts at 0."""
    from diffpg.dynamics import largest_lyapunov_exponent, step_jacobians

    rotation = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    matrix = rotation @ np.diag([1.1, 0.5]) @ rotation.T
    dt, steps, start = 0.1, 200, np.array([1.0, 0.0])
    with jax.enable_x64(True):
        def step(x, action):
            return jnp.asarray(matrix) @ x + action

        actions = jnp.zeros((steps, 2))
        exponent = float(largest_lyapunov_exponent(step, jnp.zeros(2), actions, dt,
                                                   direction=jnp.asarray(start)))
        telescoped = np.log(np.linalg.norm(np.linalg.matrix_power(matrix, steps) @ start))
        assert exponent == pytest.approx(telescoped / (steps * dt), rel=1e-10)
        assert exponent == pytest.approx(np.log(1.1) / dt, rel=1e-2)
        states, jacobians = step_jacobians(step, jnp.asarray(start), actions[:3])
        assert states.shape == (4, 2) and jacobians.shape == (3, 2, 2)
        np.testing.assert_allclose(jacobians[1], matrix, rtol=1e-12)
        np.testing.assert_allclose(states[3], np.linalg.matrix_power(matrix, 3) @ start,
                                   rtol=1e-12)


def test_the_double_pendulum_is_chaotic_and_the_small_swinging_pendulum_is_not():
    """Released horizontal, the double pendulum's finite-time Lyapunov exponent over 30 s is
    clearly positive in every one of 4 starts (measured 0.6-0.9 per second); a single pendulum
    swinging by 0.3 rad (integrable: perturbations grow linearly, so its finite-time exponent
    falls like log(T) / T) gives about 0.04. The test asks for 5x the pendulum's largest."""
    from diffpg.dynamics import env_step_function, largest_lyapunov_exponent
    double, single = DoublePendulum(), PendulumSwingUp()
    keys = jax.random.split(jax.random.key(5), 4)

    def exponent(env, x0, steps):
        return largest_lyapunov_exponent(env_step_function(env), x0,
                                         jnp.zeros((steps, env.action_size)), env.dt)

    chaotic = jax.vmap(lambda k: exponent(double, double.reset(k).pipeline_state, 1500))(keys)
    regular = jax.vmap(lambda k: exponent(
        single, jnp.array([jnp.pi - 0.3, 0.0]) + 0.01 * jax.random.normal(k, (2,)), 600))(keys)
    assert np.all(np.abs(regular) < 0.2), regular
    assert np.all(chaotic > 5 * np.max(np.abs(regular))), (chaotic, regular)


def test_curling_contact_conserves_momentum_and_pushes_the_stone():
    """Without damping and force the contact only exchanges momentum (equal masses: the pusher
    stops and the stone leaves with its speed, up to the contact's finite duration), and a
    steady push moves the stone forward further with a stiffer contact engaged sooner."""
    with jax.enable_x64(True):
        env = Curling(damping=1.0, action_cost=0.0)
        start = env.init_state(jnp.array([-0.5, 1.0, 1.0, 0.0]))
        states, _ = rollout(env, start, jnp.zeros((200, 1)))
        x = np.asarray(states.pipeline_state)
        momentum = env.mass * (x[:, 2] + x[:, 3])
        np.testing.assert_allclose(momentum, env.mass * 1.0, rtol=1e-9)
        assert x[-1, 3] == pytest.approx(1.0, abs=0.02) and abs(x[-1, 2]) < 0.02
    pushed = [float(rollout(Curling(stiffness=k), Curling(stiffness=k).reset(jax.random.key(0)),
                            jnp.full((100, 1), 0.5))[0].pipeline_state[-1, 1])
              for k in (10.0, 1000.0)]
    assert 1.0 < pushed[0] < pushed[1]
