"""One training loop for every estimator: ``theta <- theta + Adam(clip(grad J / horizon))``.

Each update asks the estimator for ``grad J`` on the batch of environments it carries (SHAC: one
window of ``horizon`` steps continuing from where the last one stopped, bootstrapped by its critic)
and applies SHAC's optimiser (REFERENCES: Adam with betas (0.7, 0.95), learning rate decaying
linearly to ``final_learning_rate``, global-norm clip 1.0 on the gradient of the per-step objective
``J / horizon``, the scale of SHAC's actor loss). A non-finite gradient never reaches the
parameters: the update is skipped and counted (``training/nonfinite_updates``), environments whose
state blew up restart, and ``max_consecutive_nonfinite`` skipped updates in a row stop the run.

``updates_per_call`` updates run as one compiled ``lax.scan``; Python only runs between those
calls (evaluation, logging, checkpoints). Everything is explicit state (``TrainState``) and keys.
``seeds > 1`` vmaps whole runs over a leading seed axis; ``devices > 1`` splits the environment
batch over devices (``diffpg.devices``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

import envs
from diffpg import estimators
from diffpg.devices import batch_sharding, check_devices, replicated
from diffpg.estimators.base import (
    EstimatorState,
    check_positive,
    check_positive_int,
    check_unit_interval,
)
from diffpg.normalization import normalize
from diffpg.policy import Params, Policy, make_gaussian_mlp_policy
from diffpg.stats import mean_confidence_half_width
from envs.core import State


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    env: str = "cartpole_swingup"
    """Environment name (envs.names())."""
    env_options: tuple[str, ...] = ()
    """Environment constructor settings as key=value (e.g. velocity_cost=0.01 for pendulum)."""
    estimator: str = "shac"
    """Estimator name (diffpg.estimators.names())."""
    estimator_options: tuple[str, ...] = ()
    """Estimator settings as key=value (e.g. baseline=value for reinforce)."""
    backend: str | None = None
    """Brax physics backend; None: the env's measured default."""
    episode_length: int | None = None
    """Time limit; None: the env's default."""
    num_envs: int = 64
    """Environments simulated in parallel."""
    horizon: int = 32
    """Steps per update (SHAC's window)."""
    updates: int = 500
    """Policy updates in the whole run."""
    updates_per_call: int = 25
    """Updates compiled into one scanned call; evaluation and logging happen between calls."""
    learning_rate: float = 2e-3
    final_learning_rate: float = 1e-5
    """Linear decay target of the actor's learning rate."""
    betas: tuple[float, float] = (0.7, 0.95)
    grad_clip: float = 1.0
    """Global-norm clip on the gradient of J / horizon."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layers of the policy MLP (ELU + LayerNorm)."""
    discount: float = 0.99
    eval_envs: int = 16
    seed: int = 0
    devices: int = 1
    """Devices the environment batch is split over (data parallel; num_envs must divide evenly).
    On one CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N host devices."""
    max_consecutive_nonfinite: int = 100
    """Non-finite updates in a row after which the run stops (its last checkpoint, with finite
    parameters, is kept)."""
    seeds: int = 1
    """Independent runs trained at once with jax.vmap, seeds seed .. seed + seeds - 1; metrics
    report their mean, a 95% confidence interval and each seed's value."""

    def __post_init__(self):
        if self.env not in envs.names():
            raise ValueError(f"env={self.env!r} is not known; allowed values: {list(envs.names())}")
        if self.estimator not in estimators.names():
            raise ValueError(f"estimator={self.estimator!r} is not known; allowed values: "
                             f"{estimators.names()}")
        for name in ("num_envs", "horizon", "updates", "updates_per_call", "eval_envs", "seeds",
                     "max_consecutive_nonfinite"):
            check_positive_int(name, getattr(self, name))
        for name in ("learning_rate", "grad_clip"):
            check_positive(name, getattr(self, name))
        check_unit_interval("discount", self.discount)
        if (len(self.betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1
                                            for b in self.betas)):
            raise ValueError(f"betas={self.betas!r} must be two numbers in [0, 1)")
        if not all(isinstance(h, int) and h > 0 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes={self.hidden_sizes!r} must be positive integers")
        if self.episode_length is not None:
            check_positive_int("episode_length", self.episode_length)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        check_devices(self.devices, self.num_envs)
        if not 0 <= self.final_learning_rate <= self.learning_rate:  # also rejects NaN
            raise ValueError(f"final_learning_rate={self.final_learning_rate} must be in "
                             f"[0, learning_rate={self.learning_rate}]")

    @property
    def env_settings(self) -> dict[str, Any]:
        from diffpg.compare import EstimatorSpec

        return dict(EstimatorSpec.parse_options(self.env_options))

    @property
    def estimator_settings(self) -> dict[str, Any]:
        """The estimator's settings: horizon and discount from here, then ``TRAINING_DEFAULTS``,
        then ``estimator_options`` (which win)."""
        from diffpg.compare import EstimatorSpec

        values = {"horizon": self.horizon, "discount": self.discount}
        settings_class, _ = estimators.ESTIMATORS[self.estimator]
        if "normalize_observations" in {f.name for f in dataclasses.fields(settings_class)}:
            values["normalize_observations"] = True  # SHAC's running statistics
        values |= TRAINING_DEFAULTS.get(self.estimator, {})
        return values | dict(EstimatorSpec.parse_options(self.estimator_options))


TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    # On-policy actor with a learned value baseline on reward-to-go (A2C-like).
    "reinforce": {"baseline": "value", "reward_to_go": True},
    # Off-policy critic fitted on a replay buffer, as SAC and DDPG train it.
    "critic_backprop": {"replay_capacity": 1 << 17, "replay_batch_size": 256, "critic_iterations": 16},
}
"""Training's estimator settings where they differ from the estimators' own defaults (which
are chosen for gradient comparisons on fixed states)."""


class TrainState(NamedTuple):
    """Everything a run needs to continue."""

    params: Params
    opt_state: optax.OptState
    estimator_state: EstimatorState
    env_state: State
    key: jax.Array
    update: jax.Array  # [] updates done
    env_steps: jax.Array  # [] environment steps simulated


class Trainer(NamedTuple):
    """The pieces of a run, built once from the settings."""

    settings: TrainSettings
    env: Any
    policy: Policy
    estimator: estimators.Estimator
    optimizer: optax.GradientTransformation
    init: Callable[[jax.Array], TrainState]
    run_updates: Callable[[TrainState], tuple[TrainState, dict]]
    evaluate: Callable[[TrainState, jax.Array], dict]
    init_run: Callable[[], TrainState]
    """The run's initial state: ``init(PRNGKey(seed))``, or with ``seeds > 1`` the states of
    seeds ``seed + i`` stacked on a leading axis ``[seeds]`` (then ``run_updates`` and
    ``evaluate`` are vmapped over it and return per-seed metrics ``[seeds]``)."""


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    """SHAC's actor optimiser; ``apply_if_finite`` skips an update whose gradient is not finite."""
    schedule = optax.linear_schedule(settings.learning_rate, settings.final_learning_rate,
                                     settings.updates)
    return optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(settings.grad_clip),
                    optax.adam(schedule, b1=settings.betas[0], b2=settings.betas[1])),
        # Never apply a non-finite update: the count cannot exceed the number of updates.
        # Stopping after max_consecutive_nonfinite is train()'s job.
        max_consecutive_errors=settings.updates + 1,
    )


def make_trainer(settings: TrainSettings, env=None) -> Trainer:
    """Build env, policy, estimator and the compiled update and evaluation functions.

    ``env`` replaces the environment named by the settings (same sizes; for custom or
    instrumented environments).
    """
    if env is None:
        env = envs.make(settings.env, episode_length=settings.episode_length,
                        backend=settings.backend, **settings.env_settings)
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size,
                                      hidden_sizes=settings.hidden_sizes)
    estimator = estimators.make(settings.estimator, env, policy, **settings.estimator_settings)
    optimizer = make_optimizer(settings)

    def init(key: jax.Array) -> TrainState:
        key_policy, key_estimator, key_env, key_run = jax.random.split(key, 4)
        params = policy.init(key_policy)
        env_state = jax.vmap(env.reset)(jax.random.split(key_env, settings.num_envs))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(params, optimizer.init(params),
                          estimator.init(key_estimator, params), env_state, key_run, zero, zero)

    def one_update(state: TrainState, _) -> tuple[TrainState, dict]:
        key, key_estimate, key_reset = jax.random.split(state.key, 3)
        estimate = estimator.estimate(state.params, state.estimator_state, state.env_state,
                                      key_estimate)
        env_state, env_resets = reset_nonfinite_envs(env, estimate.env_state, key_reset)
        # Minimise -J / horizon: SHAC's actor loss is the per-step mean.
        loss_grad = jax.tree.map(lambda g: -g / settings.horizon, estimate.grad)
        grad_norm = optax.global_norm(loss_grad)
        updates, opt_state = optimizer.update(loss_grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            params, opt_state, estimate.state, env_state, key, state.update + 1,
            state.env_steps + settings.num_envs * settings.horizon,
        )
        metrics = {"training/grad_norm": grad_norm,
                   "training/objective_per_step": estimate.metrics["objective"] / settings.horizon,
                   "training/nonfinite_env_resets": env_resets}
        metrics |= {f"training/{k}": v for k, v in estimate.metrics.items() if k != "objective"}
        return new_state, metrics

    def run_updates(state: TrainState) -> tuple[TrainState, dict]:
        state, metrics = jax.lax.scan(one_update, state, None, settings.updates_per_call)
        metrics = jax.tree.map(jnp.nanmean, metrics)  # skipped updates are counted apart
        # apply_if_finite counts the updates it skipped (and the ones in a row, for train()).
        metrics["training/nonfinite_updates"] = state.opt_state.total_notfinite
        return state, metrics

    def evaluate(state: TrainState, key: jax.Array) -> dict:
        """Undiscounted return of one episode per eval env, deterministic and stochastic."""
        starts = jax.vmap(env.reset)(jax.random.split(key, settings.eval_envs))
        stats = state.estimator_state.obs_stats

        def episode_return(deterministic: bool, noise_key):
            def step(carry, step_key):
                env_state, total, alive = carry
                obs = normalize(stats, env_state.obs)
                if deterministic:
                    action = policy.mode(state.params, obs)
                else:
                    action = policy.to_action(policy.sample(state.params, obs, step_key))
                next_state = jax.vmap(env.step)(env_state, action)
                total = total + alive * next_state.reward
                alive = alive * (1.0 - next_state.done)
                return (next_state, total, alive), None

            zeros = jnp.zeros(settings.eval_envs)
            keys = jax.random.split(noise_key, env.episode_length)
            (_, total, _), _ = jax.lax.scan(step, (starts, zeros, jnp.ones_like(zeros)), keys)
            return total

        deterministic = episode_return(True, key)
        stochastic = episode_return(False, jax.random.fold_in(key, 1))
        return {"eval/episode_reward": jnp.mean(deterministic),
                "eval/episode_reward_std": jnp.std(deterministic),
                "eval/stochastic_episode_reward": jnp.mean(stochastic)}

    if settings.seeds == 1:
        def init_run() -> TrainState:
            return init(jax.random.PRNGKey(settings.seed))

        run, evaluate_all = run_updates, evaluate
    else:
        def init_run() -> TrainState:
            seeds = settings.seed + jnp.arange(settings.seeds)
            return jax.vmap(lambda s: init(jax.random.PRNGKey(s)))(seeds)

        # Every seed is evaluated on the same starts and noise (common random numbers).
        run, evaluate_all = jax.vmap(run_updates), jax.vmap(evaluate, (0, None))
    if settings.devices == 1:
        # init_run jitted: one cached executable instead of many small eager compiles (Ant: 14 s).
        return Trainer(settings, env, policy, estimator, optimizer, init, jax.jit(run),
                       jax.jit(evaluate_all), jax.jit(init_run))

    state_sharding, replicated = shard_over_batch(jax.eval_shape(init_run), settings)
    return Trainer(
        settings, env, policy, estimator, optimizer, init,
        jax.jit(run, in_shardings=(state_sharding,), out_shardings=(state_sharding, replicated)),
        jax.jit(evaluate_all, in_shardings=(state_sharding, replicated),
                out_shardings=replicated),
        jax.jit(init_run, out_shardings=state_sharding),
    )


def shard_over_batch(abstract_state: TrainState, settings: TrainSettings):
    """Shardings for data parallelism over ``settings.devices`` devices (``diffpg.devices``):
    the environment batch is split along its batch axis (axis 1 with several seeds), everything
    else (parameters, optimiser and critic states, replay buffer, key) is replicated.

    Returns ``(state shardings, the replicated sharding)``.
    """
    everywhere = replicated(settings.devices)
    split = batch_sharding(settings.devices, leading_axes=1 if settings.seeds > 1 else 0)
    state_sharding = jax.tree.map(lambda _: everywhere, abstract_state)._replace(
        env_state=jax.tree.map(lambda _: split, abstract_state.env_state))
    return state_sharding, everywhere


def reset_nonfinite_envs(env, env_state: State, key: jax.Array) -> tuple[State, jax.Array]:
    """Replace every environment of the batch ``[B]`` whose observation or reward is not finite
    by a fresh episode, so one physics blow-up does not poison every later update.

    Returns the batch and the number of environments reset (a float scalar, for the metrics).
    The fresh episodes are only simulated when some environment needs one (``lax.cond``).
    """
    flat_obs = env_state.obs.reshape(env_state.obs.shape[0], -1)
    finite = jnp.all(jnp.isfinite(flat_obs), axis=1) & jnp.isfinite(env_state.reward)

    def replace_blown_up(batch):
        fresh = jax.vmap(env.reset)(jax.random.split(key, finite.shape[0]))

        def pick(kept, new):
            mask = finite.reshape(finite.shape + (1,) * (kept.ndim - 1))
            return jnp.where(mask, kept, new)

        return jax.tree.map(pick, batch, fresh)

    env_state = jax.lax.cond(jnp.all(finite), lambda batch: batch, replace_blown_up, env_state)
    return env_state, jnp.sum(~finite).astype(jnp.float32)


def select_seed(state: TrainState, index: int) -> TrainState:
    """Seed ``index`` of a multi-seed run's state (leaves ``[seeds, ...] -> [...]``)."""
    return jax.tree.map(lambda x: x[index], state)


def summarize_seeds(values: dict[str, jax.Array], seeds: int) -> dict[str, float]:
    """Per-seed metrics ``[seeds]`` -> their mean; for ``eval/`` metrics also the half-width of
    a 95% Student-t confidence interval of the mean (``NAME_ci95``) and each seed's value
    (``NAME/seed_i``). ``training/nonfinite_updates`` is summed over seeds. One seed: as is."""
    if seeds == 1:
        return {k: float(v) for k, v in values.items()}
    row = {}
    for name, value in values.items():
        value = np.asarray(value, dtype=np.float64)
        if name == "training/nonfinite_updates":
            row[name] = float(value.sum())
            continue
        row[name] = float(value.mean())
        if name.startswith("eval/") and not name.endswith("_std"):
            row[f"{name}_ci95"] = mean_confidence_half_width(value)
            row |= {f"{name}/seed_{i}": float(v) for i, v in enumerate(value)}
    return row


# --------------------------------------------------------------------------- runs on disk
#
# A run folder holds settings.json (resolved settings), metrics.csv (one row per call of
# run_updates, Brax's metric names), the same scalars for TensorBoard in tensorboard/ (x axis: env
# steps), learning_curve.png and checkpoints/<update>/ (orbax; the last two are kept).
# Orbax writes each checkpoint to a temporary folder and renames it when complete, so a crash
# mid-save leaves the previous checkpoint intact.


KEPT_CHECKPOINTS = 2
PLOT_EVERY_SECONDS = 30.0
"""The learning-curve PNG is redrawn at most this often (and at the end); metrics.csv every call."""


def save_settings(settings: TrainSettings, out: Path) -> None:
    (out / "settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2))


def load_settings(run_dir: Path) -> TrainSettings:
    path = run_dir / "settings.json"
    if not path.exists():
        raise ValueError(f"run={str(run_dir)!r} has no settings.json: not a diffpg training run")
    values = json.loads(path.read_text())
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return TrainSettings(**values)


def checkpoint_updates(run_dir: Path) -> list[int]:
    """Updates at which complete checkpoints exist, oldest first.

    Complete: renamed to its final name (a save in progress has a temporary name) and holding the
    metadata orbax writes when it finalises a save.
    """
    folder = run_dir / "checkpoints"
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def save_checkpoint(run_dir: Path, state: TrainState) -> None:
    folder = (run_dir / "checkpoints").absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(folder / str(_count(state.update)), state, force=True)
    checkpointer.wait_until_finished()
    for old in checkpoint_updates(run_dir)[:-KEPT_CHECKPOINTS]:
        shutil.rmtree(folder / str(old), ignore_errors=True)


def restore_checkpoint(run_dir: Path, template: TrainState) -> TrainState:
    """The latest checkpoint, restored into the structure of ``template``."""
    updates = checkpoint_updates(run_dir)
    if not updates:
        raise ValueError(f"run={str(run_dir)!r} has no checkpoint to resume from")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    path = (run_dir / "checkpoints" / str(updates[-1])).absolute()
    try:
        return ocp.StandardCheckpointer().restore(path, abstract)
    except Exception as error:  # orbax raises many types for corrupt or mismatched files
        raise ValueError(f"checkpoint {str(path)!r} cannot be restored ({type(error).__name__}: "
                         f"{error}); it is corrupt or from other settings") from error


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def train(settings: TrainSettings, run_dir: Path, resume: bool = False,
          on_log: Callable[[dict], None] | None = None,
          stop_at_update: int | None = None, env=None) -> TrainState:
    """Train, logging and checkpointing into ``run_dir`` after every ``updates_per_call`` updates.

    ``resume=True`` continues from the latest checkpoint of ``run_dir`` (its metrics continue too).
    ``stop_at_update`` stops early (as an interruption would), leaving a resumable run. ``env``
    replaces the settings' environment (``make_trainer``). Raises ``TrainingStopped`` after
    ``max_consecutive_nonfinite`` non-finite updates in a row, with the checkpoint saved.
    """
    trainer = make_trainer(settings, env)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = trainer.init_run()
    rows: list[dict] = []
    if resume:
        state = restore_checkpoint(run_dir, state)
        rows = [r for r in _read_metrics(run_dir) if int(r["update"]) <= _count(state.update)]
    else:
        save_settings(settings, run_dir)
    walltime = float(rows[-1]["training/walltime"]) if rows else 0.0
    eval_key = jax.random.PRNGKey(settings.seed + 1)
    last_update = settings.updates if stop_at_update is None else stop_at_update
    last_plot = time.perf_counter()
    tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
    try:
        while _count(state.update) < last_update:
            started = time.perf_counter()
            state, metrics = jax.block_until_ready(trainer.run_updates(state))
            training_seconds = time.perf_counter() - started
            evaluation = jax.block_until_ready(trainer.evaluate(state, eval_key))
            walltime += time.perf_counter() - started
            row = {"update": _count(state.update), "env_steps": _count(state.env_steps),
                   "training/walltime": walltime,
                   "training/sps": settings.updates_per_call * settings.num_envs
                   * settings.horizon * settings.seeds / training_seconds}
            row |= summarize_seeds(metrics | evaluation, settings.seeds)
            rows.append(row)
            save_checkpoint(run_dir, state)
            _write_metrics(run_dir, rows)
            for name, value in row.items():
                if name not in ("update", "env_steps"):
                    tensorboard.add_scalar(name, value, row["env_steps"])
            tensorboard.flush()
            in_a_row = int(np.max(np.asarray(state.opt_state.notfinite_count)))
            stopping = in_a_row >= settings.max_consecutive_nonfinite
            finished = _count(state.update) >= last_update
            if finished or stopping or time.perf_counter() - last_plot > PLOT_EVERY_SECONDS:
                plot_learning_curve(rows, run_dir / "learning_curve.png")
                last_plot = time.perf_counter()
            if on_log:
                on_log(row)
            if stopping:
                raise TrainingStopped(
                    f"the last {in_a_row} updates had non-finite gradients "
                    f"(max_consecutive_nonfinite={settings.max_consecutive_nonfinite}); stopped "
                    f"at update {_count(state.update)}. The checkpoint there holds the last "
                    "finite parameters; lower learning_rate or horizon, or check the "
                    "environment, then resume it or start again")
    finally:
        tensorboard.close()
    return state


class TrainingStopped(RuntimeError):
    """A run stopped itself (too many non-finite updates in a row); its checkpoint is kept."""


def _count(counter: jax.Array) -> int:
    """A step counter as an int (every seed of a multi-seed run has the same count)."""
    return int(np.ravel(counter)[0])


def _write_metrics(run_dir: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    temporary = run_dir / "metrics.csv.tmp"
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(run_dir / "metrics.csv")


def plot_learning_curve(rows: list[dict], path: Path) -> None:
    """Evaluation return against env steps and against wall-clock time (mean over seeds with
    its 95% confidence interval when a run trains several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [float(r["env_steps"]) for r in rows]
    seconds = [float(r["training/walltime"]) for r in rows]
    reward = [float(r["eval/episode_reward"]) for r in rows]
    stochastic = [float(r["eval/stochastic_episode_reward"]) for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    band = [float(r.get("eval/episode_reward_ci95") or 0.0) for r in rows]
    low = [m - b for m, b in zip(reward, band, strict=True)]
    high = [m + b for m, b in zip(reward, band, strict=True)]
    for axis, x, label in ((axes[0], steps, "env steps"), (axes[1], seconds, "wall-clock (s)")):
        if any(band):
            axis.fill_between(x, low, high, alpha=0.25, label="95% CI over seeds")
        axis.plot(x, reward, marker="o", label="deterministic policy")
        axis.plot(x, stochastic, marker=".", alpha=0.7, label="stochastic policy")
        axis.set(xlabel=label, ylabel="eval episode return")
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def load_run(run_dir: Path, seed_index: int | None = None) -> tuple[Trainer, TrainState]:
    """The trainer of a saved run and its latest checkpoint; with ``seed_index``, the state of
    that seed alone (leading seed axis removed) when the run trained several."""
    trainer = make_trainer(load_settings(run_dir))
    state = restore_checkpoint(run_dir, trainer.init_run())
    seeds = trainer.settings.seeds
    if seed_index is None or seeds == 1:
        return trainer, state
    if not 0 <= seed_index < seeds:
        raise ValueError(f"seed_index={seed_index} must be in 0..{seeds - 1}")
    return trainer, select_seed(state, seed_index)


def evaluate_run(run_dir: Path) -> dict:
    """Reload a run's latest checkpoint and evaluate it with the run's own evaluation key."""
    trainer, state = load_run(run_dir)
    settings = trainer.settings
    evaluation = trainer.evaluate(state, jax.random.PRNGKey(settings.seed + 1))
    return {"update": _count(state.update)} | summarize_seeds(evaluation, settings.seeds)
