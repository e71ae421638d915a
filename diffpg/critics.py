"""Learned value and action-value functions, and their TD training, as pure functions.

Both critics take ``steps_left`` (steps remaining in the objective's horizon) so that an exact,
time-dependent critic (the LQR's closed-form values) fits the same interface as a learned one; the
learned MLP critics ignore it, as SHAC's and SAC's do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from diffpg.envs.core import SettingError
from diffpg.networks import MLP, check_activation

Params = Any


class ValueFunction(NamedTuple):
    """``V(obs [..., obs], steps_left [...]) -> [...]``."""

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array, jax.Array], jax.Array]


class QFunction(NamedTuple):
    """``Q(obs [..., obs], action [..., act], steps_left [...]) -> [...]``."""

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]


def make_mlp_value_function(
    observation_size: int,
    hidden_sizes: Sequence[int] = (64, 64),
    activation: str = "elu",
    layer_norm: bool = True,
    time_scale: float | None = None,
) -> ValueFunction:
    """MLP ``V(obs)`` (SHAC's critic: ELU + LayerNorm).

    ``time_scale=None`` ignores ``steps_left``; a number adds the input ``steps_left / time_scale``
    (a finite horizon's time-dependent value, as in ``make_mlp_q_function``).
    """
    check_activation(activation)
    network = MLP(tuple(hidden_sizes), 1, activation, layer_norm)
    time_inputs = 0 if time_scale is None else 1

    def init(key):
        return network.init(key, jnp.zeros((observation_size + time_inputs,)))

    def apply(params, obs, steps_left):
        return network.apply(params, _with_time(obs, steps_left, time_scale))[..., 0]

    return ValueFunction(init, apply)


class ValueEnsemble(NamedTuple):
    """``members`` value functions with independent initialisations: ``apply`` is the smallest of
    their values (a pessimistic value, as SAPO's and TD3's twin critics), ``apply_each`` every
    member's ``[members, ...]`` (fitted each to the same targets)."""

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array, jax.Array], jax.Array]
    apply_each: Callable[[Params, jax.Array, jax.Array], jax.Array]


def make_value_ensemble(value_function: ValueFunction, members: int) -> ValueEnsemble:
    """``members`` copies of ``value_function`` (parameters stacked on a leading axis)."""

    def init(key):
        return jax.vmap(value_function.init)(jax.random.split(key, members))

    def apply_each(params, obs, steps_left):
        return jax.vmap(value_function.apply, (0, None, None))(params, obs, steps_left)

    def apply(params, obs, steps_left):
        return jnp.min(apply_each(params, obs, steps_left), axis=0)

    return ValueEnsemble(init, apply, apply_each)


def make_mlp_q_function(
    observation_size: int,
    action_size: int,
    hidden_sizes: Sequence[int] = (64, 64),
    activation: str = "elu",
    layer_norm: bool = True,
    time_scale: float | None = None,
) -> QFunction:
    """MLP ``Q(obs, action)`` on the concatenated input.

    ``time_scale=None`` ignores ``steps_left`` (SAC's critic); a number adds the input
    ``steps_left / time_scale``, so the critic can represent a finite horizon's time-dependent Q
    (Pardo et al. 2018, "Time limits in reinforcement learning").
    """
    check_activation(activation)
    network = MLP(tuple(hidden_sizes), 1, activation, layer_norm)
    time_inputs = 0 if time_scale is None else 1

    def init(key):
        return network.init(key, jnp.zeros((observation_size + action_size + time_inputs,)))

    def apply(params, obs, action, steps_left):
        inputs = _with_time(jnp.concatenate([obs, action], axis=-1), steps_left, time_scale)
        return network.apply(params, inputs)[..., 0]

    return QFunction(init, apply)


def _with_time(inputs: jax.Array, steps_left: jax.Array, time_scale: float | None) -> jax.Array:
    """Append ``steps_left / time_scale`` as a last input feature (unless ``time_scale`` is None)."""
    if time_scale is None:
        return inputs
    steps = jnp.broadcast_to(jnp.asarray(steps_left, inputs.dtype), inputs.shape[:-1])
    return jnp.concatenate([inputs, steps[..., None] / time_scale], axis=-1)


class CriticState(NamedTuple):
    """A critic's parameters, its target copy and its optimiser state."""

    params: Params
    target_params: Params
    opt_state: optax.OptState


def make_critic_optimizer(learning_rate: float, betas: tuple[float, float]) -> optax.GradientTransformation:
    """Adam with SHAC's betas and a global-norm clip of 1, skipping non-finite updates.

    It works on the critic's parameters raveled into one vector (``optax.flatten``): the same
    update, in a handful of operations instead of a handful per layer, which cuts a critic fit's
    compile time by about a quarter (BENCHMARKS.md section 4).
    """
    adam = optax.apply_if_finite(
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adam(learning_rate, b1=betas[0], b2=betas[1]),
        ),
        max_consecutive_errors=1_000_000,
    )
    flat = optax.flatten(adam)

    def init(params):  # a critic without parameters (an exact one) has nothing to ravel
        return flat.init(params) if jax.tree.leaves(params) else adam.init(params)

    def update(updates, state, params=None):
        return (flat if jax.tree.leaves(updates) else adam).update(updates, state, params)

    return optax.GradientTransformation(init, update)


def init_critic_state(
    params: Params, optimizer: optax.GradientTransformation
) -> CriticState:
    return CriticState(params, params, optimizer.init(params))


def regression_step(
    loss_fn: Callable[[Params, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    params: Params,
    opt_state: optax.OptState,
    batch: Any,
) -> tuple[Params, optax.OptState, jax.Array]:
    """One optimiser step on ``loss_fn(params, batch)``; returns new params, state and the loss."""
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def fit_regression(
    critic_state: CriticState,
    loss_fn: Callable[[Params, Any], jax.Array],
    data: Any,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    iterations: int,
    minibatches: int,
) -> tuple[CriticState, jax.Array]:
    """``iterations`` passes of ``minibatches`` shuffled minibatches of ``loss_fn(params, batch)``.

    ``data`` is a pytree of arrays sharing a leading axis ``[M]`` (M divisible by ``minibatches``).
    Returns the new state and the mean loss of the last pass. SHAC: 16 iterations x 4 minibatches.
    """
    size = jax.tree.leaves(data)[0].shape[0]
    if not 1 <= minibatches <= size:  # (at trace time: the batch's size is known only here)
        raise SettingError(f"critic_minibatches={minibatches} is more than the {size} samples "
                           "the critic fits per update (its minibatches would be empty and it "
                           f"would never learn); allowed: 1..{size}")
    batch_size = size // minibatches

    def one_minibatch(carry, batch):
        params, opt_state, loss = regression_step(loss_fn, optimizer, *carry, batch)
        return (params, opt_state), loss

    def one_pass(carry, pass_key):
        order = jax.random.permutation(pass_key, size)[: batch_size * minibatches]
        shuffled = jax.tree.map(
            lambda x: x[order].reshape((minibatches, batch_size) + x.shape[1:]), data
        )
        carry, losses = jax.lax.scan(one_minibatch, carry, shuffled)
        return carry, jnp.mean(losses)

    keys = jax.random.split(key, iterations)
    carry = (critic_state.params, critic_state.opt_state)
    (params, opt_state), losses = jax.lax.scan(one_pass, carry, keys)
    return critic_state._replace(params=params, opt_state=opt_state), losses[-1]


def fit_mean_squared_error(
    critic_state: CriticState,
    predict: Callable[..., jax.Array],
    inputs: tuple[jax.Array, ...],
    targets: jax.Array,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    iterations: int,
    minibatches: int,
    weights: jax.Array | None = None,
) -> tuple[CriticState, jax.Array]:
    """Regress ``predict(params, *inputs)`` on constant ``targets`` by mean squared error.

    ``inputs`` and ``targets`` have leading axes ``[T, B]``, flattened into one batch of examples
    (``fit_regression`` then shuffles them into minibatches). ``weights [T, B]`` (default all 1)
    weigh the examples: each minibatch's loss is ``mean_i(u_i (V_i - y_i)^2)`` with
    ``u = weights / mean(weights)`` over the whole batch, so that equal weights give the plain
    mean squared error. Returns the new state and the loss.
    """
    if weights is not None:
        weights = weights / jnp.mean(weights)
    data = jax.lax.stop_gradient(
        jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), (inputs, targets, weights))
    )

    def loss_fn(params, batch):
        batch_inputs, batch_targets, batch_weights = batch
        squared_errors = jnp.square(predict(params, *batch_inputs) - batch_targets)
        return jnp.mean(squared_errors if batch_weights is None else batch_weights * squared_errors)

    return fit_regression(critic_state, loss_fn, data, optimizer, key, iterations, minibatches)


def explained_variance(prediction: jax.Array, targets: jax.Array) -> jax.Array:
    """``1 - Var(targets - prediction) / Var(targets)``: 1 for a perfect critic, 0 for one no
    better than a constant, negative for a worse one."""
    return 1.0 - jnp.var(targets - prediction) / jnp.maximum(jnp.var(targets), 1e-12)


def update_target(critic_state: CriticState, keep: float) -> CriticState:
    """``target <- keep * target + (1 - keep) * params`` (SHAC's alpha is ``keep``; Polyak
    averaging, ``optax.incremental_update``)."""
    target = optax.incremental_update(critic_state.params, critic_state.target_params, 1.0 - keep)
    return critic_state._replace(target_params=target)
