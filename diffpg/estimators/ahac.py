"""AHAC: SHAC with a gradient horizon that adapts to the stiffness of the dynamics (Georgiev et
al., ICML 2024, "Adaptive Horizon Actor-Critic for Policy Learning in Contact-Rich
Differentiable Simulation").

One estimate simulates ``horizon`` steps (the longest gradient horizon ``H_max``) and cuts the
gradient every ``H`` steps, ``horizon_min <= H <= horizon``: each segment of ``H`` steps is a
short-horizon SHAC objective bootstrapped by the critics at its end. With ``w_t`` the
episode-wise discounts (``returns.segment_discounts``) and ``end_t = 1`` at the last step of a
segment, the objective per environment is::

    sum_t w_t r_t  +  sum_t w_t gamma (trunc_t + end_t (1 - done_t)) V(s'_t)

(``segmented_return``): value 0 at true termination, the critics' value of the state reached
(before auto-reset) at a time-limit truncation and at each segment's end. ``V`` is the smallest
of ``critic_members`` value critics, fitted by ``update`` to TD(lambda) targets without a target
network (AHAC's twin critics).

``H`` adapts to the **stiffness** of the dynamics. Each step measures
``c_t = ||(d s'_t / d a_t) v_t||`` along a standard-normal action direction ``v_t`` (one
``jax.jvp`` per step, ``measure_action_sensitivity``): ``E[c_t^2]`` is the squared
Frobenius norm of the dynamics' action Jacobian, the ``||grad f||`` of AHAC's constraint, which
AHAC approximates by contact forces over accelerations. AHAC maximises the objective subject to
the stiffness accumulated along a gradient path staying below a threshold ``C``:
``H c <= C``, with ``c`` the batch's mean ``c_t``. ``update`` takes one dual step
(``adapt_horizon``): with the diminishing value ``log H`` of a longer horizon, the Lagrangian
``log H - phi (H c / C - 1)`` is maximised by ``H = C / (phi c)`` (clipped to the range), and the
multiplier rises while the constraint is violated::

    phi <- max(phi_min, phi + dual_learning_rate (H c / C - 1)),   H <- clip(C / (phi c))

With a constant stiffness the horizon settles at ``clip(C / c)`` (``phi -> 1``, stable for
``dual_learning_rate < 2``). ``stiffness_threshold=None`` calibrates ``C`` on the first batch to
``initial_horizon * c``: the horizon then grows where the dynamics get smoother than at the start
and shrinks where they get stiffer.

Differences from AHAC's code, by design: ``H`` cuts every environment at the same steps (the
scan's shapes are static), and the critics are fitted for a fixed number of passes (SHAC's), not
to early stopping. The estimate is of ``grad J`` itself; the trainer scales it as SHAC's.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffpg import returns
from diffpg.acting import StepHook, unroll
from diffpg.critics import (
    CriticState,
    ValueEnsemble,
    ValueFunction,
    init_critic_state,
)
from diffpg.envs.core import Environment, SettingError, State
from diffpg.estimators.base import (
    Batch,
    Estimate,
    Estimator,
    check_bool,
    check_positive,
    check_positive_int,
)
from diffpg.estimators.registry import register
from diffpg.estimators.shac import (
    EnsembleCriticSettings,
    fit_value_critic,
    make_ensemble_critic,
)
from diffpg.normalization import RunningStatistics, normalize
from diffpg.policy import Params, Policy

SMALLEST_MULTIPLIER = 1e-3
"""``phi_min``: keeps ``C / (phi c)`` finite when the constraint has long been slack."""


@dataclasses.dataclass(frozen=True)
class AhacSettings(EnsembleCriticSettings):
    """Backpropagation through the simulator with a gradient horizon adapted to the dynamics'
    stiffness, bootstrapped by twin value critics (AHAC, Georgiev et al. 2024)."""

    horizon: int = 32
    """Steps simulated per estimate: the longest gradient horizon H_max."""
    horizon_min: int = 8
    """The shortest gradient horizon (AHAC's 8)."""
    initial_horizon: int = 8
    """The gradient horizon before the first update (AHAC starts at its minimum)."""
    adapt: bool = True
    """Adapt the horizon in update; False keeps initial_horizon (comparisons)."""
    stiffness_threshold: float | None = None
    """C: the stiffness allowed along one gradient path (sum of c_t); None calibrates it
    on the first batch to initial_horizon times the mean c_t."""
    dual_learning_rate: float = 0.1
    """Step of the multiplier phi per update (stable below 2)."""
    stiffness_envs: int | None = None
    """Measure the stiffness on the batch's first this many envs (None: all). The measurement
    (a jvp of each step, about 3 forward steps) is a quarter of AHAC's gradient on the hopper;
    fewer envs cost less and make c noisier. The gradient itself does not change."""

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("horizon_min", self.horizon_min)
        check_positive_int("initial_horizon", self.initial_horizon)
        if not self.horizon_min <= self.initial_horizon <= self.horizon:
            raise SettingError(
                f"initial_horizon={self.initial_horizon} must lie in [horizon_min, horizon] = "
                f"[{self.horizon_min}, {self.horizon}]")
        check_bool("adapt", self.adapt)
        if self.stiffness_threshold is not None:
            check_positive("stiffness_threshold", self.stiffness_threshold)
        check_positive("dual_learning_rate", self.dual_learning_rate)
        if self.stiffness_envs is not None:
            check_positive_int("stiffness_envs", self.stiffness_envs)


class AhacState(NamedTuple):
    critic: CriticState
    gradient_horizon: jax.Array  # [] H, a whole number in [horizon_min, horizon]
    multiplier: jax.Array  # [] phi
    stiffness_threshold: jax.Array  # [] C (0 until calibrated)


def adapt_horizon(multiplier: jax.Array, gradient_horizon: jax.Array, stiffness: jax.Array,
                  threshold: jax.Array, settings: AhacSettings) -> tuple[jax.Array, jax.Array]:
    """One dual step of the module docstring: ``(phi, H)`` from the horizon ``H`` the batch was
    simulated with and its mean stiffness ``c`` (``[]`` each). A non-finite or zero ``c``
    leaves both unchanged."""
    usable = jnp.isfinite(stiffness) & (stiffness > 0)
    c = jnp.where(usable, stiffness, 1.0)
    violation = gradient_horizon * c / threshold - 1.0
    new_multiplier = jnp.maximum(SMALLEST_MULTIPLIER,
                                 multiplier + settings.dual_learning_rate * violation)
    new_horizon = jnp.clip(jnp.round(threshold / (new_multiplier * c)),
                           settings.horizon_min, settings.horizon)
    return (jnp.where(usable, new_multiplier, multiplier),
            jnp.where(usable, new_horizon, gradient_horizon))


def segment_ends(gradient_horizon: jax.Array, steps: int) -> jax.Array:
    """``end [steps]``: 1 at the last step of each segment of ``H`` steps (and at the last step)."""
    t = jnp.arange(steps)
    return ((t + 1) % gradient_horizon == 0) | (t == steps - 1)


def segmented_return(reward: jax.Array, done: jax.Array, truncation: jax.Array,
                     next_value: jax.Array, end: jax.Array, discount: float,
                     final_bootstrap: bool, survival_probability: jax.Array | None = None,
                     ) -> tuple[jax.Array, jax.Array]:
    """The objective of the module docstring per environment ``[B]``, and its rewards' part
    ``sum_t w_t r_t`` ``[B]``.

    ``reward``, ``done``, ``truncation``, ``next_value = V(s'_t)`` ``[T, B]``; ``end [T]``: the
    segments' last steps. ``final_bootstrap=False`` (a finite-horizon objective) counts no value
    at the last step. ``survival_probability [T, B]``, if given, weights rewards and values by
    the probability of being alive (``shac.window_return``), restarting at each segment's start.
    """
    weights = returns.segment_discounts(done, discount, jnp.ones(reward.shape[1:]))
    segment_starts = jnp.concatenate([jnp.zeros(1, end.dtype), end[:-1]])
    reward_weights, value_weights = returns.survival_weighted(weights, survival_probability,
                                                              done, segment_starts)
    bootstrap = truncation + end[:, None] * (1.0 - done)
    if not final_bootstrap:
        bootstrap = bootstrap.at[-1].set(0.0)
    rewards = jnp.sum(weights * reward, axis=0)
    weighted_rewards = jnp.sum(reward_weights * reward, axis=0)  # rewards without survival
    return (weighted_rewards + jnp.sum(value_weights * discount * bootstrap * next_value, axis=0),
            rewards)


def measure_action_sensitivity(env: Environment, envs_measured: int | None = None):
    """A ``simulate`` for a ``StepHook``: the batch's environment step, measuring
    ``||(d next_obs / d a) v||`` ``[B]`` along a standard-normal direction ``v`` with one
    ``jax.jvp`` (not differentiated): its square's mean is the squared Frobenius norm of the
    dynamics' action Jacobian, large where contact is stiff. With ``envs_measured`` ``k < B``,
    only the first ``k`` envs are measured (the same directions as for all), the others' entries
    NaN (the update averages the finite ones)."""
    step_batch = jax.vmap(env.step)

    def simulate(state: State, action: jax.Array, key: jax.Array):
        direction = jax.random.normal(jax.random.fold_in(key, 1), action.shape, action.dtype)
        batch = action.shape[0]
        if envs_measured is None or envs_measured >= batch:
            next_state, tangent = jax.jvp(lambda a: step_batch(state, a), (action,), (direction,))
            return next_state, jax.lax.stop_gradient(
                jnp.linalg.norm(tangent.info["terminal_obs"], axis=-1))
        head, head_action = jax.lax.stop_gradient(
            (jax.tree.map(lambda x: x[:envs_measured], state), action[:envs_measured]))
        _, tangent = jax.jvp(lambda a: step_batch(head, a), (head_action,),
                             (direction[:envs_measured],))
        measured = jnp.linalg.norm(tangent.info["terminal_obs"], axis=-1)
        return step_batch(state, action), jnp.full((batch,), jnp.nan, measured.dtype).at[
            :envs_measured].set(measured)

    return simulate


def cut_gradient(cut: jax.Array, state: State) -> State:
    """``state`` with its gradient stopped where ``cut`` (``[]`` or ``[B]``, broadcast on each
    leaf's leading axis) is set: the gradient flows only inside the segments between cuts."""
    def where(x):
        mask = jnp.reshape(cut, cut.shape + (1,) * (x.ndim - cut.ndim))
        return jnp.where(mask, jax.lax.stop_gradient(x), x)

    return jax.tree.map(where, state)


def make_ahac(env: Environment, policy: Policy, settings: AhacSettings = AhacSettings(),
              value_function: ValueFunction | None = None) -> Estimator:
    """Build the AHAC estimator (see the module docstring).

    ``value_function`` replaces the learned twin critics (e.g. an exact one in tests).
    """
    shac_settings = settings.as_shac()
    critics, optimizer = make_ensemble_critic(policy.observation_size, settings)
    if value_function is not None:
        critics = ValueEnsemble(value_function.init, value_function.apply,
                                lambda p, obs, steps_left: value_function.apply(
                                    p, obs, steps_left)[None])
    threshold = settings.stiffness_threshold or 0.0
    measure = measure_action_sensitivity(env, settings.stiffness_envs)

    def cut_and_measure(step, state, cut, key):  # a StepHook: cut where a segment starts
        return step(cut_gradient(cut, state), key, simulate=measure)

    def init(key: jax.Array, policy_params: Params) -> AhacState:
        del policy_params
        return AhacState(init_critic_state(critics.init(key), optimizer),
                         jnp.asarray(settings.initial_horizon, jnp.float32),
                         jnp.asarray(1.0, jnp.float32), jnp.asarray(threshold, jnp.float32))

    def estimate(params: Params, obs_stats: RunningStatistics, state: AhacState,
                 env_state: State, key: jax.Array) -> Estimate:
        target = jax.lax.stop_gradient(state.critic.target_params)
        steps = settings.horizon
        gradient_horizon = state.gradient_horizon.astype(jnp.int32)
        t = jnp.arange(steps)
        cut_before = (t > 0) & (t % gradient_horizon == 0)
        end = segment_ends(gradient_horizon, steps)
        steps_left = (steps - 1 - t)[:, None]  # after each step (a finite horizon's critic)

        def objective(p):
            end_state, tr = unroll(env, policy, p, obs_stats, env_state, key, steps,
                                   hook=StepHook(cut_before, cut_and_measure))
            value = critics.apply(target, normalize(obs_stats, tr.next_obs),
                                  jnp.broadcast_to(steps_left, tr.reward.shape))
            totals, rewards = segmented_return(tr.reward, tr.done, tr.truncation, value,
                                               end.astype(tr.reward.dtype), settings.discount,
                                               final_bootstrap=not settings.finite_horizon,
                                               survival_probability=tr.survival_probability)
            return jnp.mean(totals), (end_state, tr, jnp.mean(rewards))

        grad, (end_state, tr, objective_value) = jax.grad(objective, has_aux=True)(params)
        return Estimate(grad, Batch(jax.lax.stop_gradient(tr)),
                        jax.lax.stop_gradient(end_state),
                        {"objective": jax.lax.stop_gradient(objective_value),
                         "gradient_horizon": state.gradient_horizon})

    def update(params, obs_stats, state: AhacState, batch, key):
        del params
        tr = batch.transitions
        critic, metrics = fit_value_critic(critics, optimizer, shac_settings, obs_stats,
                                           state.critic, tr, key, predict=critics.apply_each)
        finite = jnp.isfinite(tr.measurement)
        stiffness = (jnp.sum(jnp.where(finite, tr.measurement, 0.0))
                     / jnp.maximum(jnp.sum(finite), 1))
        calibrated = jnp.where(state.stiffness_threshold > 0, state.stiffness_threshold,
                               settings.initial_horizon * stiffness)
        multiplier, gradient_horizon = state.multiplier, state.gradient_horizon
        if settings.adapt:
            multiplier, gradient_horizon = adapt_horizon(
                multiplier, gradient_horizon, stiffness, calibrated, settings)
        # (the horizon the batch's gradient used is the estimate's "gradient_horizon")
        metrics = metrics | {"stiffness": stiffness, "stiffness_multiplier": multiplier}
        return AhacState(critic, gradient_horizon, multiplier, calibrated), metrics

    return Estimator(init, estimate, update, settings)


def _comparison(horizon: int) -> dict:
    """The comparison's AHAC: a fixed gradient horizon of up to 4 steps (SHAC's comparison
    window), the objective ending at the horizon."""
    shortest = min(4, horizon)
    return {"finite_horizon": True, "horizon_min": shortest, "initial_horizon": shortest,
            "adapt": False}


register("ahac", AhacSettings, make_ahac, comparison=_comparison, family="pathwise")
