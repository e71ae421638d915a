"""``diffpg compare``: every estimator's gradient on the same policy and the same start states.

For each horizon ``T`` the run draws ``num_envs`` start states once, builds each estimator for the
objective ``J_T = E[sum_{t<T} gamma^t r_t]`` (with the settings the estimator declares for it,
``diffpg.estimators.comparison_settings``: e.g. SHAC ends its last window at ``T``), warms up
whatever it learns (its ``update``) on the fixed policy, takes ``num_estimates`` independent
estimates (vmapped), and compares them with a reference gradient: exact on the LQR (``jax.grad``
of the closed-form return), otherwise the mean of ``reference_estimates`` estimates of an unbiased
estimator with its standard error. Statistics are defined in ``diffpg.stats``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jax.flatten_util import ravel_pytree

from diffpg import envs, estimators, per_step, program_cache
from diffpg.devices import (
    available_memory_bytes,
    check_devices,
    shard_batch,
    state_bytes,
    to_host,
)
from diffpg.envs.core import SettingError
from diffpg.estimators.base import check_hidden_sizes, check_positive_int
from diffpg.folders import check_file_size_limit
from diffpg.normalization import RunningStatistics, init_statistics
from diffpg.options import check_not_owned, check_seed, parse_options, parse_spec
from diffpg.policy import Policy, make_gaussian_mlp_policy, make_linear_gaussian_policy
from diffpg.stats import (
    bootstrap_interval,
    gradient_statistics,
    reference_from_samples,
    variance_trace,
)

SWEEPS = ("none", "horizon", "stiffness", "batch")
STIFFNESS_ENVS = ("contact", "curling")
"""The envs with a ``stiffness`` setting (the stiffness sweep's)."""

CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1,
                        "xla_cpu_parallel_codegen_split_count": 1}
"""XLA:CPU options a comparison's loops compile with (the critics' warm-up, run for hundreds of
rounds): XLA's loop emitters for fusions, LLVM's ``-O1``, and one LLVM module per program. A
comparison compiles some 75 programs and runs each once, so compiling is most of its time on a
CPU; these options halve it (BENCHMARKS.md section 4). A jaxlib that no longer knows them
compiles with its defaults."""

CPU_RUN_ONCE_OPTIONS = CPU_COMPILER_OPTIONS | {"xla_backend_optimization_level": 0}
"""XLA:CPU options for a program that runs once in a few milliseconds (the estimates): LLVM
without optimisation, which compiles in less than half the CPU time and runs a few times
slower (BENCHMARKS.md section 4)."""


def compile_program(jitted, *args, description: dict | None = None,
                    cpu_options: dict = CPU_COMPILER_OPTIONS):
    """``jitted`` lowered for ``args`` and compiled (with ``cpu_options`` on a CPU).

    ``description``: everything besides ``args``' shapes that shapes the program (JSON-able);
    given, the compiled program is kept across processes under it (``diffpg.program_cache``).
    """
    options = cpu_options if jax.default_backend() == "cpu" else {}
    key = None
    if description is not None:
        key = program_cache.program_key(description | {
            "args": program_cache.avals_fingerprint(args), "compiler_options": options})
    return program_cache.load_or_compile(key, lambda: _lower_and_compile(jitted, args, options))


def _lower_and_compile(jitted, args, options: dict):
    lowered = jitted.lower(*args)
    if options:
        try:
            return lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as error:
            if "compile option" not in str(error):
                raise
    return lowered.compile()


class EstimatorSpec(NamedTuple):
    """An estimator name with setting overrides, written ``name`` or ``name:key=value,key=value``
    (values are Python literals)."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.overrides)

    @classmethod
    def parse(cls, text: str) -> EstimatorSpec:
        name, overrides = parse_spec(text)
        estimators.registration(name)  # a clear error for an unknown name
        return cls(name, tuple(overrides.items()))


class SweepPoint(NamedTuple):
    value: float
    horizon: int
    env_settings: tuple[tuple[str, Any], ...]
    num_envs: int


COMPARISON_OWNS = {"horizon": "the comparison's --horizon (or its sweep)",
                   "discount": "the comparison's --discount"}
"""Estimator settings the comparison sets itself (its objective J_T), with the option to use."""


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    env: Annotated[str, tyro.conf.arg(help="Environment: " + ", ".join(envs.names()) + ".")] = "lqr"
    backend: str | None = None
    """Brax physics backend; None: the env's measured default."""
    env_options: tuple[str, ...] = ()
    """Environment settings as key=value (e.g. start=0.8 for the contact env)."""
    episode_length: int | None = None
    """Time limit; None: the env's default (at least the largest horizon)."""
    estimators: Annotated[tuple[str, ...], tyro.conf.arg(help=(
        "Estimator specs: name or name:key=value,... (e.g. reinforce:baseline=none or "
        "shac:window=2); none given: every registered estimator. Built in: "
        + ", ".join(estimators.names()) + "."))] = ()
    num_estimates: int = 64
    """K independent estimates per estimator (vmapped)."""
    num_envs: int = 16
    """Start states per estimate (each estimate averages over them)."""
    horizon: int = 16
    """Horizon of the main table (and the largest of the horizon sweep)."""
    discount: float = 0.99
    """gamma, the discount of the objective J = E[sum_t gamma^t r_t]."""
    sweep: str = "horizon"
    """none; horizon: 1, 2, 4, ... up to ``horizon``; stiffness: the contact stiffness of an env
    that has one (``STIFFNESS_ENVS``) over ``stiffnesses`` at ``horizon`` (Suh et al. 2022's
    empirical bias)."""
    stiffnesses: tuple[float, ...] = (1e1, 1e2, 1e3, 1e4)
    """Contact stiffnesses of the stiffness sweep."""
    batch_budget: int | None = None
    """Env steps per estimate of the batch sweep (n trajectories x k steps at fixed n k);
    None: num_envs * horizon. Points: n = 2, 4, 8, ... with k = budget / n <= episode length."""
    reference: str = "auto"
    """auto (exact on the LQR, else the registered reference estimator), exact, or an estimator
    spec (an unbiased one: its mean over reference_estimates estimates is the reference)."""
    reference_estimates: int | None = None
    """Estimates averaged into the reference gradient (when no exact one exists); None: 16 x
    num_estimates (1,024 at the default 64)."""
    critic_warmup: int | None = None
    """Estimates run before measuring, to fit the critics to the fixed policy; None: 200 x
    num_estimates / 64, rounded up (200 at the default 64)."""
    hidden_sizes: tuple[int, ...] = (32, 32)
    """Hidden layers of the MLP policy (non-LQR envs)."""
    policy_checkpoint: str | None = None
    """A training run folder (diffpg train --out): compare the gradients at its latest policy
    (with its observation statistics) instead of a fresh one; the env must be the run's."""
    devices: int = 1
    """Devices the start states of each estimate are split over (num_envs must divide evenly)."""
    per_step: bool = False
    """Also split the variance of the pathwise (BPTT) and score-function (REINFORCE, leave-one-out)
    gradients by time step on the same rollouts (``diffpg.per_step``, K = num_estimates), with
    the closed-loop step Jacobians' largest singular values along the trajectory (analytic envs)."""
    seed: int = 0
    """Seed of the policy's initial parameters, the start states and every estimate's keys."""

    def __post_init__(self):
        env_options = parse_options(self.env_options, "env_options")
        check_not_owned(env_options, {"episode_length": "--episode-length",
                                      "backend": "--backend"}, "env_options")
        envs.check(self.env, self.episode_length, self.backend, **env_options)
        check_hidden_sizes("hidden_sizes", self.hidden_sizes)
        check_seed("seed", self.seed)
        for name in ("num_estimates", "num_envs", "horizon", "reference_estimates"):
            value = getattr(self, name)
            if value is None and name == "reference_estimates":
                continue
            if not isinstance(value, int) or value <= 0:
                raise SettingError(f"{name}={value!r} must be a positive integer")
        check_devices(self.devices, self.num_envs)
        if self.devices > 1 and self.sweep == "batch":
            raise SettingError("sweep='batch' changes num_envs per point; allowed with devices=1")
        if self.num_estimates < 2:
            raise SettingError(f"num_estimates={self.num_estimates} must be at least 2 (variance)")
        if self.reference_estimates is not None and self.reference_estimates < 2:
            raise SettingError(f"reference_estimates={self.reference_estimates} must be at least "
                               "2 (the reference's standard error)")
        if self.critic_warmup is not None and (not isinstance(self.critic_warmup, int)
                                               or self.critic_warmup < 0):
            raise SettingError(f"critic_warmup={self.critic_warmup!r} must be an integer >= 0")
        if self.sweep not in SWEEPS:
            raise SettingError(f"sweep={self.sweep!r} is not allowed; allowed values: {list(SWEEPS)}")
        labels = [EstimatorSpec.parse(text).label for text in self.estimators]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise SettingError(f"estimators: {repeated[0]} is given twice (each estimator's "
                               "results are keyed by its spec); give it once")
        for text in self.estimators:  # every spec's settings, at every horizon of the sweep
            spec = EstimatorSpec.parse(text)
            check_not_owned(dict(spec.overrides), COMPARISON_OWNS, f"estimator spec {text!r}")
            for point in self.points:
                estimators.make_settings(spec.name,
                                         **estimator_settings(spec, self, point.horizon))
        if self.reference not in ("auto", "exact"):
            check_not_owned(dict(EstimatorSpec.parse(self.reference).overrides), COMPARISON_OWNS,
                            f"reference={self.reference!r}")
        if self.batch_budget is not None:
            check_positive_int("batch_budget", self.batch_budget)
            if self.sweep == "batch" and not self.points:
                raise SettingError(f"batch_budget={self.batch_budget} holds no batch of n >= 2 "
                                   "trajectories of equal length; allowed: an even number")
        if self.sweep == "stiffness" and self.env not in STIFFNESS_ENVS:
            raise SettingError(f"sweep='stiffness' needs an env with a stiffness setting "
                               f"({' or '.join(STIFFNESS_ENVS)}), not env={self.env!r}")
        if self.reference == "exact" and self.env != "lqr":
            raise SettingError("reference='exact' exists only for env='lqr'; allowed: auto or an "
                               "unbiased estimator's spec")
        if not 0.0 <= self.discount <= 1.0:
            raise SettingError(f"discount={self.discount} must be in [0, 1]")
        if self.policy_checkpoint is not None:
            from diffpg.run_files import load_settings

            run = load_settings(Path(self.policy_checkpoint))
            if run.env != self.env:
                raise SettingError(f"policy_checkpoint={self.policy_checkpoint!r} was trained on "
                                   f"env={run.env!r}, not env={self.env!r}; pass --env {run.env}")
            default_sizes = CompareSettings.__dataclass_fields__["hidden_sizes"].default
            if tuple(self.hidden_sizes) not in (default_sizes, tuple(run.hidden_sizes)):
                raise SettingError(
                    f"hidden_sizes={tuple(self.hidden_sizes)} is not the network of "
                    f"policy_checkpoint={self.policy_checkpoint!r} ({tuple(run.hidden_sizes)}), "
                    "which is compared with its own network; drop --hidden-sizes")

    def resolved(self) -> CompareSettings:
        """These settings with the sizes that follow num_estimates filled in (a small
        comparison is small throughout): reference_estimates = 16 x num_estimates, critic_warmup
        = 200 x num_estimates / 64 rounded up, where not given."""
        return dataclasses.replace(
            self,
            reference_estimates=self.reference_estimates or 16 * self.num_estimates,
            critic_warmup=(self.critic_warmup if self.critic_warmup is not None
                           else -(-200 * self.num_estimates // 64)))

    @property
    def horizons(self) -> tuple[int, ...]:
        if self.sweep != "horizon":
            return (self.horizon,)
        values, h = [], 1
        while h < self.horizon:
            values.append(h)
            h *= 2
        return tuple(values) + (self.horizon,)

    @property
    def points(self) -> tuple[SweepPoint, ...]:
        """The sweep's points: the value swept, the horizon and environment settings at each."""
        if self.sweep == "stiffness":
            return tuple(SweepPoint(s, self.horizon, (("stiffness", s),), self.num_envs)
                         for s in self.stiffnesses)
        if self.sweep == "batch":
            budget = self.batch_budget or self.num_envs * self.horizon
            points, n = [], 2  # leave-one-out baselines need two trajectories
            while n <= budget:
                if budget % n == 0:
                    points.append(SweepPoint(n, budget // n, (), n))
                n *= 2
            return tuple(points)
        return tuple(SweepPoint(h, h, (), self.num_envs) for h in self.horizons)

    @property
    def specs(self) -> tuple[EstimatorSpec, ...]:
        """The estimators compared: those given, or every registered one."""
        return tuple(EstimatorSpec.parse(s) for s in self.estimators or estimators.names())


def make_env_and_policy(settings: CompareSettings, env_settings: dict | None = None
                        ) -> tuple[Any, Policy, bool]:
    """The environment, the policy (linear on the LQR) and whether an exact reference exists."""
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
    if settings.env == "lqr":
        policy = make_linear_gaussian_policy(env.observation_size, env.action_size,
                                             init_gain_scale=0.5)
        return env, policy, True
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size,
                                      hidden_sizes=settings.hidden_sizes)
    return env, policy, False


def estimator_settings(spec: EstimatorSpec, settings: CompareSettings, horizon: int) -> dict:
    """Settings that make the estimator target the comparison's objective ``J_T``, under the
    spec's own overrides."""
    return estimators.comparison_settings(spec.name, horizon, settings.discount,
                                          **dict(spec.overrides))


def exact_lqr_gradient(env, params, start_states, horizon, discount):
    """``jax.grad`` of the closed-form ``J_T`` averaged over the given start states."""
    from diffpg.envs.analytic import lqr_expected_return

    zero_cov = jnp.zeros((env.observation_size,) * 2)

    def objective(p, states):
        def from_state(x):
            return lqr_expected_return(env.unwrapped, p["gain"], p["bias"], jnp.exp(p["log_std"]),
                                       horizon, discount, x, zero_cov)

        return jnp.mean(jax.vmap(from_state)(states))

    # One program (which the compilation cache keeps), not one dispatch per operation; it runs
    # once, in milliseconds.
    states = start_states.pipeline_state
    return compile_program(jax.jit(jax.grad(objective)), params, states,
                           cpu_options=CPU_RUN_ONCE_OPTIONS)(params, states)


def learns(state) -> bool:
    """Whether an estimator's state holds anything to learn (a critic, a buffer...)."""
    return bool(jax.tree.leaves(state))


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
    then ``update``, if its state holds anything), then ``num_estimates`` independent estimates.

    Estimates run vmapped, ``chunk_size`` at a time (all at once by default; a chunk bounds the
    memory, which for per-sample estimators such as the optimal baseline grows with K; when the
    device runs out of memory the chunk is halved and the same estimates run again);
    ``obs_stats`` fixes the observation statistics the policy sees (a trained policy's; none:
    raw observations); ``description``: everything that shapes the estimator's programs
    besides the arrays passed (its settings, the env's, the policy's: see
    ``compile_program``), to keep them across processes (``None``: not kept). Returns flat
    samples ``[K, P]`` and timings: compile seconds, seconds per estimate (wall time / K) and
    the warm-up's seconds (compiling included).
    """
    if obs_stats is None:
        obs_stats = init_statistics(jax.tree.leaves(start_states.obs)[0].shape[-1])
    if description is not None:  # the programs close over the parameters and statistics
        description = description | {
            "closed_over": program_cache.array_fingerprint((params, obs_stats))}
    key_init, key_warm, key_samples = jax.random.split(key, 3)
    state = estimator.init(key_init, params)
    warmup_started = time.perf_counter()
    if warmup and learns(state):
        described = description and description | {"program": "warm-up", "rounds": warmup}
        warm_up = compile_program(
            warmup_program(estimator, params, obs_stats, warmup,
                           program_cache.module_name("warm_up", described)),
            state, start_states, key_warm, description=described)
        state = jax.block_until_ready(warm_up(state, start_states, key_warm))
    warmup_seconds = time.perf_counter() - warmup_started
    flat_estimates = estimates_program(estimator, params, obs_stats, program_cache.module_name(
        "flat_estimates", description and description | {"program": "estimates"}))
    keys = jax.random.split(key_samples, num_estimates)
    batch_size = chunk_size or num_estimates
    while True:  # out of memory: the same estimates, half as many at a time
        try:
            samples, compile_seconds, run_seconds = _compile_and_run(
                flat_estimates, state, start_states, keys, batch_size, description=description
                and description | {"program": "estimates", "at_once": batch_size})
            break
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" not in str(error) or batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
    return samples, {"compile_seconds": compile_seconds,
                     "seconds_per_estimate": run_seconds / num_estimates,
                     "warmup_seconds": warmup_seconds}


def _compile_and_run(flat_estimates, state, start_states, keys, batch_size, description=None):
    """Compile and run ``flat_estimates`` ``batch_size`` keys at a time: ``(samples [K, P],
    compile seconds, run seconds)``."""
    started = time.perf_counter()
    compiled = compile_program(flat_estimates, state, start_states, keys, batch_size,
                               description=description, cpu_options=CPU_RUN_ONCE_OPTIONS)
    compile_seconds = time.perf_counter() - started
    started = time.perf_counter()
    samples = to_host(jax.block_until_ready(compiled(state, start_states, keys)))
    return samples, compile_seconds, time.perf_counter() - started


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
    # Sizes against the memory before anything compiles (the parameters' shapes are traced).
    num_parameters = sum(leaf.size for leaf in jax.tree.leaves(
        jax.eval_shape(lambda: policy.init(jax.random.PRNGKey(0)))))
    chunk_size = estimates_at_once(settings, [env for env, _, _ in built], num_parameters,
                                   estimated_reference=reference_kind != "exact")
    key = jax.random.PRNGKey(settings.seed)
    key_params, key_states, key_run = jax.random.split(key, 3)
    params, obs_stats = policy.init(key_params), None
    if settings.policy_checkpoint is not None:
        params, obs_stats = load_trained_policy(Path(settings.policy_checkpoint))

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
    # other traces or runs. In one process every point's estimators are queued at once, so that
    # the next point's start while the last of this one's finish; processes of one run
    # (jax.distributed) run each point's reference before its estimators, in the same order in
    # every process, as their collectives need. Each estimator's keys are its own, so the
    # samples do not depend on the order.
    queue_ahead = jax.process_count() == 1
    pool = ThreadPoolExecutor(max_workers=2 if jax.default_backend() == "cpu" else 1)
    try:
        queued = []
        for point, (env, _, _) in list(zip(points, built, strict=True))[len(finished):]:
            start_states = shard_batch(jax.vmap(env.reset)(
                jax.random.split(key_states, point.num_envs)), settings.devices)
            # Keys depend on what is computed, not on its position in the run: a point (or an
            # estimator) gives the same numbers in any sweep or list that contains it.
            key_point = jax.random.fold_in(key_run, _key_number(
                (point.horizon, point.env_settings, point.num_envs)))
            described = ({"comparison": dataclasses.asdict(settings), "point": point._asdict()}
                         if keep_programs else None)
            at_point = _PointInputs(point, env, policy, params, obs_stats, start_states, key_point,
                                    chunk_size, described)
            if queue_ahead:
                pending = _queue_estimators(pool, settings, at_point)
                queued.append((at_point, lambda pending=pending: pending))
            else:
                queued.append((at_point, lambda at=at_point: _queue_estimators(pool, settings, at)))
        for at_point, start_estimators in queued:
            entry, point_samples = _compare_at_point(
                settings, at_point, start_estimators, reference_kind,
                progress or (lambda message: None))
            entries.append(entry)
            samples_per_point.append(point_samples)
            if on_point:
                on_point(results())
    finally:  # stopped or failed: nothing more starts
        pool.shutdown(wait=False, cancel_futures=True)
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


def _queue_estimators(pool: ThreadPoolExecutor, settings: CompareSettings, at: _PointInputs
                      ) -> list[Future]:
    """Each estimator's ``sample_gradients`` at the point, queued on ``pool`` (in
    ``settings.specs`` order)."""
    horizon = at.point.horizon

    def sample(spec: EstimatorSpec):
        estimator = estimators.make(spec.name, at.env, at.policy,
                                    **estimator_settings(spec, settings, horizon))
        return sample_gradients(
            estimator, at.params, at.start_states,
            jax.random.fold_in(at.key, _key_number(spec.label)), settings.num_estimates,
            settings.critic_warmup, obs_stats=at.obs_stats, chunk_size=at.chunk_size,
            description=_estimator_description(at.description, spec.label, estimator))

    return [pool.submit(sample, spec) for spec in settings.specs]


def _compare_at_point(settings: CompareSettings, at: _PointInputs,
                      start_estimators: Callable[[], list[Future]], reference_kind: str,
                      progress: Callable[[str], None]) -> tuple[dict, dict]:
    """One sweep point: the reference gradient, then each estimator's samples (the futures
    ``start_estimators()`` returns once the reference is done: ``_queue_estimators``' or those it
    queued before) and statistics (and the per-step split). Returns its results.json entry and
    its samples (``save_samples``)."""
    point, horizon = at.point, at.point.horizon
    where = f"{settings.sweep}={point.value:g}" if settings.sweep != "none" else f"T={horizon}"
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
        samples, timing = future.result()
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
        entry["per_step"] = _per_step(at.env, at.policy, at.params, at.obs_stats, at.start_states,
                                      jax.random.fold_in(at.key, _key_number("per_step")),
                                      horizon, settings)
    return entry, point_samples


def estimates_at_once(settings: CompareSettings, point_envs: list, num_parameters: int,
                      estimated_reference: bool = True) -> int | None:
    """How many estimates may run at once (``sample_gradients``' ``chunk_size``; ``None``: all),
    from the memory available, before anything compiles; a size that cannot fit at all is a
    one-line error naming it. One estimate keeps ``num_envs`` simulated states for each of its
    ``horizon + 1`` steps for the reverse pass (a lower bound of what it needs; four times that is
    allowed per estimate at once), and the samples are ``[K, P]`` float32 arrays, on the device
    and on the host. The samples file (every point's estimates, float32) must also fit the
    process's file-size limit."""
    per_point = (len(settings.specs) * settings.num_estimates
                 + settings.reference_estimates * estimated_reference)
    check_file_size_limit(len(settings.points) * per_point * num_parameters * 4 + 2**20,
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
        needed = 2 * getattr(settings, name) * num_parameters * 4
        if needed > available:
            raise SettingError(
                f"{name}={getattr(settings, name)} gradients of {num_parameters} parameters need "
                f"{needed / 2**30:,.1f} GiB, and about {available / 2**30:,.1f} GiB are "
                f"available; lower {name}")
    at_once = available // (4 * per_estimate)
    largest = max(settings.num_estimates, settings.reference_estimates * estimated_reference)
    return None if at_once >= largest else max(1, int(at_once))


def check_finished_points(finished, settings: CompareSettings, reference_kind: str | None = None
                          ) -> None:
    """The kept points of a stopped comparison must be the first of this one's sweep, with its
    estimators (and ``reference_kind``, when given); anything else is another comparison's."""
    points = settings.points
    if len(finished) > len(points):
        raise SettingError(f"the folder holds {len(finished)} sweep points; this comparison has "
                           f"{len(points)}")
    labels = {spec.label for spec in settings.specs}
    for (entry, _), point in zip(finished, points, strict=False):
        if (entry["sweep_value"] != point.value or entry["horizon"] != point.horizon
                or set(entry["estimators"]) != labels
                or entry["reference"]["kind"] != (reference_kind or entry["reference"]["kind"])):
            raise SettingError(
                f"the folder's point {entry['sweep_value']:g} (estimators "
                f"{sorted(entry['estimators'])}, reference {entry['reference']['kind']}) is not "
                f"this comparison's (estimators {sorted(labels)}, reference {reference_kind})")


def _reference_gradient(kind: str, env, policy: Policy, params, obs_stats, start_states,
                        key: jax.Array, horizon: int, settings: CompareSettings,
                        chunk_size: int | None = None, description: dict | None = None):
    """The reference gradient ``[P]`` at one sweep point, its standard error ``[P]`` and the
    samples it averages ``[R, P]`` (``None`` for the exact, closed-form one on the LQR).
    ``description``: the comparison's and the point's, to keep the estimated reference's
    programs (``sample_gradients``)."""
    if kind == "exact":
        reference = np.asarray(ravel_pytree(exact_lqr_gradient(
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


SAMPLES_FILE = "samples.npz"
"""The raw gradients of a comparison, beside its results.json (``load_samples`` reads them)."""


def save_samples(samples_per_point: list[dict], path: Path) -> None:
    """Write ``run_comparison``'s ``"samples"`` as one compressed ``.npz``: array
    ``point{i}/{name}`` for sweep point ``i`` (the order of results.json's ``results``) and
    ``name`` one of ``reference [P]``, ``reference_standard_error [P]`` (zeros for an exact
    reference), ``reference_estimates [R, P]`` (an estimated reference's samples) and
    ``estimates/{label} [K, P]`` (float32, one flat gradient per row, in
    ``jax.flatten_util.ravel_pytree`` order of the policy's parameters)."""
    arrays = {f"point{i}/{name}": value for i, point in enumerate(samples_per_point)
              for name, value in point.items()}
    np.savez_compressed(path, **arrays)


def load_samples(run_dir: Path | str) -> list[dict]:
    """The raw gradients of a ``diffpg compare`` run folder, per sweep point (in order): a dict
    with ``sweep_value``, ``horizon``, ``reference [P]``, ``reference_standard_error [P]``,
    ``reference_estimates [R, P]`` (only for an estimated reference) and ``estimates``:
    ``{label: [K, P]}``. ``diffpg.stats.gradient_statistics(estimates[label], reference,
    reference_standard_error)`` recomputes the run's statistics."""
    run_dir = Path(run_dir)
    results_path, samples_path = run_dir / "results.json", run_dir / SAMPLES_FILE
    for path in (results_path, samples_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a diffpg compare run folder holds "
                                    f"results.json and {SAMPLES_FILE})")
    results = json.loads(results_path.read_text())["results"]
    points = [{"sweep_value": entry["sweep_value"], "horizon": entry["horizon"], "estimates": {}}
              for entry in results]
    with np.load(samples_path) as arrays:
        for name in arrays.files:
            index, _, key = name.partition("/")
            point = points[int(index.removeprefix("point"))]
            if key.startswith("estimates/"):
                point["estimates"][key.removeprefix("estimates/")] = arrays[name]
            else:
                point[key] = arrays[name]
    return points


def load_finished_points(run_dir: Path) -> tuple[CompareSettings, tuple[tuple[dict, dict], ...]]:
    """The settings and the finished sweep points (``run_comparison``'s ``finished``) of the
    comparison in ``run_dir``: what ``diffpg compare --resume`` continues."""
    results_path, samples_path = run_dir / "results.json", run_dir / SAMPLES_FILE
    for path in (results_path, samples_path):
        if not path.is_file():
            raise SettingError(f"resume={str(run_dir)!r} has no {path.name}: not a diffpg "
                               "compare folder")
    try:
        results = json.loads(results_path.read_text())
        values = {name: tuple(value) if isinstance(value, list) else value
                  for name, value in results["settings"].items()}
        settings = CompareSettings(**values)
        samples: list[dict] = [{} for _ in results["results"]]
        with np.load(samples_path) as arrays:
            for name in arrays.files:
                index, _, key = name.partition("/")
                samples[int(index.removeprefix("point"))][key] = arrays[name]
    except SettingError as error:  # a saved setting that this version refuses
        raise SettingError(f"resume={str(run_dir)!r}: its results.json holds a setting that is "
                           f"not valid ({error})") from None
    except (ValueError, TypeError, KeyError, IndexError, OSError, EOFError,
            zipfile.BadZipFile) as error:
        raise SettingError(f"resume={str(run_dir)!r}: its results.json or {SAMPLES_FILE} is not "
                           f"a diffpg comparison's ({type(error).__name__}: {error})") from None
    finished = tuple(zip(results["results"], samples, strict=True))
    check_finished_points(finished, settings)
    return settings, finished


def _per_step(env, policy, params, obs_stats, start_states, key, horizon,
              settings: CompareSettings) -> dict:
    """``diffpg.per_step``'s split for both kinds, and the closed-loop Jacobian spectrum."""
    stats = obs_stats if obs_stats is not None else init_statistics(env.observation_size)
    result = {}
    for kind in per_step.KINDS:
        samples = per_step.sample_step_terms(kind, env, policy, params, stats, start_states,
                                             jax.random.fold_in(key, _key_number(kind)), horizon,
                                             settings.discount, settings.num_estimates)
        split = per_step.variance_by_step(samples)
        result[kind] = {"contribution": split["contribution"].tolist(),
                        "own": split["own"].tolist(), "total": split["total"]}
    if hasattr(env.unwrapped, "init_state"):
        singular = per_step.closed_loop_singular_values(env.unwrapped, policy, params, stats,
                                                        start_states.pipeline_state, horizon)
        result["jacobian_top_singular_value_median"] = np.median(singular, axis=0).tolist()
    return result


def _key_number(value) -> int:
    """A stable 31-bit number for ``value`` (its repr), to fold into a key."""
    return zlib.crc32(repr(value).encode()) & 0x7FFFFFFF


def load_trained_policy(run_dir: Path):
    """The latest policy parameters and observation statistics of a training run (its first
    seed if it trained several)."""
    from diffpg.runs import load_run

    _, state = load_run(run_dir, seed_index=0)
    return state.params, state.obs_stats
