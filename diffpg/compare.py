"""``diffpg compare``: every estimator's gradient on the same policy and the same start states.

For each horizon ``T`` the run draws ``num_envs`` start states once, builds each estimator for the
objective ``J_T = E[sum_{t<T} gamma^t r_t]`` (with the settings the estimator declares for it,
``diffpg.estimators.comparison_settings``: e.g. SHAC ends its last window at ``T``), warms up
whatever it learns (its ``update``) on the fixed policy, takes ``num_estimates`` independent
estimates (vmapped, ``diffpg.sampling``), and compares them with a reference gradient: exact
where the env knows its return in closed form (``jax.grad`` of its ``linear_gaussian_return``,
the LQR's), otherwise the mean of ``reference_estimates`` estimates of an unbiased estimator with
its standard error. Statistics are defined in ``diffpg.stats``; the settings in
``diffpg.comparison_settings``; the folder's files in ``diffpg.comparison_files``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from diffpg import envs, estimators, per_step, program_cache
from diffpg.comparison_files import SAMPLES_FILE, check_finished_points, samples_file_bytes_at_most
from diffpg.comparison_settings import (
    CompareSettings,
    EstimatorSpec,
    SweepPoint,
    check_estimators_fit,
    check_reference_learns_nothing,
    estimator_settings,
    learners_first,
)
from diffpg.devices import available_memory_bytes, shard_batch, state_bytes
from diffpg.envs.core import SettingError
from diffpg.folders import check_file_size_limit
from diffpg.normalization import RunningStatistics
from diffpg.options import parse_options, seed_key
from diffpg.policy import Policy, make_gaussian_mlp_policy, make_linear_gaussian_policy
from diffpg.program_cache import CPU_RUN_ONCE_OPTIONS, compile_program
from diffpg.sampling import prepare_sampling, sample_gradients
from diffpg.stats import bootstrap_interval, gradient_statistics, reference_from_samples, variance_trace


def make_env_and_policy(settings: CompareSettings, env_settings: dict | None = None
                        ) -> tuple[Any, Policy, bool]:
    """The environment, the policy (linear on an env with an exact return, which the exact
    reference needs) and whether an exact reference exists."""
    options = parse_options(settings.env_options, "env_options") | (env_settings or {})
    env = envs.make(settings.env, episode_length=settings.episode_length, backend=settings.backend,
                    **options)
    longest = max(point.horizon for point in settings.points)
    if longest > env.episode_length:
        what = (f"the batch sweep's longest trajectory ({longest} steps = batch_budget / 2)"
                if settings.sweep == "batch" else f"horizon={longest}")
        raise SettingError(
            f"{what} is longer than the episode (episode_length={env.episode_length}); "
            f"allowed: 1..{env.episode_length}"
            + ("; lower batch_budget or raise episode_length" if settings.sweep == "batch" else "")
        )
    if settings.policy_checkpoint is not None:
        from diffpg.run_files import load_settings
        from diffpg.training import make_policy

        # The run's own network (activation, layer norm, sizes), not the comparison's.
        return env, make_policy(load_settings(Path(settings.policy_checkpoint)), env), False
    if envs.has_exact_return(settings.env):
        policy = make_linear_gaussian_policy(env.observation_size, env.action_size,
                                             init_gain_scale=0.5)
        return env, policy, True
    return env, make_gaussian_mlp_policy(env.observation_size, env.action_size,
                                         hidden_sizes=settings.hidden_sizes), False


def exact_gradient(env, params, start_states, horizon, discount):
    """``jax.grad`` of the closed-form ``J_T`` averaged over the given start states, for a
    linear-Gaussian policy's ``params`` (``gain``, ``bias``, ``log_std``) on an env that knows
    its return (``Environment.linear_gaussian_return``); traceable (inside ``jax.jit``)."""
    exact_return = env.unwrapped.linear_gaussian_return
    if exact_return is None:
        raise SettingError(f"{type(env.unwrapped).__name__} has no exact return "
                           "(linear_gaussian_return); allowed: an env that has one")

    def objective(p):
        def from_state(x):
            return exact_return(p["gain"], p["bias"], jnp.exp(p["log_std"]), horizon, discount, x)

        return jnp.mean(jax.vmap(from_state)(start_states.pipeline_state))

    return jax.grad(objective)(params)


def _compiled_exact_gradient(env, params, start_states, horizon, discount):
    """``exact_gradient`` as one program (kept by the cache), not one dispatch per operation."""
    program = jax.jit(lambda p, states: exact_gradient(env, p, states, horizon, discount))
    return compile_program(program, params, start_states,
                           cpu_options=CPU_RUN_ONCE_OPTIONS)(params, start_states)


def run_comparison(settings: CompareSettings,
                   progress: Callable[[str], None] | None = None,
                   finished: tuple[tuple[dict, dict], ...] = (),
                   on_point: Callable[[dict], None] | None = None,
                   keep_programs: bool = False) -> dict:
    """Run the comparison; returns a JSON-ready dict (settings, statistics at each sweep point).

    ``finished``: the ``(entry, samples)`` of the first sweep points from an earlier run of the
    same settings that stopped (``load_finished_points``); they are kept, not recomputed. Each
    point's keys depend only on what it computes, so the result is the one an uninterrupted run
    gives. ``on_point(results)`` is called after each point with the results so far (the same
    dict, ``complete`` false until the last point). ``keep_programs``: keep the compiled
    estimators' programs across processes (``diffpg.program_cache``; what ``diffpg compare``
    does), so that running the same comparison again neither traces nor compiles them. Off by
    default: a program kept is keyed by the source files, which do not see a function replaced
    in a running process (a notebook's, a test's).
    """
    settings = settings.resolved()
    points = settings.points
    # Every env of the sweep is built (and so validated) once, before anything compiles.
    built = [make_env_and_policy(settings, dict(p.env_settings)) for p in points]
    _, policy, has_exact = built[0]
    reference_kind = settings.reference
    if reference_kind == "auto":
        reference_kind = "exact" if has_exact else estimators.reference_estimator()
    check_finished_points(finished, settings, reference_kind)
    if reference_kind != "exact":
        check_reference_learns_nothing(settings, reference_kind, built[0][0], policy)
    # Sizes against the memory before anything compiles (the parameters' shapes are traced).
    num_parameters = sum(leaf.size for leaf in jax.tree.leaves(
        jax.eval_shape(lambda: policy.init(jax.random.PRNGKey(0)))))
    check_estimators_fit(settings, [env for env, _, _ in built], policy)
    chunk_size = estimates_at_once(settings, [env for env, _, _ in built], num_parameters,
                                   estimated_reference=reference_kind != "exact")
    key = seed_key(settings.seed)
    key_params, key_states, key_run = jax.random.split(key, 3)
    params, obs_stats = policy.init(key_params), None
    if settings.policy_checkpoint is not None:
        from diffpg.runs import load_trained_policy

        params, obs_stats, update = load_trained_policy(
            Path(settings.policy_checkpoint), settings.policy_seed_index, settings.policy_update)
        settings = dataclasses.replace(settings, policy_update=update)  # a resume reads it again

    entries = [entry for entry, _ in finished]
    samples_per_point = [samples for _, samples in finished]

    def results() -> dict:
        return {
            "settings": dataclasses.asdict(settings),
            "reference_kind": reference_kind,
            "families": {spec.label: estimators.registration(spec.name).family
                         for spec in settings.specs},
            "num_parameters": num_parameters,
            "finished_points": len(entries),
            "total_points": len(points),
            "complete": len(entries) == len(points),
            "results": list(entries),
            "samples": list(samples_per_point),
        }

    # On a CPU, two estimators at a time: one compiles (XLA, without Python's lock) while the
    # other runs; one thread traces every program of every point ahead of them (a setting
    # refused there is one line within seconds). One process queues every point at once; those
    # of one run (jax.distributed) run each point's reference before its estimators, in one
    # order, as their collectives need. Keys are each estimator's own: order changes no sample.
    queue_ahead = jax.process_count() == 1
    executors = (ThreadPoolExecutor(1),  # the tracer, then the workers
                 ThreadPoolExecutor(2 if jax.default_backend() == "cpu" else 1))
    watched: dict[Future, str] = {}  # every estimator queued: "spec at point"
    order = learners_first(settings, built[0][0], policy)  # each point queues them so
    try:
        queued = []
        for point, (env, _, _) in list(zip(points, built, strict=True))[len(finished):]:
            start_states = shard_batch(jax.vmap(env.reset)(
                jax.random.split(key_states, point.num_envs)), settings.devices)
            # Keys depend on what is computed, not on its position in the run: a point (or an
            # estimator) gives the same numbers in any sweep or list that contains it.
            key_point = jax.random.fold_in(key_run, _key_number(
                (point.horizon, point.env_settings, point.num_envs)))
            described = _point_description(settings, point, env) if keep_programs else None
            at_point = _PointInputs(point, env, policy, params, obs_stats, start_states, key_point,
                                    chunk_size, described)
            start = functools.partial(_queue_estimators, executors, settings, at_point, watched, order)
            queued.append((at_point, functools.partial(list, start()) if queue_ahead else start))
        for at_point, start_estimators in queued:
            entry, point_samples = _compare_at_point(
                settings, at_point, start_estimators, reference_kind,
                progress or (lambda message: None), watched)
            entries.append(entry)
            samples_per_point.append(point_samples)
            if on_point:
                on_point(results())
    finally:  # stopped or failed: nothing more starts
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)
    return results()


class _PointInputs(NamedTuple):
    """What one sweep point's estimates are computed from."""

    point: SweepPoint
    env: Any
    policy: Policy
    params: Any
    obs_stats: RunningStatistics | None
    start_states: Any
    key: jax.Array
    chunk_size: int | None
    description: dict | None
    """What shapes this point's programs besides the estimator (``None``: none is kept)."""


def _queue_estimators(executors: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
                      settings: CompareSettings, at: _PointInputs, watched: dict[Future, str],
                      order: tuple[EstimatorSpec, ...]) -> list[Future]:
    """Each estimator's programs at the point traced and lowered on the first of ``executors``
    (``prepare_sampling``: a setting refused there is found before the estimators queued ahead
    compile), then compiled and run on the second, queued in ``order`` and added to ``watched``;
    the runs' futures, in ``settings.specs`` order."""
    horizon = at.point.horizon
    tracer, pool = executors

    def prepare(spec: EstimatorSpec):
        estimator = estimators.make(spec.name, at.env, at.policy,
                                    **estimator_settings(spec, settings, horizon))
        key_number = _key_number((spec.label, settings.estimator_seed) if settings.estimator_seed
                                 else spec.label)  # (seed 0: the keys before estimator_seed)
        return prepare_sampling(
            estimator, at.params, at.start_states, jax.random.fold_in(at.key, key_number),
            settings.num_estimates, settings.critic_warmup, obs_stats=at.obs_stats,
            chunk_size=at.chunk_size,
            description=_estimator_description(at.description, spec.label, estimator))

    prepared = {spec.label: tracer.submit(prepare, spec) for spec in order}
    runs = {spec.label: pool.submit(lambda label=spec.label: prepared[label].result()())
            for spec in order}
    for futures in (prepared, runs):
        watched.update({futures[spec.label]: f"{spec.label} at {settings.where(at.point)}"
                        for spec in order})
    return [runs[spec.label] for spec in settings.specs]


def _result_or_first_refusal(future: Future, watched: dict[Future, str]):
    """``future``'s result, unless an estimator in ``watched`` refuses a setting as its program
    is traced: that is raised as soon as it happens, naming the spec and the point, not after
    the estimators ahead of it have run."""
    while True:
        for other, name in watched.items():
            if other.done() and not other.cancelled() and isinstance(other.exception(),
                                                                     SettingError):
                raise SettingError(f"estimators: {name}: {other.exception()}") from None
        if future.done():
            return future.result()
        wait([other for other in watched if not other.done()], return_when=FIRST_COMPLETED)


def _compare_at_point(settings: CompareSettings, at: _PointInputs,
                      start_estimators: Callable[[], list[Future]], reference_kind: str,
                      progress: Callable[[str], None], watched: dict[Future, str]
                      ) -> tuple[dict, dict]:
    """One sweep point: the reference gradient, then each estimator's samples (the futures
    ``start_estimators()`` returns once the reference is done: ``_queue_estimators``' or those it
    queued before) and statistics (and the per-step split): its results.json entry and samples."""
    point, horizon = at.point, at.point.horizon
    where = settings.where(point)
    progress(f"{where}: reference ({reference_kind})")
    reference_started = time.perf_counter()
    reference, reference_se, ref_samples = _reference_gradient(
        reference_kind, at.env, at.policy, at.params, at.obs_stats, at.start_states,
        jax.random.fold_in(at.key, _key_number("reference")), horizon, settings, at.chunk_size,
        at.description)
    reference_seconds = time.perf_counter() - reference_started
    point_samples = {"reference": reference, "reference_standard_error": reference_se}
    if ref_samples is not None:
        point_samples["reference_estimates"] = np.asarray(ref_samples, np.float32)
    per_estimator = {}
    for spec, future in zip(settings.specs, start_estimators(), strict=True):
        progress(f"{where}: {spec.label}")
        samples, timing = _result_or_first_refusal(future, watched)
        per_estimator[spec.label] = _statistics(samples, reference, reference_se) | timing
        point_samples[f"estimates/{spec.label}"] = np.asarray(samples, np.float32)
    entry = {
        "sweep_value": point.value,
        "horizon": horizon,
        "env_settings": dict(point.env_settings),
        "num_envs": point.num_envs,
        "reference": {"kind": reference_kind, "norm": float(np.linalg.norm(reference)),
                      "standard_error_norm": float(np.linalg.norm(reference_se)),
                      "seconds": reference_seconds},
        "estimators": per_estimator,
    }
    if settings.per_step:
        progress(f"{where}: per-step variance")
        key = jax.random.fold_in(at.key, _key_number("per_step"))
        entry["per_step"] = per_step.split_at_point(
            at.env, at.policy, at.params, at.obs_stats, at.start_states,
            {kind: jax.random.fold_in(key, _key_number(kind)) for kind in per_step.KINDS},
            horizon, settings.discount, settings.num_estimates)
    return entry, point_samples


def estimates_at_once(settings: CompareSettings, point_envs: list, num_parameters: int,
                      estimated_reference: bool = True) -> int | None:
    """How many estimates may run at once (``sample_gradients``' ``chunk_size``; ``None``: all), from
    the memory available, before anything compiles; a size that cannot fit at all is a one-line
    error naming it. One estimate keeps ``num_envs`` simulated states for each of its ``horizon + 1``
    steps for the reverse pass (a lower bound of what it needs; four times that is allowed per
    estimate at once), and the samples are ``[K, P]`` float32 arrays, on the device and on the
    host (at least 2: beyond that, the network's size is named). The samples file must fit."""
    per_point = (len(settings.specs) * settings.num_estimates
                 + settings.reference_estimates * estimated_reference)
    check_file_size_limit(samples_file_bytes_at_most(
        len(settings.points) * per_point * num_parameters,
        len(settings.points) * (len(settings.specs) + 3), dataclasses.asdict(settings)),
        f"the comparison's {SAMPLES_FILE}")
    available = available_memory_bytes()
    if available is None:
        return None
    available *= settings.devices
    per_estimate = max(state_bytes(env) * point.num_envs * (point.horizon + 1)
                       for env, point in zip(point_envs, settings.points, strict=True))
    if per_estimate > available:
        raise SettingError(
            f"num_envs={settings.num_envs} x horizon={settings.horizon} needs at least "
            f"{per_estimate / 2**30:,.1f} GiB for one estimate's simulated states, and about "
            f"{available / 2**30:,.1f} GiB are available; lower num_envs or horizon")
    for name in ("num_estimates", "reference_estimates")[:1 + estimated_reference]:
        needed, fits = 2 * getattr(settings, name) * num_parameters * 4, available // (8 * num_parameters)
        if needed > available:
            raise SettingError(
                f"{name}={getattr(settings, name)} gradients of {num_parameters} parameters need "
                f"{needed / 2**30:,.1f} GiB, and about {available / 2**30:,.1f} GiB are available; "
                + (f"lower {name} (at most {fits:,} fit)" if fits >= 2 else "lower hidden_sizes "
                   f"{settings.hidden_sizes} (not even 2 of its gradients fit)"))
    at_once = available // (4 * per_estimate)
    largest = max(settings.num_estimates, settings.reference_estimates * estimated_reference)
    return None if at_once >= largest else max(1, int(at_once))


def _reference_gradient(kind: str, env, policy: Policy, params, obs_stats, start_states,
                        key: jax.Array, horizon: int, settings: CompareSettings,
                        chunk_size: int | None = None, description: dict | None = None):
    """The reference gradient ``[P]`` at one sweep point, its standard error ``[P]`` and the
    samples it averages ``[R, P]`` (``None`` for the exact, closed-form one).
    ``description``: the comparison's and the point's, to keep the estimated reference's
    programs (``sample_gradients``)."""
    if kind == "exact":
        reference = np.asarray(ravel_pytree(_compiled_exact_gradient(
            env, params, start_states, horizon, settings.discount))[0], np.float64)
        return reference, np.zeros_like(reference), None
    spec = EstimatorSpec.parse(kind)
    estimator = estimators.make(spec.name, env, policy,
                                **estimator_settings(spec, settings, horizon))
    samples, _ = sample_gradients(estimator, params, start_states, key,
                                  settings.reference_estimates, 0, obs_stats=obs_stats,
                                  chunk_size=chunk_size,
                                  description=_estimator_description(description, kind, estimator))
    return (*reference_from_samples(samples), samples)


def _point_description(settings: CompareSettings, point: SweepPoint, env) -> dict | None:
    """What shapes a point's programs besides the estimator: the comparison's settings, the
    point and the env's module source (an env registered from a user's file: its code runs in
    the programs); ``None`` (not kept) when that module has no source file to fingerprint."""
    env_source = program_cache.module_fingerprint(type(env.unwrapped).__module__)
    return None if env_source is None else {
        "comparison": dataclasses.asdict(settings), "point": point._asdict(),
        "env_module": env_source}


def _estimator_description(point_description: dict | None, label: str, estimator) -> dict | None:
    """What shapes ``estimator``'s programs at a point: the point's description, its label and
    its module's source; ``None`` (not kept) without a point description or when the module has
    no source file to fingerprint (an estimator defined in a notebook or ``__main__``)."""
    if point_description is None:
        return None
    source = program_cache.module_fingerprint(type(estimator).__module__)
    return None if source is None else point_description | {"estimator": label,
                                                            "estimator_module": source}


def _statistics(samples, reference, reference_se) -> dict:
    """``gradient_statistics`` of one estimator's samples, with the bootstrap interval of the
    variance and the variance relative to the squared reference (comparable across objectives,
    as the batch sweep's)."""
    stats = gradient_statistics(samples, reference, reference_se)
    stats["variance_trace_interval"] = bootstrap_interval(samples, variance_trace)
    stats["relative_variance"] = (stats.get("variance_trace") or float("nan")) / max(
        float(reference @ reference), 1e-300)
    return stats


def _key_number(value) -> int:
    """A stable 31-bit number for ``value`` (its repr), to fold into a key."""
    return zlib.crc32(repr(value).encode()) & 0x7FFFFFFF
