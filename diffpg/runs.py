"""Training runs on disk: the run folder, and the loop that trains into it.

A run folder holds ``settings.json`` (the resolved settings), ``metrics.csv`` (one row per call of
``run_updates``, Brax's metric names), the same scalars for TensorBoard in ``tensorboard/`` (x
axis: env steps), ``learning_curve.png`` and ``checkpoints/<update>/`` (orbax's
``CheckpointManager``; the last ``KEPT_CHECKPOINTS`` are kept). Orbax writes each checkpoint to a
temporary folder and renames it when complete, so a crash mid-save leaves the previous checkpoint
intact.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from diffpg.devices import barrier, is_primary
from diffpg.training import (
    Trainer,
    TrainSettings,
    TrainState,
    make_trainer,
    select_seed,
    summarize_seeds,
)

KEPT_CHECKPOINTS = 2
PLOT_EVERY_SECONDS = 30.0
"""The learning-curve PNG is redrawn at most this often (and at the end); metrics.csv every call."""
RUN_FILES = ("settings.json", "metrics.csv", "metrics.csv.tmp", "learning_curve.png",
             "checkpoints", "tensorboard")
"""What a run writes into its folder (and what overwriting a run removes)."""


class TrainingStopped(RuntimeError):
    """A run stopped itself (too many non-finite updates in a row); its checkpoint is kept."""


def save_settings(settings: TrainSettings, run_dir: Path) -> None:
    (run_dir / "settings.json").write_text(json.dumps(settings.to_json(), indent=2))


def load_settings(run_dir: Path) -> TrainSettings:
    path = run_dir / "settings.json"
    if not path.exists():
        raise ValueError(f"run={str(run_dir)!r} has no settings.json: not a diffpg training run")
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError("it does not hold an object of settings")
        return TrainSettings.from_json(values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{str(path)!r} is not valid: {error}") from error


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs warnings (through absl) for situations diffpg handles itself: leftovers of an
    interrupted save, a step folder it cannot read. Errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
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
        return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)


def checkpoint_updates(run_dir: Path) -> list[int]:
    """Updates at which checkpoints were completed, oldest first (an interrupted save leaves
    only a temporary folder, which is not one)."""
    if not (run_dir / "checkpoints").is_dir():
        return []
    with _quiet_orbax(), checkpoint_manager(run_dir) as manager:
        return sorted(manager.all_steps())


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, update: int) -> None:
    """Save ``state`` as the checkpoint of ``update`` and record the digest of its files."""
    with _quiet_orbax():
        manager.save(update, args=ocp.args.StandardSave(state))
    barrier("diffpg: checkpoint saved")
    if not is_primary():
        return
    folder = Path(manager.directory)
    (folder / f"{update}{DIGEST_SUFFIX}").write_text(_digest(folder / str(update)))
    kept = {str(step) for step in manager.all_steps()}
    for digest in folder.glob(f"*{DIGEST_SUFFIX}"):
        if digest.name.removesuffix(DIGEST_SUFFIX) not in kept:
            digest.unlink()


DIGEST_SUFFIX = ".sha256"
"""``checkpoints/<update>.sha256`` holds the SHA-256 of the files of checkpoint ``<update>``:
orbax has no checksum of its own, and a flipped byte in an array file restores silently."""


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def restore_checkpoint(run_dir: Path, template: TrainState,
                       ) -> tuple[TrainState, list[tuple[int, str]]]:
    """The newest checkpoint that restores into the structure of ``template``, and the newer
    ones that could not (``(update, reason)``: corrupt, or their digest does not match).

    Raises ``ValueError`` naming the newest checkpoint when none restores.
    """
    updates = checkpoint_updates(run_dir)
    if not updates:
        raise ValueError(f"run={str(run_dir)!r} has no checkpoint to resume from")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    folder = run_dir / "checkpoints"
    failed: list[tuple[int, str]] = []
    with _quiet_orbax(), checkpoint_manager(run_dir) as manager:
        for update in reversed(updates):
            digest_file = folder / f"{update}{DIGEST_SUFFIX}"
            if digest_file.exists() and digest_file.read_text() != _digest(folder / str(update)):
                failed.append((update, "its files do not match their recorded SHA-256 digest"))
                continue
            try:
                return manager.restore(update, args=ocp.args.StandardRestore(abstract)), failed
            except Exception as error:  # orbax raises many types for corrupt or mismatched files
                lines = str(error).strip().splitlines() or [""]
                failed.append((update, f"{type(error).__name__}: {lines[0][:200]}"))
    newest, reason = failed[0]
    raise ValueError(f"checkpoint {str(folder / str(newest))!r} cannot be restored ({reason}); "
                     "it is corrupt or from other settings, and no older checkpoint restores")


def set_aside(run_dir: Path, update: int) -> Path:
    """Rename an unreadable checkpoint out of the way (``<update>.unreadable``): resuming can save
    that update again, and nothing is deleted."""
    folder = run_dir / "checkpoints"
    target = folder / f"{update}.unreadable"
    if target.exists():
        shutil.rmtree(target)
    (folder / str(update)).rename(target)
    digest = folder / f"{update}{DIGEST_SUFFIX}"
    if digest.exists():
        digest.unlink()
    return target


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Replace ``metrics.csv`` atomically (a new file renamed over the old one)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    temporary = run_dir / "metrics.csv.tmp"
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(run_dir / "metrics.csv")


def clear_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote into ``run_dir`` (``--overwrite``): its checkpoints would
    otherwise outrank the new run's, and its metrics would mix with them."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def train(settings: TrainSettings, run_dir: Path, resume: bool = False,
          on_log: Callable[[dict], None] | None = None,
          stop_at_update: int | None = None, env=None) -> TrainState:
    """Train, logging and checkpointing into ``run_dir`` after every ``updates_per_call`` updates.

    ``resume=True`` continues from the latest checkpoint of ``run_dir`` (its metrics continue too);
    otherwise whatever an earlier run left in ``run_dir`` is removed first.
    ``stop_at_update`` stops early (as an interruption would), leaving a resumable run. ``env``
    replaces the settings' environment (``make_trainer``). Raises ``TrainingStopped`` after
    ``max_consecutive_nonfinite`` non-finite updates in a row, with the checkpoint saved.
    """
    trainer = make_trainer(settings, env)
    # With several processes (diffpg.devices) every one trains; the primary one alone writes
    # the folder's files, and all of them write the checkpoints together.
    primary = is_primary()
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
    state = trainer.init_run()
    rows: list[dict] = []
    if resume:
        state, unreadable = restore_checkpoint(run_dir, state)
        barrier("diffpg: checkpoint restored")
        for update, reason in unreadable if primary else ():
            print(f"diffpg: checkpoint {update} of {run_dir} cannot be restored ({reason}); set "
                  f"aside as {set_aside(run_dir, update)}, resuming from update "
                  f"{_count(state.update)}", file=sys.stderr)
        rows = [r for r in read_metrics(run_dir) if int(r["update"]) <= _count(state.update)]
    elif primary:
        clear_run(run_dir)
        save_settings(settings, run_dir)
    barrier("diffpg: run folder ready")
    walltime = float(rows[-1]["training/walltime"]) if rows else 0.0
    eval_key = jax.random.PRNGKey(settings.seed + 1)
    last_update = settings.updates if stop_at_update is None else stop_at_update
    last_plot = time.perf_counter()
    tensorboard = SummaryWriter(str(run_dir / "tensorboard")) if primary else None
    checkpoints = checkpoint_manager(run_dir, writing=True)
    try:
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
            save_checkpoint(checkpoints, state, row["update"])
            in_a_row = int(np.max(np.asarray(state.opt_state.notfinite_count)))
            stopping = in_a_row >= settings.max_consecutive_nonfinite
            finished = _count(state.update) >= last_update
            if primary:
                write_metrics(run_dir, rows)
                for name, value in row.items():
                    if name not in ("update", "env_steps"):
                        tensorboard.add_scalar(name, value, row["env_steps"])
                tensorboard.flush()
                if finished or stopping or time.perf_counter() - last_plot > PLOT_EVERY_SECONDS:
                    plot_learning_curve(rows, run_dir / "learning_curve.png")
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
    finally:
        checkpoints.close()
        if tensorboard is not None:
            tensorboard.close()
    return state


def _count(counter: jax.Array) -> int:
    """A step counter as an int (every seed of a multi-seed run has the same count)."""
    return int(np.ravel(counter)[0])


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
    state, unreadable = restore_checkpoint(run_dir, trainer.init_run())
    for update, reason in unreadable:
        print(f"diffpg: checkpoint {update} of {run_dir} cannot be restored ({reason}); using "
              f"the one of update {_count(state.update)}", file=sys.stderr)
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
