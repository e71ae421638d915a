"""Backpropagation through the simulator: SHAC (Xu et al., ICLR 2022) and, as its special case,
plain BPTT / APG.

One estimate simulates ``horizon`` steps as ``horizon / window`` consecutive windows. Gradients flow
through the dynamics inside a window and stop at its start. The estimated objective per environment
is, with ``w`` the episode-wise discounts of ``returns.segment_discounts``::

    sum_t w_t r_t  +  sum_t w_t gamma trunc_t V(s'_t)  +  w_end gamma (1 - done_end) V(s_end)

summed over windows: value 0 at true termination, the (target) critic's value at time-limit
truncation on the observation *before* auto-reset, and at each window's end. Its gradient is averaged
over the ``B`` environments. ``critic=False`` drops every V term (value 0): with ``window =
horizon`` this is plain BPTT through the whole horizon. ``finite_horizon=True`` also drops the
bootstrap at the last step of the horizon, so that the estimate is of the same finite-horizon
objective as REINFORCE's (the comparison's setting), and gives the critic the steps left as an
input; SHAC's training bootstraps there.

The critic is fitted by ``update``, after the policy gradient is taken, on TD(lambda) targets
computed with the target critic (``critic_iterations`` passes of ``critic_minibatches``
minibatches), and the target is then moved: ``target <- keep * target + (1 - keep) * critic``
(SHAC's alpha is ``keep``).
SHAC divides its actor loss by ``horizon * B``; this estimate is of ``grad J`` itself, and the trainer
applies that scale.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from diffpg import returns
from diffpg.acting import unroll
from diffpg.critics import (
    CriticState,
    ValueEnsemble,
    ValueFunction,
    explained_variance,
    fit_mean_squared_error,
    init_critic_state,
    make_critic_optimizer,
    make_mlp_value_function,
    make_value_ensemble,
    update_target,
)
from diffpg.envs.core import Environment, SettingError, State
from diffpg.estimators.base import (
    Batch,
    Estimate,
    Estimator,
    check_bool,
    check_critic_fit,
    check_positive,
    check_positive_int,
    check_unit_interval,
    learns_nothing,
)
from diffpg.estimators.registry import register
from diffpg.normalization import RunningStatistics, normalize
from diffpg.policy import Params, Policy


@dataclasses.dataclass(frozen=True)
class ShacSettings:
    """Backpropagation through windows of the simulation, bootstrapped by a learned value critic
    (SHAC, Xu et al. 2022)."""

    horizon: int = 32
    """Steps simulated per estimate."""
    window: int | None = None
    """Steps a gradient flows through before it is cut (SHAC's h); None means the whole horizon."""
    discount: float = 0.99
    """gamma, the discount of the objective J = E[sum_t gamma^t r_t]."""
    td_lambda: float = 0.95
    """lambda of the critic's TD(lambda) targets."""
    critic: bool = True
    """Bootstrap with a learned value critic; False is plain BPTT (value 0 beyond the window)."""
    finite_horizon: bool = False
    """The objective ends at the horizon (comparisons): no bootstrap at its last step, the critic
    sees the steps left and its targets end there too. False: SHAC's training (bootstrap there)."""
    critic_hidden_sizes: tuple[int, ...] = (64, 64)
    critic_learning_rate: float = 2e-3
    """Adam learning rate of the critic(s)."""
    critic_betas: tuple[float, float] = (0.7, 0.95)
    critic_iterations: int = 16
    """Passes over the batch per critic fit."""
    critic_minibatches: int = 4
    """Minibatches per pass of a critic fit (one Adam step each)."""
    target_critic_keep: float = 0.2
    """alpha in target <- alpha * target + (1 - alpha) * critic."""
    remat_segment: int = 0
    """Rematerialise each differentiated window in segments of this many steps (0: off); trades
    one extra forward pass for memory (diffpg.acting.unroll)."""
    termination_gradient: bool = False
    """At a termination (a fall), add gamma w_t (V(s'_t) - stop_gradient(V(s'_t))): the value
    still counts 0, but the gradient of the critic's value of the state reached flows into the
    dynamics, a learned signal about the reward a fall loses, which a gradient through the
    dynamics cannot see (the episode's length is piecewise constant in the parameters). A
    surrogate, biased by design; off in SHAC."""
    fit_terminal_values: bool = False
    """Also fit the critic to value 0 at the states where episodes terminated (their true
    value: nothing follows), so that the gradient termination_gradient takes there is
    learned rather than extrapolated from the states before the fall. Off in SHAC."""
    critic_fall_weight: float = 1.0
    """Weight, in the critic's regression, of the steps whose episode terminates later in the same
    window (the states before a fall), the other steps weighing 1: falls are rare, and a critic fit
    to every step alike values the states before one as if no fall followed. 1 in SHAC."""

    def __post_init__(self):
        check_positive_int("horizon", self.horizon)
        check_bool("termination_gradient", self.termination_gradient)
        check_bool("fit_terminal_values", self.fit_terminal_values)
        check_positive("critic_fall_weight", self.critic_fall_weight)
        if self.window is not None:
            check_positive_int("window", self.window)
            if self.horizon % self.window:
                raise SettingError(
                    f"window={self.window} must divide horizon={self.horizon} "
                    f"(allowed windows: divisors of {self.horizon})"
                )
        check_unit_interval("discount", self.discount)
        check_unit_interval("td_lambda", self.td_lambda)
        check_critic_fit(self)
        check_remat_segment(self.remat_segment, self.window_length)

    @property
    def window_length(self) -> int:
        return self.horizon if self.window is None else self.window

    @property
    def num_windows(self) -> int:
        return self.horizon // self.window_length


@dataclasses.dataclass(frozen=True)
class BpttSettings:
    """Backpropagation through the whole horizon, no critic (BPTT, Brax's APG gradient)."""

    horizon: int = 32
    """Steps differentiated through, with no critic: the full-horizon pathwise gradient (APG)."""
    discount: float = 0.99
    """gamma, the discount of the objective J = E[sum_t gamma^t r_t]."""
    remat_segment: int = 0
    """Rematerialise the differentiated scan in segments of this many steps (0: off); trades
    one extra forward pass for memory (diffpg.acting.unroll)."""

    def __post_init__(self):
        check_positive_int("horizon", self.horizon)
        check_unit_interval("discount", self.discount)
        check_remat_segment(self.remat_segment, self.horizon)

    def as_shac(self) -> ShacSettings:
        return ShacSettings(
            horizon=self.horizon, discount=self.discount, critic=False, finite_horizon=True,
            remat_segment=self.remat_segment,
        )


@dataclasses.dataclass(frozen=True)
class EnsembleCriticSettings:
    """The settings of the estimators that bootstrap SHAC's return with the smallest of several
    value critics and no target network (SAPO, AHAC): SHAC's return and critic fit, with
    critic_members critics. Each estimator's settings extend these."""

    horizon: int = 32
    """Steps simulated per estimate."""
    discount: float = 0.99
    """gamma, the discount of the objective J = E[sum_t gamma^t r_t]."""
    td_lambda: float = 0.95
    """lambda of the critics' TD(lambda) targets."""
    finite_horizon: bool = False
    """The objective ends at the horizon (comparisons), as SHAC's setting of that name."""
    critic_members: int = 2
    """Value critics; the bootstrap is their minimum."""
    critic_hidden_sizes: tuple[int, ...] = (64, 64)
    critic_learning_rate: float = 2e-3
    """Adam learning rate of the critic(s)."""
    critic_betas: tuple[float, float] = (0.7, 0.95)
    critic_iterations: int = 16
    """Passes over the batch per critic fit."""
    critic_minibatches: int = 4
    """Minibatches per pass of a critic fit (one Adam step each)."""
    target_critic_keep: float = 0.0
    """0: no target network (SAPO's and AHAC's choice); above 0, SHAC's Polyak-averaged target."""

    def __post_init__(self):
        self.as_shac()  # checks horizon, discount, td_lambda and the critic fit's settings
        check_positive_int("critic_members", self.critic_members)

    def as_shac(self) -> ShacSettings:
        """The windowed gradient's and the critic fit's settings: each of SHAC's settings that
        these settings also have, by name; SHAC's defaults for the rest."""
        shac_names = {field.name for field in dataclasses.fields(ShacSettings)}
        return ShacSettings(**{field.name: getattr(self, field.name)
                               for field in dataclasses.fields(self)
                               if field.name in shac_names})


def make_ensemble_critic(observation_size: int, settings: EnsembleCriticSettings
                         ) -> tuple[ValueEnsemble, optax.GradientTransformation]:
    """``settings.critic_members`` MLP value critics (minimum over members) and their optimizer;
    the critics see the steps left when ``settings.finite_horizon``."""
    critics = make_value_ensemble(
        make_mlp_value_function(observation_size, settings.critic_hidden_sizes,
                                time_scale=settings.horizon if settings.finite_horizon else None),
        settings.critic_members)
    return critics, make_critic_optimizer(settings.critic_learning_rate, settings.critic_betas)


def check_remat_segment(segment: int, window: int) -> None:
    if not isinstance(segment, int) or segment < 0 or (segment and window % segment):
        raise SettingError(f"remat_segment={segment!r} must be 0 (off) or a divisor of the "
                           f"differentiated window of {window} steps")


def make_shac(
    env: Environment,
    policy: Policy,
    settings: ShacSettings = ShacSettings(),
    value_function: ValueFunction | None = None,
) -> Estimator:
    """Build the SHAC estimator (see the module docstring for the objective it differentiates).

    ``value_function`` replaces the learned MLP critic (e.g. an exact one in tests).
    """
    if value_function is None:
        value_function = make_mlp_value_function(
            policy.observation_size, settings.critic_hidden_sizes,
            time_scale=settings.horizon if settings.finite_horizon else None,
        )
    optimizer = make_critic_optimizer(settings.critic_learning_rate, settings.critic_betas)

    def init(key: jax.Array, policy_params: Params) -> CriticState | None:
        del policy_params
        return init_critic_state(value_function.init(key), optimizer) if settings.critic else None

    def estimate(params: Params, obs_stats: RunningStatistics, critic: CriticState | None,
                 env_state: State, key: jax.Array) -> Estimate:
        def value(obs, steps_left):
            if not settings.critic:
                return jnp.zeros(obs.shape[:-1])
            target = jax.lax.stop_gradient(critic.target_params)
            return value_function.apply(target, normalize(obs_stats, obs), steps_left)

        return windowed_gradient(env, policy, settings, params, obs_stats, value, env_state, key)

    def update(params, obs_stats, critic, batch, key):
        del params
        return fit_value_critic(value_function, optimizer, settings, obs_stats, critic,
                                batch.transitions, key)

    return Estimator(init, estimate, update if settings.critic else learns_nothing, settings)


def windowed_gradient(
    env: Environment,
    policy: Policy,
    settings: ShacSettings,
    params: Params,
    obs_stats: RunningStatistics,
    value,
    env_state: State,
    key: jax.Array,
    reward_bonus=None,
) -> Estimate:
    """The gradient of the objective in the module docstring, one window at a time.

    ``value(obs [..., obs], steps_left [...]) -> [...]``: the (target) critic's value of raw
    observations, 0 without a critic. ``reward_bonus(params, transitions) -> [T, B]``, if given,
    is added to each window's rewards inside the differentiated objective (SAPO's entropy; the
    ``objective`` metric stays the task's). Uses ``settings``' horizon, window, discount,
    ``finite_horizon``, ``remat_segment`` and ``termination_gradient``.
    """
    window = settings.window_length

    def window_objective(p, start_state, start_weight, window_index, window_key):
        start_state = jax.lax.stop_gradient(start_state)
        end_state, tr = unroll(env, policy, p, obs_stats, start_state, window_key, window,
                               remat_segment=settings.remat_segment)
        # steps of the horizon left after each transition (an exact critic's time argument)
        steps_left = settings.horizon - (window_index * window + jnp.arange(1, window + 1))
        steps_left = jnp.broadcast_to(steps_left[:, None], tr.reward.shape)
        is_last_window = window_index == settings.num_windows - 1
        final_bootstrap = jnp.logical_or(not settings.finite_horizon, ~is_last_window)
        totals, rewards_only, next_weight = window_return(
            tr.reward, tr.done, tr.truncation,
            value(tr.next_obs, steps_left), value(end_state.obs, steps_left[-1]),
            start_weight, settings.discount, final_bootstrap.astype(tr.reward.dtype),
            termination=tr.termination if settings.termination_gradient else None,
            bonus=None if reward_bonus is None else reward_bonus(p, tr),
            survival_probability=tr.survival_probability,
        )
        aux = (end_state, next_weight, tr, jnp.mean(rewards_only))
        return jnp.mean(totals), aux

    grad_fn = jax.grad(window_objective, has_aux=True)

    def one_window(carry, inputs):
        grad_sum, start_state, start_weight = carry
        window_index, window_key = inputs
        grad, (end_state, next_weight, tr, reward_sum) = grad_fn(
            params, start_state, start_weight, window_index, window_key
        )
        grad_sum = jax.tree.map(jnp.add, grad_sum, grad)
        return (grad_sum, end_state, next_weight), (tr, reward_sum)

    batch_size = jax.tree.leaves(env_state)[0].shape[0]
    carry = (jax.tree.map(jnp.zeros_like, params), env_state, jnp.ones(batch_size))
    inputs = (jnp.arange(settings.num_windows), jax.random.split(key, settings.num_windows))
    (grad, end_state, _), (tr, reward_sums) = jax.lax.scan(one_window, carry, inputs)
    tr = jax.tree.map(lambda x: x.reshape((settings.horizon,) + x.shape[2:]), tr)
    return Estimate(grad, Batch(jax.lax.stop_gradient(tr)), jax.lax.stop_gradient(end_state),
                    {"objective": jnp.sum(reward_sums)})


def window_return(
    reward: jax.Array,
    done: jax.Array,
    truncation: jax.Array,
    next_value: jax.Array,
    end_value: jax.Array,
    start_weight: jax.Array,
    discount: float,
    final_bootstrap: jax.Array,
    termination: jax.Array | None = None,
    bonus: jax.Array | None = None,
    survival_probability: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SHAC's bootstrapped return of one window, per environment.

    Inputs ``[T, B]``: ``reward``, ``done``, ``truncation`` and ``next_value = V(s'_t)`` (value of
    the state reached, before auto-reset); ``end_value [B] = V(s_T)``; ``start_weight [B]``: the
    discount reached by each episode when the window starts; ``final_bootstrap`` (0 or 1): whether
    the last step may bootstrap (window end, or truncation on it). Returns ``[B]`` arrays::

        total   = sum_t w_t r_t + sum_t w_t gamma trunc_t V(s'_t) + w_T gamma (1 - done_T) V(s_T)
        rewards = sum_t w_t r_t

    and the discount weight the next window starts with. Termination contributes value 0. With
    ``termination [T, B]`` given, ``total`` gains ``sum_t w_t gamma term_t (V(s'_t) - sg(V(s'_t)))``
    (``sg``: stop gradient): zero, with the critic's gradient at the states where episodes ended.
    With ``bonus [T, B]`` given, ``total`` gains ``sum_t w_t bonus_t`` (``rewards`` does not).
    With ``survival_probability [T, B]`` given (``p_t``: a differentiable probability that step
    ``t`` does not end the episode, ``returns.survival``), ``total`` weights each reward by
    ``S_{t-1} = prod_{k < t} p_k`` and each value by ``S_t``, the product restarting at the
    window's start and after each episode's end: a fall's expected cost, which the pathwise
    gradient sees where the hard end of an episode has none (``rewards`` stays unweighted).
    """
    weights = returns.segment_discounts(done, discount, start_weight)
    reward_weights, value_weights = returns.survival_weighted(weights, survival_probability,
                                                              done)
    is_last_step = (jnp.arange(reward.shape[0]) == reward.shape[0] - 1)[:, None]
    bootstrap_allowed = jnp.where(is_last_step, final_bootstrap, 1.0)
    rewards = jnp.sum(weights * reward, axis=0)
    truncation_values = jnp.sum(
        value_weights * discount * truncation * bootstrap_allowed * next_value, axis=0
    )
    end_values = value_weights[-1] * discount * (1.0 - done[-1]) * final_bootstrap * end_value
    if termination is not None:
        zero_valued = next_value - jax.lax.stop_gradient(next_value)
        end_values = end_values + jnp.sum(
            value_weights * discount * termination * zero_valued, axis=0)
    next_weight = jnp.where(done[-1] > 0, 1.0, discount * weights[-1])
    weighted_rewards = jnp.sum(reward_weights * reward, axis=0)  # rewards without survival
    bonuses = 0.0 if bonus is None else jnp.sum(reward_weights * bonus, axis=0)
    return weighted_rewards + bonuses + truncation_values + end_values, rewards, next_weight


def make_bptt(
    env: Environment, policy: Policy, settings: BpttSettings = BpttSettings()
) -> Estimator:
    """Plain backpropagation through time over the whole horizon, no critic (Brax's APG gradient)."""
    return make_shac(env, policy, settings.as_shac())._replace(settings=settings)


def steps_before_a_fall(tr) -> jax.Array:
    """``[T, B]``: 1 at the steps whose episode terminates (a fall, not a time limit) at that step
    or later in the window, else 0: the reward-to-go of ``termination``, which an episode piece
    holds at most once."""
    return returns.reward_to_go(tr.termination, tr.done)


def fit_value_critic(value_function, optimizer, settings, obs_stats, critic, tr, key,
                     predict=None):
    """TD(lambda) targets from the target critic, then regression, then the target update.

    ``predict(params, obs, steps_left)`` is what is regressed on the targets (default
    ``value_function.apply``; a critic ensemble's every member, ``[members, ...]``, fits each).
    """
    steps_left = settings.horizon - jnp.arange(1, settings.horizon + 1)[:, None]
    steps_left = jnp.broadcast_to(steps_left, tr.reward.shape)
    next_value = value_function.apply(
        critic.target_params, normalize(obs_stats, tr.next_obs), steps_left
    )
    if settings.finite_horizon:  # nothing is left to bootstrap after the objective's last step
        next_value = next_value.at[-1].set(0.0)
    targets = returns.td_lambda_targets(
        tr.reward, next_value, tr.termination, tr.done, settings.discount, settings.td_lambda
    )
    inputs = (normalize(obs_stats, tr.obs), steps_left + 1)
    weights = None
    if settings.critic_fall_weight != 1.0:
        weights = 1.0 + (settings.critic_fall_weight - 1.0) * steps_before_a_fall(tr)
    # Before fitting: how much of the fresh targets' variance the critic already explains.
    explained = explained_variance(value_function.apply(critic.params, *inputs), targets)
    if settings.fit_terminal_values:
        # A second copy of the batch in which each terminated step's example becomes (the state
        # it fell into, 0); the other examples repeat, which leaves their balance unchanged.
        terminated = tr.termination[..., None] > 0
        inputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), inputs, (
            jnp.where(terminated, normalize(obs_stats, tr.next_obs), inputs[0]),
            jnp.where(tr.termination > 0, steps_left, inputs[1])))
        targets = jnp.concatenate([targets, jnp.where(tr.termination > 0, 0.0, targets)])
        weights = None if weights is None else jnp.concatenate([weights, weights])
    critic, loss = fit_mean_squared_error(
        critic, predict or value_function.apply, inputs, targets,
        optimizer, key, settings.critic_iterations, settings.critic_minibatches, weights=weights,
    )
    return update_target(critic, settings.target_critic_keep), {
        "critic_loss": loss, "critic_explained_variance": explained}


def largest_window_at_most(limit: int):
    """The comparison's SHAC window: the largest divisor of the horizon up to ``limit`` steps."""
    def comparison(horizon: int) -> dict:
        window = min(limit, horizon)
        while horizon % window:
            window -= 1
        return {"window": window, "finite_horizon": True}

    return comparison


register("bptt", BpttSettings, make_bptt, family="pathwise")
register("shac", ShacSettings, make_shac, comparison=largest_window_at_most(4),
         family="pathwise")
