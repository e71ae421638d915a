"""Training runs on disk: the run folder, and the loop that trains into it.

A run folder holds:

* ``settings.json``: the resolved settings (replaced atomically);
* ``checkpoints/<update>/``: orbax ``CheckpointManager`` checkpoints (the last
  ``KEPT_CHECKPOINTS``), each with two items: ``state`` (the ``TrainState``) and ``history``
  (every metrics row up to that update; orbax reserves the name ``metrics``). A checkpoint is
  the commit point of a call of ``run_updates``: what it holds is the run, and ``metrics.csv``
  and ``tensorboard/`` are rewritten from its rows on resume, so they never show a gap or a
  repeat, whatever moment a run stopped at.
  ``checkpoints/<update>.sha256`` is the digest of its files, checked before restoring;
* ``metrics.csv`` (one row per call, Brax's metric names), ``tensorboard/`` (the same scalars, x
  axis env steps) and ``learning_curve.png``: for reading;
* ``.lock``: the process that owns the folder while it trains (pid and host).

Orbax writes each checkpoint to a temporary folder and renames it when complete; SIGINT and
SIGTERM wait for a save to finish (``Interrupted``); a full disk is one line naming the folder.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffpg.devices import barrier, environment_description, is_primary
from diffpg.estimators.base import check_positive_int
from diffpg.folders import (
    atomic_path,
    disk_space,
    interruptions,
    is_disk_full,
    remove_files,
    run_lock,
    write_atomically,
)
from diffpg.options import check_seed
from diffpg.training import (
    Trainer,
    TrainSettings,
    TrainState,
    make_trainer,
    select_seed,
    summarize_seeds,
)
from envs.core import SettingError

KEPT_CHECKPOINTS = 2
PLOT_EVERY_SECONDS = 30.0
"""The learning-curve PNG is redrawn at most this often (and at the end); metrics.csv every call."""
RUN_FILES = ("settings.json", ".settings.partial.json", "metrics.csv", ".metrics.partial.csv",
             "learning_curve.png", ".learning_curve.partial.png", "checkpoints", "tensorboard",
             "policy.gif", ".policy.partial.gif", "settings.json.tmp", "metrics.csv.tmp")
"""What a run writes into its folder (and what overwriting a run removes; the partial files
are what a write cut short by SIGKILL leaves, the ``.tmp`` ones those of older versions)."""
DIGEST_SUFFIX = ".sha256"
"""``checkpoints/<update>.sha256`` holds the SHA-256 of the files of checkpoint ``<update>``:
orbax has no checksum of its own, and a flipped byte in an array file restores silently."""


class TrainingStopped(RuntimeError):
    """A run stopped itself (too many non-finite updates in a row); its checkpoint is kept."""


# ----------------------------------------------------------------------------- the run's files


def save_settings(settings: TrainSettings, run_dir: Path) -> None:
    """``settings.json``: the resolved settings, and under ``"environment"`` the versions,
    commit and device of the process that wrote it (the last session of a resumed run)."""
    values = settings.to_json() | {"environment": environment_description()}
    write_atomically(run_dir / "settings.json", json.dumps(values, indent=2))


SETTINGS_ADDED_LATER = ("anticipate_jumps", "health_tolerance")
"""Training settings added after run folders were first written: a ``settings.json`` without
them is read with their defaults, which are the behaviour before they existed. Any other
missing setting makes the file invalid."""


def load_settings(run_dir: Path) -> TrainSettings:
    path = run_dir / "settings.json"
    if not run_dir.is_dir():
        raise SettingError(f"run={str(run_dir)!r} is not a folder")
    if not path.exists():
        raise SettingError(f"run={str(run_dir)!r} has no settings.json: not a diffpg training run")
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise SettingError("it does not hold an object of settings")
        missing = [f for f in TrainSettings.__dataclass_fields__
                   if f not in values and f not in SETTINGS_ADDED_LATER]
        if missing:
            raise SettingError(f"it lacks the setting(s) {missing}")
        values.pop("environment", None)  # a record of what wrote it, not a setting
        return TrainSettings.from_json(values)
    except (ValueError, TypeError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise SettingError(f"{str(path)!r} is not valid: {lines[0]}") from None


def clear_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote into ``run_dir`` (``--overwrite``): its checkpoints would
    otherwise outrank the new run's, and its metrics would mix with them."""
    remove_files(run_dir, RUN_FILES)


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Replace ``metrics.csv`` atomically (a new file renamed over the old one)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(run_dir / "metrics.csv") as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@contextlib.contextmanager
def tensorboard_writer(run_dir: Path, start_again: bool = False):
    """The run's TensorBoard event file (one per training session); ``start_again`` first
    removes every earlier event (they are rewritten from the checkpoint's rows)."""
    from tensorboardX import SummaryWriter

    folder = run_dir / "tensorboard"
    if start_again and folder.exists():
        shutil.rmtree(folder)
    writer = SummaryWriter(str(folder), filename_suffix=f".{os.getpid()}.{time.time_ns()}")
    try:
        yield writer
    finally:
        writer.close()


def write_tensorboard(writer, run_dir: Path, rows: list[dict]) -> None:
    """Add ``rows`` (their scalars, x axis env steps) to the event file, flushed."""
    with disk_space(run_dir, "TensorBoard events"):
        for row in rows:
            for name, value in row.items():
                if name not in ("update", "env_steps"):
                    writer.add_scalar(name, value, row["env_steps"])
        writer.flush()


# ----------------------------------------------------------------------------- checkpoints


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs warnings (through absl) for situations diffpg handles itself: leftovers of an
    interrupted save, a step folder it cannot read. Errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def checkpoint_manager(run_dir: Path, writing: bool = False) -> ocp.CheckpointManager:
    """Orbax's manager of ``run_dir/checkpoints``. Writing (the training run itself):
    synchronous saves, the last ``KEPT_CHECKPOINTS`` kept, leftovers of interrupted saves cleaned
    up. Otherwise read-only: it changes nothing (another process may be writing)."""
    if writing:
        options = ocp.CheckpointManagerOptions(max_to_keep=KEPT_CHECKPOINTS,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
    else:
        options = ocp.CheckpointManagerOptions(read_only=True)
    with _quiet_orbax():
        return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options,
                                     item_names=("state", "history"))


def checkpoint_updates(run_dir: Path) -> list[int]:
    """Updates at which checkpoints were completed, oldest first (an interrupted save leaves
    only a temporary folder, which is not one)."""
    if not (run_dir / "checkpoints").is_dir():
        return []
    with _quiet_orbax(), checkpoint_manager(run_dir) as manager:
        return sorted(manager.all_steps())


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _without_empty_arrays(tree: Any) -> Any:
    """``tree`` with its zero-size arrays as ``None``: orbax cannot save an array of size 0
    (MJX's state holds some, e.g. the activations of a model without activation dynamics)."""
    return jax.tree.map(lambda leaf: None if getattr(leaf, "size", 1) == 0 else leaf, tree)


def _with_empty_arrays(restored: Any, template: Any) -> Any:
    """``restored`` with the zero-size arrays of ``template`` back where it holds ``None``."""
    return jax.tree.map(lambda empty, leaf: empty if getattr(empty, "size", 1) == 0 else leaf,
                        template, restored)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, rows: list[dict]) -> None:
    """Save ``state`` and the metrics ``rows`` as the checkpoint of the state's update, and
    record the digest of its files. Every process calls it; the primary one writes the digest."""
    update = _count(state.update)
    folder = Path(manager.directory)
    try:
        with _quiet_orbax():
            manager.save(update, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_without_empty_arrays(state)),
                history=ocp.args.JsonSave({"rows": rows})))
    except Exception as error:
        for leftover in folder.glob("*.orbax-checkpoint-tmp*"):  # nothing half-written stays
            shutil.rmtree(leftover, ignore_errors=True)
        if is_disk_full(error):
            # Orbax's unfinished writes report the same failure again when they are collected.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            last = checkpoint_updates(folder.parent)
            with disk_space(folder.parent, f"the checkpoint of update {update} (the last "
                            f"complete one is of update {last[-1] if last else 'none'})"):
                raise
        raise
    barrier("diffpg: checkpoint saved")
    if not is_primary():
        return
    write_atomically(folder / f"{update}{DIGEST_SUFFIX}", _folder_sha256(folder / str(update)))
    kept = {str(step) for step in manager.all_steps()}
    for digest in folder.glob(f"*{DIGEST_SUFFIX}"):
        if digest.name.removesuffix(DIGEST_SUFFIX) not in kept:
            digest.unlink()


def _shapes_match(state_folder: Path, abstract: Any) -> bool:
    """Whether the arrays stored in ``state_folder`` have the shapes of ``abstract`` (compared
    as multisets; ``True`` when the metadata cannot be read: the restore then reports it)."""
    try:
        with _quiet_orbax():
            metadata = ocp.StandardCheckpointer().metadata(state_folder)
    except Exception:  # orbax raises many types for unreadable files
        return True
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    stored = [tuple(leaf.shape) for leaf in jax.tree.leaves(
        tree, is_leaf=lambda x: hasattr(x, "shape")) if hasattr(leaf, "shape")]
    wanted = [tuple(leaf.shape) for leaf in jax.tree.leaves(abstract)]
    return not stored or sorted(stored) == sorted(wanted)


def restore_checkpoint(run_dir: Path, template: TrainState, update: int | None = None,
                       ) -> tuple[TrainState, list[dict], list[tuple[int, str]]]:
    """The newest checkpoint that restores into the structure of ``template`` (with ``update``:
    that one only): its state and metrics rows, and the newer ones that could not
    (``(update, reason)``: corrupt, or their digest does not match).

    Raises ``SettingError`` naming the newest checkpoint when none restores, or ``update`` when
    the run has no such checkpoint.
    """
    updates = checkpoint_updates(run_dir)
    if not updates:
        raise SettingError(f"run={str(run_dir)!r} has no checkpoint to resume from")
    if update is not None:
        if update not in updates:
            raise SettingError(f"checkpoint={update} is not one of the run's checkpoints; "
                               f"allowed: {updates}")
        updates = [update]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _without_empty_arrays(template))
    folder = run_dir / "checkpoints"
    failed: list[tuple[int, str]] = []
    with _quiet_orbax(), checkpoint_manager(run_dir) as manager:
        for update in reversed(updates):
            digest_file = folder / f"{update}{DIGEST_SUFFIX}"
            if digest_file.exists() and digest_file.read_text() != _folder_sha256(folder / str(update)):
                failed.append((update, "its files do not match their recorded SHA-256 digest"))
                continue
            if not _shapes_match(folder / str(update) / "state", abstract):
                # Checked first: orbax's failed restore of mismatched shapes leaves its
                # background threads printing tracebacks at exit.
                failed.append((update, "its arrays' shapes differ from those the run's settings "
                                       "build (was settings.json changed?)"))
                continue
            try:
                restored = manager.restore(update, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
                state = _with_empty_arrays(restored.state, template)
                return state, list(restored.history["rows"]), failed
            except Exception as error:  # orbax raises many types for corrupt or mismatched files
                lines = str(error).strip().splitlines() or [""]
                failed.append((update, f"{type(error).__name__}: {lines[0][:200]}"))
    newest, reason = failed[0]
    raise SettingError(f"checkpoint {str(folder / str(newest))!r} cannot be restored ({reason}); "
                       "it is corrupt or from other settings, and no older checkpoint restores")


def set_aside(run_dir: Path, update: int) -> Path:
    """Rename an unreadable checkpoint out of the way (``<update>.unreadable``): resuming can save
    that update again, and nothing is deleted."""
    folder = run_dir / "checkpoints"
    target = folder / f"{update}.unreadable"
    if target.exists():
        shutil.rmtree(target)
    (folder / str(update)).rename(target)
    (folder / f"{update}{DIGEST_SUFFIX}").unlink(missing_ok=True)
    return target


# ----------------------------------------------------------------------------- the loop


def train(settings: TrainSettings, run_dir: Path, resume: bool = False,
          on_log: Callable[[dict], None] | None = None,
          on_start: Callable[[], None] | None = None,
          stop_at_update: int | None = None, env=None) -> TrainState:
    """Train, logging and checkpointing into ``run_dir`` after every ``updates_per_call`` updates.

    ``resume=True`` continues from the newest readable checkpoint of ``run_dir`` (its metrics
    rows continue from that checkpoint's); otherwise whatever an earlier run left in ``run_dir``
    is removed first. ``on_start()`` runs once the run has its initial state (restored or
    fresh), before the training steps compile. ``stop_at_update`` stops early (as an interruption would),
    leaving a resumable run. ``env`` replaces the settings' environment (``make_trainer``).
    Raises ``TrainingStopped`` after ``max_consecutive_nonfinite`` non-finite updates in a row,
    with the checkpoint saved, and ``Interrupted`` on SIGINT or SIGTERM, after any save in
    progress has finished.
    """
    trainer = make_trainer(settings, env)
    # With several processes (diffpg.devices) every one trains; the primary one alone writes
    # the folder's files, and all of them write the checkpoints together.
    primary = is_primary()
    if primary:
        with disk_space(run_dir, "the run folder"):
            run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if primary:
            stack.enter_context(run_lock(run_dir))
        guard = stack.enter_context(interruptions())
        state, rows = _start(trainer, run_dir, resume, primary)
        if on_start:
            on_start()
        checkpoints = stack.enter_context(checkpoint_manager(run_dir, writing=True))
        events = None
        if primary:  # the checkpoint's rows are the run's history: the events are rebuilt
            events = stack.enter_context(tensorboard_writer(run_dir, start_again=True))
            write_tensorboard(events, run_dir, rows)
        return _loop(trainer, state, rows, run_dir, checkpoints, events, guard, on_log,
                     settings.updates if stop_at_update is None else stop_at_update, primary)


def _start(trainer: Trainer, run_dir: Path, resume: bool, primary: bool):
    """The initial state and metrics rows: restored, or fresh in a cleared folder."""
    state = trainer.init_run()
    rows: list[dict] = []
    if resume:
        state, rows, unreadable = restore_checkpoint(run_dir, state)
        barrier("diffpg: checkpoint restored")
        if primary:
            for update, reason in unreadable:
                print(f"diffpg: checkpoint {update} of {run_dir} cannot be restored ({reason}); "
                      f"set aside as {set_aside(run_dir, update)}, resuming from update "
                      f"{_count(state.update)}", file=sys.stderr)
            # The checkpoint's rows are the run's history: metrics.csv is rebuilt from them.
            write_metrics(run_dir, rows)
            save_settings(trainer.settings, run_dir)  # a longer run records its new length
    elif primary:
        clear_run(run_dir)
        save_settings(trainer.settings, run_dir)
    barrier("diffpg: run folder ready")
    return state, rows


def _loop(trainer, state, rows, run_dir, checkpoints, events, guard, on_log, last_update,
          primary):
    settings = trainer.settings
    walltime = float(rows[-1]["training/walltime"]) if rows else 0.0
    eval_key = jax.random.PRNGKey(settings.seed + 1)
    last_plot = time.perf_counter()
    while _count(state.update) < last_update:
        started = time.perf_counter()
        state, metrics = jax.block_until_ready(trainer.run_updates(state))
        training_seconds = time.perf_counter() - started
        evaluation = jax.block_until_ready(trainer.evaluate(state, eval_key))
        walltime += time.perf_counter() - started
        row = {"update": _count(state.update), "env_steps": _count(state.env_steps),
               "training/walltime": walltime,
               "training/sps": settings.updates_per_call * settings.steps_per_update
               * settings.seeds / training_seconds}
        row |= summarize_seeds(metrics | evaluation, settings.seeds)
        rows.append(row)
        in_a_row = int(np.max(np.asarray(state.opt_state.notfinite_count)))
        stopping = in_a_row >= settings.max_consecutive_nonfinite
        finished = _count(state.update) >= last_update
        with guard.critical():
            save_checkpoint(checkpoints, state, rows)
            if primary:
                write_metrics(run_dir, rows)
                write_tensorboard(events, run_dir, [row])
        if primary and (finished or stopping
                        or time.perf_counter() - last_plot > PLOT_EVERY_SECONDS):
            plot_learning_curve(rows, run_dir / "learning_curve.png", title=(
                f"{settings.env}, {settings.estimator}: {settings.num_envs} envs x "
                f"{settings.horizon} steps, {settings.seeds} seed(s) ({run_dir.name})"))
            last_plot = time.perf_counter()
        if on_log:
            on_log(row)
        if stopping:
            raise TrainingStopped(
                f"the last {in_a_row} optimiser steps had non-finite gradients "
                f"(max_consecutive_nonfinite={settings.max_consecutive_nonfinite}); stopped "
                f"at update {_count(state.update)}. The checkpoint there holds the last "
                "finite parameters; lower learning_rate or horizon, or check the "
                "environment, then resume it or start again")
    return state


def _count(counter: jax.Array) -> int:
    """A step counter as an int (every seed of a multi-seed run has the same count)."""
    return int(np.ravel(counter)[0])


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
        figure.suptitle(title, fontsize=10)
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
    settings = load_settings(run_dir)
    if eval_envs is not None:
        settings = dataclasses.replace(settings, eval_envs=eval_envs)  # validated again
    trainer = make_trainer(settings)
    state, _, unreadable = restore_checkpoint(run_dir, trainer.init_run(), checkpoint)
    for update, reason in unreadable:
        print(f"diffpg: checkpoint {update} of {run_dir} cannot be restored ({reason}); using "
              f"the one of update {_count(state.update)}", file=sys.stderr)
    seeds = trainer.settings.seeds
    if seed_index is None or seeds == 1:
        return trainer, state
    if not 0 <= seed_index < seeds:
        raise SettingError(f"seed_index={seed_index} must be in 0..{seeds - 1}")
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
    trainer, state = load_run(run_dir, checkpoint=checkpoint, eval_envs=episodes)
    settings = trainer.settings
    key = jax.random.PRNGKey(settings.seed + 1 if seed is None else seed)
    evaluation = trainer.evaluate(state, key)
    return {"update": _count(state.update)} | summarize_seeds(evaluation, settings.seeds)
