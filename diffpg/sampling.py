"""Many independent estimates of one estimator's gradient at a fixed policy and fixed start
states: what a comparison measures (``sample_gradients``). Whatever the estimator learns (a
critic, a replay buffer) is warmed up on the fixed policy first; the estimates then run vmapped
in one compiled program, kept across processes when described (``diffpg.program_cache``)."""

from __future__ import annotations

import functools
import time

import jax
from jax.flatten_util import ravel_pytree

from diffpg import program_cache
from diffpg.devices import available_memory_bytes, to_host
from diffpg.envs.core import SettingError
from diffpg.normalization import RunningStatistics, init_statistics
from diffpg.program_cache import CPU_RUN_ONCE_OPTIONS, prepare_program


def learns(state) -> bool:
    """Whether an estimator's state holds anything to learn (a critic, a buffer...)."""
    return bool(jax.tree.leaves(state))


def initial_state_shapes(estimator, policy):
    """The shapes of ``estimator``'s initial state for ``policy`` (``jax.eval_shape``: nothing
    is computed, allocated or compiled)."""
    def initial_state():
        key = jax.random.PRNGKey(0)
        return estimator.init(key, policy.init(key))

    return jax.eval_shape(initial_state)


def learns_anything(estimator, policy) -> bool:
    """Whether ``estimator``'s state for ``policy`` holds anything to learn (a critic...)."""
    return learns(initial_state_shapes(estimator, policy))


STATE_COPIES_WHILE_UPDATING = 3
"""A lower bound of how many copies of a state an update holds at once (a run's, an
estimator's): the state, the updated state, and gradients and optimiser moments as large as the
parameters."""


def check_state_fits(estimator, policy, label: str) -> None:
    """Refuse, before anything is allocated, an estimator whose state for ``policy`` (its
    critics, their optimiser's moments, its replay buffer; from the shapes alone) cannot fit the
    memory available; the error names ``label`` (its spec)."""
    available = available_memory_bytes()
    needed = STATE_COPIES_WHILE_UPDATING * sum(
        leaf.size * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(initial_state_shapes(estimator, policy)))
    if available is not None and needed > available:
        raise SettingError(f"estimator spec {label!r} needs {needed / 2**30:,.1f} GiB for its "
                           f"critics and their optimiser, and about {available / 2**30:,.1f} GiB "
                           "are available; lower its sizes (e.g. critic_hidden_sizes)")


def warmup_program(estimator, params, obs_stats: RunningStatistics, rounds: int,
                   name: str = "warm_up"):
    """The jitted warm-up ``(state, start_states, key) -> state``: ``rounds`` rounds of
    ``estimate`` then ``update`` on the fixed policy ``params`` (a scan over split keys). The
    start states go in as an argument: a constant cannot be split over processes. ``name``:
    the compiled module's (``program_cache.module_name``)."""
    def warm_step(carry, step_key):
        state, starts = carry
        key_estimate, key_update = jax.random.split(step_key)
        batch = estimator.estimate(params, obs_stats, state, starts, key_estimate).batch
        return (estimator.update(params, obs_stats, state, batch, key_update)[0], starts), None

    def warm_up(state, starts, key):
        return jax.lax.scan(warm_step, (state, starts), jax.random.split(key, rounds))[0][0]

    warm_up.__name__ = name
    return jax.jit(warm_up)


def estimates_program(estimator, params, obs_stats: RunningStatistics,
                      name: str = "flat_estimates"):
    """The jitted ``(state, start_states, keys [K], batch_size) -> samples [K, P]``: one flat
    gradient estimate per key, ``batch_size`` (static) vmapped at a time. The start states are
    an argument, not a constant, so that their sharding (the batch split over devices,
    ``diffpg.devices.shard_batch``) carries into the computation. ``name``: the compiled
    module's (``program_cache.module_name``)."""
    def flat_estimate(state, starts, estimate_key):
        grad = estimator.estimate(params, obs_stats, state, starts, estimate_key).grad
        return ravel_pytree(grad)[0]

    def flat_estimates(state, starts, keys, batch_size):
        return jax.lax.map(lambda k: flat_estimate(state, starts, k), keys,
                           batch_size=batch_size)

    flat_estimates.__name__ = name
    return jax.jit(flat_estimates, static_argnums=3)


def sample_gradients(estimator, params, start_states, key, num_estimates, warmup,
                     chunk_size: int | None = None, obs_stats: RunningStatistics | None = None,
                     description: dict | None = None):
    """Warm up what the estimator learns on the fixed policy (``warmup`` rounds of ``estimate``
    then ``update``, if its state holds anything), then ``num_estimates`` independent estimates:
    ``prepare_sampling(...)()``.

    Estimates run vmapped, ``chunk_size`` at a time (all at once by default; a chunk bounds the
    memory, which for per-sample estimators such as the optimal baseline grows with K; when the
    device runs out of memory the chunk is halved and the same estimates run again);
    ``obs_stats`` fixes the observation statistics the policy sees (a trained policy's; none:
    raw observations); ``description``: everything that shapes the estimator's programs
    besides the arrays passed (its settings, the env's, the policy's: see
    ``compile_program``), to keep them across processes (``None``: not kept). Returns flat
    samples ``[K, P]`` and timings: compile seconds (tracing included), seconds per estimate
    (wall time / K) and the warm-up's seconds (tracing and compiling included).
    """
    return prepare_sampling(estimator, params, start_states, key, num_estimates, warmup,
                            chunk_size, obs_stats, description)()


def prepare_sampling(estimator, params, start_states, key, num_estimates, warmup,
                     chunk_size: int | None = None, obs_stats: RunningStatistics | None = None,
                     description: dict | None = None):
    """``sample_gradients`` in two steps: its programs traced and lowered now (or loaded from the
    program cache), so that a setting refused where they are traced (a baseline's pool of one
    rollout, more critic minibatches than samples) is raised before anything compiles; returns
    ``run() -> (samples, timings)``, which compiles and runs them. Arguments as
    ``sample_gradients``'."""
    if obs_stats is None:
        obs_stats = init_statistics(jax.tree.leaves(start_states.obs)[0].shape[-1])
    if description is not None:  # the programs close over the parameters and statistics
        description = description | {
            "closed_over": program_cache.array_fingerprint((params, obs_stats))}
    key_init, key_warm, key_samples = jax.random.split(key, 3)
    state = estimator.init(key_init, params)
    keys = jax.random.split(key_samples, num_estimates)
    started = time.perf_counter()
    finish_warm_up = None
    if warmup and learns(state):
        described = description and description | {"program": "warm-up", "rounds": warmup}
        finish_warm_up = prepare_program(
            warmup_program(estimator, params, obs_stats, warmup,
                           program_cache.module_name("warm_up", described)),
            state, start_states, key_warm, description=described)
    warmup_tracing = time.perf_counter() - started
    flat_estimates = estimates_program(estimator, params, obs_stats, program_cache.module_name(
        "flat_estimates", description and description | {"program": "estimates"}))

    def prepare_estimates(state, batch_size: int):
        return prepare_program(
            flat_estimates, state, start_states, keys, batch_size, description=description
            and description | {"program": "estimates", "at_once": batch_size},
            cpu_options=CPU_RUN_ONCE_OPTIONS)

    started = time.perf_counter()
    batch_size = chunk_size or num_estimates
    finish_estimates = prepare_estimates(state, batch_size)
    estimates_tracing = time.perf_counter() - started

    def run():
        warmup_started, warmed, finish = time.perf_counter(), state, finish_estimates
        if finish_warm_up is not None:
            warmed = jax.block_until_ready(finish_warm_up()(state, start_states, key_warm))
            if program_cache.avals_fingerprint(warmed) != program_cache.avals_fingerprint(state):
                finish = prepare_estimates(warmed, batch_size)  # (other shardings)
        warmup_seconds = warmup_tracing + time.perf_counter() - warmup_started
        samples, compile_seconds, run_seconds = _compile_and_run(
            finish, functools.partial(prepare_estimates, warmed), warmed, start_states, keys,
            batch_size)
        return samples, {"compile_seconds": estimates_tracing + compile_seconds,
                         "seconds_per_estimate": run_seconds / num_estimates,
                         "warmup_seconds": warmup_seconds}

    return run


def _compile_and_run(finish, prepare, state, start_states, keys, batch_size: int):
    """Compile (``finish()``) and run the estimates program prepared for ``batch_size`` keys at a
    time: ``(samples [K, P], compile seconds, run seconds)``. A device out of memory gets the
    same estimates half as many at a time (``prepare(batch_size)``, then compiled and run)."""
    compile_seconds = 0.0
    while True:
        try:
            started = time.perf_counter()
            compiled = finish()
            compile_seconds += time.perf_counter() - started
            started = time.perf_counter()
            samples = to_host(jax.block_until_ready(compiled(state, start_states, keys)))
            return samples, compile_seconds, time.perf_counter() - started
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" not in str(error) or batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            started = time.perf_counter()
            finish = prepare(batch_size)
            compile_seconds += time.perf_counter() - started
