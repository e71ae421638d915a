"""Training runs on disk: ``train`` trains into a run folder, ``load_run`` and ``evaluate_run``
read one back.

A run folder holds ``settings.json``, ``metrics.csv``, ``tensorboard/`` (``diffpg.run_files``),
``checkpoints/`` (``diffpg.checkpoints``: a checkpoint is the commit point of a call of
``run_updates``, and on resume the metrics are rewritten from its rows, so they never show a gap
or a repeat, whatever moment a run stopped at), ``learning_curve.png``, and ``.lock``: the
process that owns the folder while it trains (pid and host). SIGINT and SIGTERM wait for a save
to finish (``Interrupted``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffpg.checkpoints import (
    check_checkpointable,
    check_no_linked_checkpoints,
    check_only_checkpoint_files,
    checkpoint_manager,
    counter_value,
    never_checkpointed,
    restore_checkpoint,
    save_checkpoint,
    set_aside,
)
from diffpg.devices import barrier, is_primary
from diffpg.envs.core import SettingError
from diffpg.envs.drawing import drawable_text
from diffpg.estimators.base import check_positive_int
from diffpg.folders import (
    atomic_path,
    check_file_size_limit,
    file_system_errors,
    interruptions,
    run_lock,
)
from diffpg.options import check_seed, seed_key
from diffpg.run_files import (
    clear_run,
    load_settings,
    logged_updates,
    save_settings,
    tensorboard_writer,
    write_metrics,
    write_tensorboard,
)
from diffpg.training import (
    Trainer,
    TrainSettings,
    TrainState,
    check_resumable_with,
    make_trainer,
    run_state_bytes,
    select_seed,
    summarize_seeds,
)

PLOT_EVERY_SECONDS = 30.0
"""The learning-curve PNG is redrawn at most this often (and at the end); metrics.csv every call."""


class TrainingStopped(RuntimeError):
    """A run stopped itself (too many non-finite updates in a row); its checkpoint is kept."""


def train(settings: TrainSettings, run_dir: Path, resume: bool = False,
          on_log: Callable[[dict], None] | None = None,
          on_start: Callable[[int], None] | None = None,
          stop_at_update: int | None = None, env=None) -> TrainState:
    """Train, logging and checkpointing into ``run_dir`` after every ``updates_per_call`` updates.

    ``resume=True`` continues from the newest readable checkpoint of ``run_dir`` (its metrics
    rows continue from that checkpoint's); otherwise whatever an earlier run left in ``run_dir``
    is removed first. ``on_start(update)`` runs once the run has its initial state (restored
    or fresh: ``update`` is where it starts), before the training steps compile.
    ``stop_at_update`` stops early (as an interruption would), leaving a resumable run. ``env``
    replaces the settings' environment (``make_trainer``).
    Raises ``TrainingStopped`` after ``max_consecutive_nonfinite`` non-finite updates in a row,
    or at the end of a run none of whose updates was finite or whose last evaluation blew up
    in every episode, with the checkpoint saved; and
    ``Interrupted`` on SIGINT or SIGTERM, after any save in progress has finished.
    """
    check_checkpointable(run_dir)  # (before the folder is made)
    if resume:
        check_no_linked_checkpoints(run_dir / "checkpoints")
    trainer = make_trainer(settings, env)
    # With several processes (diffpg.devices) every one trains; the primary one alone writes
    # the folder's files, and all of them write the checkpoints together.
    primary = is_primary()
    if primary:
        with file_system_errors(run_dir, "the run folder"):
            run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if primary:
            stack.enter_context(run_lock(run_dir))
        guard = stack.enter_context(interruptions())
        check_file_size_limit(_checkpoint_bytes(trainer), "what a checkpoint of this run writes")
        # A setting refused where the update is traced (more critic minibatches than a batch's
        # samples, a baseline's pool of one rollout) is one line before anything is written or
        # said; the first call reuses this trace.
        trainer.run_updates.trace(jax.eval_shape(trainer.init_run))
        state, rows = _start(trainer, run_dir, resume, primary, guard)
        if on_start:
            on_start(counter_value(state.update))
        run = Run(trainer, run_dir, primary, guard, rows,
                  stack.enter_context(checkpoint_manager(run_dir, writing=True)))
        if primary:  # the checkpoint's rows are the run's history: the events are rebuilt
            run.events = stack.enter_context(tensorboard_writer(run_dir, start_again=True))
            write_tensorboard(run.events, run_dir, rows)
        last_update = settings.updates if stop_at_update is None else stop_at_update
        while counter_value(state.update) < last_update:
            state, row = _train_one_call(run, state)
            finished = counter_value(state.update) >= last_update
            stopped = _record(run, state, row, finished)
            if on_log:
                on_log(row)
            if stopped:
                raise TrainingStopped(stopped)
        if primary and run.rows and not (run_dir / "learning_curve.png").exists():
            _plot(run)  # a run resumed with nothing left to do, stopped before its last plot
        return state


def _checkpoint_bytes(trainer: Trainer) -> int:
    """About the largest file a checkpoint of the trainer's state writes (orbax may put every
    array in one), with room for its metadata: 64 KiB and 1 KiB per array (orbax's largest
    metadata file holds about 360 bytes per array). A flat 1 MiB of room refused file-size
    limits that a small run's checkpoint fits 7 times over."""
    arrays = len(jax.tree.leaves(jax.eval_shape(trainer.init_run)))
    return run_state_bytes(trainer) + 2**16 + 2**10 * arrays


def _start(trainer: Trainer, run_dir: Path, resume: bool, primary: bool, guard):
    """The initial state and metrics rows: restored, or fresh in a cleared folder (a signal
    waits until the earlier run's files are gone and the new settings are written: stopped
    half-way, the folder held the old run's checkpoints without its settings, and the line's
    advice to resume failed)."""
    state = trainer.init_run()
    rows: list[dict] = []
    if resume and never_checkpointed(run_dir):  # again from its settings
        resume = False
        logged = logged_updates(run_dir) if primary else 0
        if logged:  # (checkpoints removed by hand: say so, it looked like a resume)
            print(f"diffpg: no checkpoint of {run_dir} is left, though its metrics.csv records "
                  f"{logged} updates: the run starts again from its settings", file=sys.stderr)
    if resume:
        # Orbax removes the oldest checkpoints as new ones are saved, each folder whole.
        check_only_checkpoint_files(run_dir, "resuming (older checkpoints are removed)",
                                    through_a_link=True)
        state, history, unreadable = restore_checkpoint(run_dir, state)
        rows = list(history["rows"])
        check_resumable_with(trainer.settings, history.get("settings"),
                             f"its checkpoint of update {counter_value(state.update)}")
        barrier("diffpg: checkpoint restored")
        if primary:
            for update, reason in unreadable:
                print(f"diffpg: checkpoint {update} of {run_dir} cannot be restored ({reason}); "
                      f"set aside as {set_aside(run_dir, update)}, resuming from update "
                      f"{counter_value(state.update)}", file=sys.stderr)
            # The checkpoint's rows are the run's history: metrics.csv is rebuilt from them.
            write_metrics(run_dir, rows)
            save_settings(trainer.settings, run_dir)  # a longer run records its new length
    elif primary:
        # --overwrite removes each checkpoint whole (a link to them: the link)
        check_only_checkpoint_files(run_dir, "--overwrite", through_a_link=False)
        with guard.critical():
            clear_run(run_dir)
            save_settings(trainer.settings, run_dir)
    barrier("diffpg: run folder ready")
    return state, rows


@dataclasses.dataclass
class Run:
    """A training run in progress: what each call of the loop reads and writes besides the
    ``TrainState``. Only the ``primary`` process writes the folder's files (``events``, the
    TensorBoard writer, is ``None`` elsewhere); every process writes the checkpoints."""

    trainer: Trainer
    folder: Path
    primary: bool
    guard: Any
    """``diffpg.folders.interruptions()``: a signal waits while ``guard.critical()`` writes."""
    rows: list[dict]
    """Every metrics row so far (the newest checkpoint's history, then one per call)."""
    checkpoints: ocp.CheckpointManager
    events: Any = None
    walltime: float = dataclasses.field(init=False)
    """Seconds spent training and evaluating, over every session of the run (from ``rows``)."""
    eval_key: jax.Array = dataclasses.field(init=False)
    """The key of every evaluation, ``PRNGKey(seed + 1)``: each one sees the same episodes."""
    last_plot: float = dataclasses.field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.walltime = float(self.rows[-1]["training/walltime"]) if self.rows else 0.0
        self.eval_key = seed_key(self.trainer.settings.seed + 1)


def _train_one_call(run: Run, state: TrainState) -> tuple[TrainState, dict]:
    """One call of ``run_updates`` and the evaluation after it: the new state and its metrics
    row (Brax's names; ``summarize_seeds`` adds the means over seeds)."""
    settings = run.trainer.settings
    started = time.perf_counter()
    state, metrics = jax.block_until_ready(run.trainer.run_updates(state))
    training_seconds = time.perf_counter() - started
    evaluation = jax.block_until_ready(run.trainer.evaluate(state, run.eval_key))
    run.walltime += time.perf_counter() - started
    row = {"update": counter_value(state.update), "env_steps": counter_value(state.env_steps),
           "training/walltime": run.walltime,
           "training/sps": settings.updates_per_call * settings.steps_per_update
           * settings.seeds / training_seconds}
    return state, row | summarize_seeds(metrics | evaluation, settings.seeds)


def _record(run: Run, state: TrainState, row: dict, finished: bool) -> str | None:
    """Commit a call: the checkpoint (with every row), then metrics.csv and the events, as one
    step a signal cannot cut; the learning curve at most every ``PLOT_EVERY_SECONDS``. Returns
    why the run must stop after ``max_consecutive_nonfinite`` non-finite updates in a row, or at
    its end when no update was ever finite or every evaluation episode blew up (the checkpoint
    saved), or ``None``."""
    settings = run.trainer.settings
    run.rows.append(row)
    in_a_row = int(np.max(np.asarray(state.opt_state.notfinite_count)))
    steps = counter_value(state.update) * settings.epochs * settings.minibatches
    never_finite = finished and in_a_row >= steps > 0  # a run too short to reach the limit
    blown_up = finished and float(row.get("eval/blown_up_share", 0.0)) >= 1.0
    stopping = never_finite or blown_up or in_a_row >= settings.max_consecutive_nonfinite
    with run.guard.critical():
        save_checkpoint(run.checkpoints, state, run.rows, settings.to_json())
        if run.primary:
            write_metrics(run.folder, run.rows)
            write_tensorboard(run.events, run.folder, [row])
    if run.primary and (finished or stopping
                        or time.perf_counter() - run.last_plot > PLOT_EVERY_SECONDS):
        _plot(run)
    if not stopping:
        return None
    if never_finite:
        return (f"every one of the run's {steps} optimiser steps had a non-finite gradient: "
                "nothing was learned (the checkpoint holds the initial parameters); check the "
                "environment's settings (env_options), learning_rate and horizon")
    if blown_up:
        return ("every evaluation episode of the final policy became non-finite "
                "(eval/blown_up_share=1: its actions overflow the simulation), so its returns "
                "say nothing; lower learning_rate, or check the environment's settings "
                "(env_options)")
    return (f"the last {in_a_row} optimiser steps had non-finite gradients "
            f"(max_consecutive_nonfinite={settings.max_consecutive_nonfinite}); stopped "
            f"at update {counter_value(state.update)}. The checkpoint there holds the last "
            "finite parameters; lower learning_rate or horizon, or check the "
            "environment, then resume it or start again")


def _plot(run: Run) -> None:
    settings = run.trainer.settings
    plot_learning_curve(run.rows, run.folder / "learning_curve.png", title=(
        f"{settings.env}, {settings.estimator}: {settings.num_envs} envs x "
        f"{settings.horizon} steps, {settings.seeds} seed(s) ({run.folder.name})"))
    run.last_plot = time.perf_counter()


def plot_learning_curve(rows: list[dict], path: Path, title: str = "") -> None:
    """Evaluation return against env steps and against wall-clock time (mean over seeds with
    its 95% confidence interval and each seed's own curve when a run trains several)."""
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
        axis.plot(x, reward, marker="o", label="deterministic policy"
                  + (" (mean over seeds)" if any(band) else ""))
        for index, seed in enumerate(k for k in rows[-1] if k.startswith("eval/episode_reward/seed_")):
            axis.plot(x, [float(r[seed]) for r in rows], color="C0", linewidth=0.7, alpha=0.5,
                      label="each seed" if index == 0 else None)
        axis.plot(x, stochastic, marker=".", alpha=0.7, label="stochastic policy")
        axis.set(xlabel=label, ylabel="eval episode return")
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        figure.suptitle(drawable_text(title), fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)


def load_run(run_dir: Path, seed_index: int | None = None, checkpoint: int | None = None,
             eval_envs: int | None = None) -> tuple[Trainer, TrainState]:
    """The trainer of a saved run and its newest readable checkpoint (``checkpoint``: the one
    of that update); with ``seed_index``, the state of that seed alone (leading seed axis
    removed) when the run trained several; ``eval_envs`` replaces the run's episodes per
    evaluation."""
    # Read on one device: a run trained over several reads and evaluates anywhere.
    settings = dataclasses.replace(load_settings(run_dir), devices=1)
    seeds = settings.seeds
    if seed_index is not None and not (type(seed_index) is int and 0 <= seed_index < seeds):
        raise SettingError(f"seed_index={seed_index!r} is not a seed of run={str(run_dir)!r}, "
                           f"which trained {seeds}; allowed: 0..{seeds - 1}")
    if eval_envs is not None:
        settings = dataclasses.replace(settings, eval_envs=eval_envs)  # validated again
    trainer = make_trainer(settings)
    state, history, unreadable = restore_checkpoint(run_dir, trainer.init_run(), checkpoint)
    # What it evaluates or draws is what the run trained (not a settings.json edited since).
    check_resumable_with(settings, history.get("settings"),
                         f"its checkpoint of update {counter_value(state.update)}")
    for update, reason in unreadable:
        print(f"diffpg: checkpoint {update} of {run_dir} cannot be restored ({reason}); using "
              f"the one of update {counter_value(state.update)}", file=sys.stderr)
    if seed_index is None or seeds == 1:
        return trainer, state
    return trainer, select_seed(state, seed_index)


def evaluate_run(run_dir: Path, episodes: int | None = None, seed: int | None = None,
                 checkpoint: int | None = None) -> dict:
    """Reload a run's checkpoint (the newest; ``checkpoint``: that update's) and evaluate it on
    ``episodes`` episodes (default: the run's ``eval_envs``) with the key of ``seed`` (default:
    the run's own evaluation key, ``seed + 1``, which repeats its last logged evaluation)."""
    if seed is not None:
        check_seed("seed", seed)
    if episodes is not None:
        check_positive_int("episodes", episodes)
    try:
        trainer, state = load_run(run_dir, checkpoint=checkpoint, eval_envs=episodes)
    except SettingError as error:  # the run's eval_envs, given here as episodes
        if episodes is None or not str(error).startswith(f"eval_envs={episodes} "):
            raise
        raise SettingError(str(error).replace("eval_envs", "episodes")) from None
    settings = trainer.settings
    key = seed_key(settings.seed + 1 if seed is None else seed)
    evaluation = trainer.evaluate(state, key)
    return {"update": counter_value(state.update)} | summarize_seeds(evaluation, settings.seeds)


def load_trained_policy(run_dir: Path, seed_index: int = 0, checkpoint: int | None = None):
    """The policy parameters and observation statistics of a training run's newest checkpoint
    that restores (``checkpoint``: that update's), of seed ``seed_index`` if it trained several,
    and the update they are from: ``(params, obs_stats, update)``."""
    _, state = load_run(run_dir, seed_index=seed_index, checkpoint=checkpoint)
    return state.params, state.obs_stats, counter_value(state.update)
