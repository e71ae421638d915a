"""The files of a training run's folder that are read as text: ``settings.json`` (the resolved
settings and what wrote them), ``metrics.csv`` (one row per call of ``run_updates``, Brax's metric
names) and ``tensorboard/`` (the same scalars, x axis env steps). Each is replaced atomically;
on resume ``metrics.csv`` and the TensorBoard events are rewritten from the checkpoint's rows
(``diffpg.checkpoints``), so they never show a gap or a repeat."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

from diffpg.devices import environment_description
from diffpg.envs.core import SettingError
from diffpg.folders import (
    PARTIAL_PATTERN,
    atomic_path,
    file_system_errors,
    not_diffpg_s,
    read_regular_file,
    remove_files,
    write_atomically,
)
from diffpg.training import TrainSettings

RUN_FILES = ("settings.json", "metrics.csv", "learning_curve.png", "checkpoints", "tensorboard",
             "policy.gif", PARTIAL_PATTERN, "settings.json.tmp", "metrics.csv.tmp")
"""What a run writes into its folder (names or glob patterns: what overwriting a run removes;
the partial files are what a write cut short by SIGKILL leaves, the ``.tmp`` ones those of
older versions)."""


def save_settings(settings: TrainSettings, run_dir: Path) -> None:
    """``settings.json``: the resolved settings, and under ``"environment"`` the versions,
    commit and device of the process that wrote it (the last session of a resumed run)."""
    values = settings.to_json() | {"environment": environment_description()}
    write_atomically(run_dir / "settings.json", json.dumps(values, indent=2))


SETTINGS_ADDED_LATER = ("anticipate_jumps", "health_tolerance", "soft_termination",
                        "anticipate_landings", "state_gradient_clip")
"""Training settings added after run folders were first written: a ``settings.json`` without
them is read with their defaults, which are the behaviour before they existed. Any other
missing setting makes the file invalid."""

ESTIMATOR_SETTINGS_RENAMED = {
    "value_hidden_sizes": "critic_hidden_sizes", "value_learning_rate": "critic_learning_rate",
    "value_iterations": "critic_iterations", "value_minibatches": "critic_minibatches",
}
"""Estimator settings written under an earlier name (REINFORCE's and PPO's value critic, now in
the critic vocabulary every estimator shares): a ``settings.json`` with the old name is read
with the new one."""


def load_settings(run_dir: Path, setting: str = "run") -> TrainSettings:
    """A training run's settings.json; errors name ``run_dir`` as ``setting`` (the option that
    gave it)."""
    path = run_dir / "settings.json"
    if not run_dir.is_dir():
        raise SettingError(f"{setting}={str(run_dir)!r} is not a folder")
    if not (path.exists() or path.is_symlink()):  # (a link to nowhere: named as unreadable)
        raise SettingError(f"{setting}={str(run_dir)!r} has no settings.json: not a diffpg "
                           "training run")
    try:
        values = json.loads(read_regular_file(path))
    except OSError as error:  # a folder, a FIFO, unreadable, ...
        raise SettingError(f"{str(path)!r} cannot be read ({error.strerror or error}); "
                           "restore the run's settings.json") from None
    except ValueError as error:
        raise SettingError(f"{str(path)!r} is not valid: {error}") from None
    try:
        if not isinstance(values, dict):
            raise SettingError("it does not hold an object of settings")
        missing = [f for f in TrainSettings.__dataclass_fields__
                   if f not in values and f not in SETTINGS_ADDED_LATER]
        if missing:
            raise SettingError(f"it lacks the setting(s) {missing}")
        values.pop("environment", None)  # a record of what wrote it, not a setting
        nested = values.get("estimator_settings")
        if isinstance(nested, dict):
            values["estimator_settings"] = {ESTIMATOR_SETTINGS_RENAMED.get(k, k): v
                                            for k, v in nested.items()}
        return TrainSettings.from_json(values)
    except (ValueError, TypeError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise SettingError(f"{str(path)!r} is not valid: {lines[0]}") from None


REWRITTEN_ON_RESUME = {"metrics.csv": "file", "learning_curve.png": "file",
                       "tensorboard": "folder"}
"""What a resumed run rewrites from its checkpoints, and the kind of entry each must be."""


def check_rewritable(run_dir: Path) -> None:
    """Raise ``SettingError`` naming the first of ``REWRITTEN_ON_RESUME`` that exists in
    ``run_dir`` as the other kind (a folder named metrics.csv, a file named tensorboard):
    resuming would have to delete it, and it is not the run's."""
    for name, kind in REWRITTEN_ON_RESUME.items():
        path = run_dir / name
        if path.is_symlink() and not path.exists():
            raise SettingError(f"{str(path)!r} is a link that leads nowhere (a loop or a missing "
                               f"target), where the run keeps its {name} {kind}; remove the "
                               "link and resume again")
        if path.exists() and path.is_dir() != (kind == "folder"):
            found = "a folder" if path.is_dir() else "not a folder"
            raise SettingError(f"{str(path)!r} is {found}, where the run keeps its {name} {kind} "
                               "(rewritten from the checkpoints on resume); move it away and "
                               "resume again")


RUN_FOLDER_ENTRIES = {"checkpoints": re.compile(r"\d+(\.sha256|\.unreadable(\.\d+)?|"
                                                r"\.orbax-checkpoint-tmp.*)?"),
                      "tensorboard": re.compile(r"events\.out\.tfevents\..*")}
"""The names diffpg writes inside a run's folders (checkpoints, their digests, those set aside,
an unfinished save; TensorBoard's event files)."""


def clear_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote into ``run_dir`` (``--overwrite``): its checkpoints would
    otherwise outrank the new run's, and its metrics would mix with them. A file or folder that
    diffpg does not write, inside the folders it removes whole, is refused first (one line):
    ``--overwrite`` replaces a run, never a user's own files."""
    check_only_own_files(run_dir, RUN_FOLDER_ENTRIES, "--overwrite")
    remove_files(run_dir, RUN_FILES)


def check_only_own_files(run_dir: Path, folders: dict, removing: str) -> None:
    """Refuse (one line) an entry of ``folders`` (folder name -> the names diffpg writes there)
    that diffpg does not write: what ``removing`` (an option) would delete with the folder."""
    for folder, names in folders.items():
        if (run_dir / folder).is_dir() and not (run_dir / folder).is_symlink():
            for entry in sorted((run_dir / folder).iterdir()):
                if not names.fullmatch(entry.name):
                    raise not_diffpg_s(entry, removing, f"the run's {folder}/ folder")


def logged_updates(run_dir: Path) -> int:
    """The last update ``metrics.csv`` records (0: none, or not a regular file read as one: a
    FIFO there is not waited on)."""
    try:
        text = read_regular_file(run_dir / "metrics.csv").decode()
        return max((int(float(row["update"])) for row in csv.DictReader(io.StringIO(text))),
                   default=0)
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error):
        return 0


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
    with file_system_errors(run_dir, "TensorBoard events"):
        if start_again and folder.is_symlink():  # a link elsewhere: removed, not what it names
            folder.unlink()
        elif start_again and folder.exists():
            check_only_own_files(run_dir, {"tensorboard": RUN_FOLDER_ENTRIES["tensorboard"]},
                                 "resuming (the events are rewritten)")
            shutil.rmtree(folder)
        writer = SummaryWriter(str(folder), filename_suffix=f".{os.getpid()}.{time.time_ns()}")
    try:
        yield writer
    finally:
        writer.close()


def write_tensorboard(writer, run_dir: Path, rows: list[dict]) -> None:
    """Add ``rows`` (their scalars, x axis env steps) to the event file, flushed."""
    with file_system_errors(run_dir, "TensorBoard events"):
        for row in rows:
            for name, value in row.items():
                if name not in ("update", "env_steps"):
                    writer.add_scalar(name, value, row["env_steps"])
        writer.flush()
