"""A training run's checkpoints: ``checkpoints/<update>/`` in the run folder, orbax
``CheckpointManager`` checkpoints (the last ``KEPT_CHECKPOINTS``), each with two items: ``state``
(the ``TrainState``) and ``history`` (every metrics row up to that update; orbax reserves the
name ``metrics``). A checkpoint is the commit point of a call of ``run_updates``: what it holds is
the run. ``checkpoints/<update>.sha256`` is the digest of its files, checked before restoring;
written after orbax's commit, it ends the save (a checkpoint without one, beside one with one, is
not restored).

Orbax writes each checkpoint to a temporary folder and renames it when complete; a full disk is
one line naming the folder."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffpg.devices import barrier, is_primary
from diffpg.envs.core import SettingError
from diffpg.folders import (
    file_system_errors,
    is_storage_error,
    not_diffpg_s,
    read_regular_file,
    write_atomically,
)
from diffpg.training import TrainState

KEPT_CHECKPOINTS = 2
DIGEST_SUFFIX = ".sha256"
"""``checkpoints/<update>.sha256`` holds the SHA-256 of the files of checkpoint ``<update>`` and
their names: orbax has no checksum of its own, and a flipped byte in an array file restores
silently."""

DEEPEST_FILE = ("checkpoints/2147483647.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/"
                "ocdbt.process_0/d/" + "f" * 32 + ".tmp")
"""The longest path below a run folder that a checkpoint's save writes (the update's number at
its largest, orbax's temporary names, a data file's hash): what the folder's path leaves room
for (``diffpg.folders.check_path_room``)."""


def counter_value(counter: jax.Array) -> int:
    """A step counter as an int (every seed of a multi-seed run has the same count)."""
    return int(np.ravel(counter)[0])


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


def check_checkpointable(run_dir: Path) -> None:
    """Refuse a run folder whose path is not UTF-8 (bytes a file system allows, which Python
    keeps as escapes): orbax's TensorStore can neither write nor read checkpoints there."""
    try:
        str(run_dir.absolute()).encode()
    except UnicodeEncodeError:
        raise SettingError(f"the run folder {str(run_dir)!r} has a name that is not UTF-8, where "
                           "the checkpoint library (orbax) cannot write or read; allowed: a "
                           "UTF-8 name (rename the folder; for a new run, give --out another)") from None


def _check_no_special_files(folder: Path) -> None:
    """Refuse a FIFO, socket or device (or a link to one) inside ``folder``: orbax opens each
    checkpoint's metadata to list them, in a thread that a FIFO blocks forever (and a process
    that cannot end) and a device feeds without end."""
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                mode = (Path(root) / name).stat().st_mode
            except OSError:  # (a link to nowhere: its checkpoint does not restore, and is named)
                continue
            if not stat.S_ISREG(mode):
                raise SettingError(
                    f"{str(Path(root) / name)!r} is not a regular file (a FIFO, a socket or a "
                    "device, or a link to one), which no checkpoint holds and which would "
                    "block reading the checkpoints; remove it")


def check_no_linked_checkpoints(folder: Path) -> None:
    """Refuse a checkpoint that is a link to a folder elsewhere: the run retires its oldest
    checkpoints by deleting them, which orbax cannot do through a link (a traceback at the
    retirement, every time the run resumed)."""
    for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
        if entry.is_symlink():
            raise SettingError(
                f"{str(entry)!r} is a link, and the run deletes its oldest checkpoints as it "
                "saves new ones, which it cannot do through a link; replace the link by a copy "
                f"of the folder it points to (cp -rL), or move it out of {str(folder)!r}")


def checkpoint_manager(run_dir: Path, writing: bool = False) -> ocp.CheckpointManager:
    """Orbax's manager of ``run_dir/checkpoints``. Writing (the training run itself):
    synchronous saves, the last ``KEPT_CHECKPOINTS`` kept, leftovers of interrupted saves cleaned
    up. Otherwise read-only: it changes nothing (another process may be writing)."""
    check_checkpointable(run_dir)
    _check_no_special_files(run_dir / "checkpoints")
    _drop_closed_event_loop_reports()
    if writing:
        options = ocp.CheckpointManagerOptions(max_to_keep=KEPT_CHECKPOINTS,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
    else:
        options = ocp.CheckpointManagerOptions(read_only=True)
    for attempt in range(3):
        try:
            with _quiet_orbax():
                return ocp.CheckpointManager((run_dir / "checkpoints").absolute(),
                                             options=options, item_names=("state", "history"))
        except FileNotFoundError:  # the run retired a checkpoint while orbax listed them
            if writing or attempt == 2:
                raise


def checkpoint_updates(run_dir: Path) -> list[int]:
    """Updates at which checkpoints were completed, oldest first (an interrupted save leaves
    only a temporary folder, which is not one)."""
    if not (run_dir / "checkpoints").is_dir():
        return []
    with _quiet_orbax(), checkpoint_manager(run_dir) as manager:
        return sorted(manager.all_steps())


def never_checkpointed(run_dir: Path) -> bool:
    """Whether a run stopped before its first checkpoint: no complete checkpoint and nothing
    else named as an update (resuming it starts it again from its settings). Exactly the runs
    of which ``restore_checkpoint`` says "no checkpoint yet"; anything else goes through it,
    which reports what it cannot restore."""
    folder = run_dir / "checkpoints"
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        return False  # (restore_checkpoint names it)
    return not checkpoint_updates(run_dir) and not _updates_not_folders(folder)


def _updates_not_folders(folder: Path) -> list[str]:
    """The entries of ``folder`` named as an update that are not folders (a file, a link to
    nowhere): no checkpoint to orbax, which would delete one saving that update again."""
    if not folder.is_dir():
        return []
    return [entry.name for entry in sorted(folder.iterdir())
            if entry.name.isdigit() and not entry.is_dir()]


def check_only_checkpoint_files(run_dir: Path, removing: str, through_a_link: bool) -> None:
    """Refuse (one line) a file inside a checkpoint's folder that its digest record does not
    name (a user's notes, an editor's backup): ``removing`` (replacing the run, or resuming it,
    which retires the oldest checkpoints) deletes each checkpoint whole. A ``checkpoints/`` that
    is a link elsewhere is checked when ``removing`` works ``through_a_link`` (resuming: orbax
    deletes inside it), not when it removes the link itself (``--overwrite``).
    (A checkpoint without a record, or with an earlier version's one-line record, is taken as
    orbax wrote it.)"""
    folder = run_dir / "checkpoints"
    if not folder.is_dir() or folder.is_symlink() and not through_a_link:
        return
    for update in checkpoint_updates(run_dir):
        _, *named = [line for line in (_digest_record_of(
            folder / f"{update}{DIGEST_SUFFIX}") or "").splitlines() if line] or [""]
        for name in _files_of(folder / str(update)) if named else []:
            if name not in named:
                raise not_diffpg_s(folder / str(update) / name, removing, "the run's checkpoints")


def _files_of(folder: Path) -> list[str]:
    """The files under ``folder``, as sorted paths relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _files_sha256(folder: Path, files: list[str]) -> str:
    """The SHA-256 of ``files`` (paths relative to ``folder``): their names and contents."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode())
        digest.update(read_regular_file(folder / name))  # (a FIFO there would block)
    return digest.hexdigest()


def _digest_record(folder: Path) -> str:
    """What ``<update>.sha256`` holds: the digest of the checkpoint's files, then their names,
    one a line, so that a file added later (an editor's backup, a sync tool's) is not taken
    for damage."""
    files = _files_of(folder)
    return "\n".join([_files_sha256(folder, files), *files]) + "\n"


def _digest_record_of(path: Path) -> str | None:
    """The digest record at ``path``; ``None`` when there is none; ``""`` (which matches no
    files) when it cannot be read as one: a folder, a FIFO, not UTF-8."""
    try:
        return read_regular_file(path).decode()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""


def _is_digest_record(record: str) -> bool:
    """Whether ``record`` reads as what ``_digest_record`` writes: a SHA-256 (64 hexadecimal
    digits) on its first line."""
    first = next((line for line in record.splitlines() if line), "")
    return len(first) == 64 and all(character in "0123456789abcdef" for character in first)


def _matches_its_digest(folder: Path, record: str) -> bool:
    """Whether the files a digest record names are in ``folder`` with their contents (a
    record of one line, from an earlier version, covers every file of the folder)."""
    digest, *files = [line for line in record.splitlines() if line] or [""]
    try:
        return digest == _files_sha256(folder, files or _files_of(folder))
    except OSError:  # a recorded file is gone
        return False


def _without_empty_arrays(tree: Any) -> Any:
    """``tree`` with its zero-size arrays as ``None``: orbax cannot save an array of size 0
    (MJX's state holds some, e.g. the activations of a model without activation dynamics)."""
    return jax.tree.map(lambda leaf: None if getattr(leaf, "size", 1) == 0 else leaf, tree)


def _with_empty_arrays(restored: Any, template: Any) -> Any:
    """``restored`` with the zero-size arrays of ``template`` back where it holds ``None``."""
    return jax.tree.map(lambda empty, leaf: empty if getattr(empty, "size", 1) == 0 else leaf,
                        template, restored)


def _remove_unfinished_saves(folder: Path, settle_s: float = 0.2, limit_s: float = 10.0) -> None:
    """Remove the temporary folders of a failed save, again until none has come back for
    ``settle_s`` (at most ``limit_s``): writes of the save still in flight in orbax's threads
    create their folders anew after a removal."""
    deadline, quiet_since = time.monotonic() + limit_s, time.monotonic()
    while time.monotonic() < deadline:
        leftovers = list(folder.glob("*.orbax-checkpoint-tmp*"))
        for leftover in leftovers:
            shutil.rmtree(leftover, ignore_errors=True)
        if leftovers:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= settle_s:
            return
        time.sleep(0.02)


def _is_closed_event_loop(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _drop_closed_event_loop_reports() -> None:
    """From now on, Python's reports of ``RuntimeError("Event loop is closed")`` outside any
    caller (``sys.excepthook``, ``sys.unraisablehook``, ``threading.excepthook``) are dropped:
    when a save or a restore stops (a full disk, a signal), TensorStore's other pending reads
    and writes finish on their own threads and try to wake orbax's event loop, which the stop
    closed. Every other report is left as it was (installed once, by the first
    ``checkpoint_manager``)."""
    if getattr(sys.excepthook, "drops_closed_event_loop", False):
        return
    previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook
    previous_thread_hook = threading.excepthook

    def excepthook(kind, error, trace):
        if not _is_closed_event_loop(error):
            previous_excepthook(kind, error, trace)

    def unraisablehook(report):
        if not _is_closed_event_loop(report.exc_value):
            previous_unraisablehook(report)

    def thread_hook(report):
        if not _is_closed_event_loop(report.exc_value):
            previous_thread_hook(report)

    excepthook.drops_closed_event_loop = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    threading.excepthook = thread_hook


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, rows: list[dict],
                    settings: dict | None = None) -> None:
    """Save ``state``, the metrics ``rows`` and the run's ``settings`` (``to_json``) as the
    checkpoint of the state's update, and record the digest of its files. Every process calls
    it; the primary one writes the digest."""
    update = counter_value(state.update)
    folder = Path(manager.directory)
    try:
        with _quiet_orbax():
            manager.save(update, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_without_empty_arrays(state)),
                history=ocp.args.JsonSave({"rows": rows} | (
                    {"settings": settings} if settings is not None else {}))))
    except Exception as error:
        if is_storage_error(error):
            # Orbax's unfinished writes report the same failure again (absl's log, from their
            # threads, while the leftovers are removed below), and TensorStore's, finishing
            # after orbax closed its event loop, report that (asyncio's).
            for name in ("absl", "asyncio"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        _remove_unfinished_saves(folder)  # nothing half-written stays
        if is_storage_error(error):
            last = checkpoint_updates(folder.parent)
            earlier = f"the last complete one is of update {last[-1]}" if last else "the first"
            with file_system_errors(folder.parent, f"the checkpoint of update {update} ({earlier})"):
                raise
        raise
    barrier("diffpg: checkpoint saved")
    if not is_primary():
        return
    write_atomically(folder / f"{update}{DIGEST_SUFFIX}", _digest_record(folder / str(update)))
    kept = {str(step) for step in manager.all_steps()}
    for digest in folder.glob(f"*{DIGEST_SUFFIX}"):
        if digest.name.removesuffix(DIGEST_SUFFIX) not in kept:
            digest.unlink()


def _shapes_match(state_folder: Path, abstract: Any) -> bool:
    """Whether the arrays stored in ``state_folder`` have the shapes of ``abstract`` (compared
    as multisets; ``True`` when the metadata cannot be read: the restore then reports it)."""
    try:
        with _quiet_orbax():  # (a relative path reads as a checkpoint without item metadata)
            metadata = ocp.StandardCheckpointer().metadata(state_folder.absolute())
    except Exception:  # orbax raises many types for unreadable files
        return True
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    stored = [tuple(leaf.shape) for leaf in jax.tree.leaves(
        tree, is_leaf=lambda x: hasattr(x, "shape")) if hasattr(leaf, "shape")]
    wanted = [tuple(leaf.shape) for leaf in jax.tree.leaves(abstract)]
    return not stored or sorted(stored) == sorted(wanted)


def restore_checkpoint(run_dir: Path, template: TrainState, update: int | None = None,
                       ) -> tuple[TrainState, dict, list[tuple[int, str]]]:
    """The newest checkpoint that restores into the structure of ``template`` (with ``update``:
    that one only): its state, its history (``"rows"``: the metrics rows; ``"settings"``: what
    the run was trained with, absent in checkpoints older than that record), and the newer ones
    that could not (``(update, reason)``: corrupt, or their digest does not match).

    Raises ``SettingError`` naming the newest checkpoint when none restores, or ``update`` when
    the run has no such checkpoint.
    """
    folder = run_dir / "checkpoints"
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise SettingError(f"{str(folder)!r} is not a folder, where the run keeps its "
                           "checkpoints (a file, or a link to nowhere); put its checkpoints "
                           "back there")
    updates = checkpoint_updates(run_dir)
    # A run whose checkpoints have digests (every run since they were introduced) restores only
    # checkpoints that have theirs: the digest, written after orbax's commit, is the save's end.
    digested = {step for step in updates if (folder / f"{step}{DIGEST_SUFFIX}").exists()}
    not_folders = _updates_not_folders(folder)
    if not updates and not_folders:
        raise SettingError(f"checkpoint {not_folders[-1]} of run={str(run_dir)!r} cannot be "
                           "restored (it is not a folder: a file, or a link to nowhere), and "
                           "the run has no other; put the checkpoint back, or remove it and "
                           "start again with diffpg train --resume RUN")
    if not updates:
        raise SettingError(f"run={str(run_dir)!r} has no checkpoint yet (a run writes its "
                           "first after its first --updates-per-call updates; one that stopped "
                           "before it starts again with diffpg train --resume RUN)")
    if update is not None:
        if update not in updates:
            raise SettingError(f"checkpoint={update} is not one of the run's checkpoints; "
                               f"allowed: {updates}")
        updates = [update]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _without_empty_arrays(template))
    # An update's name on what is not a folder (a file, a link to nowhere) is no checkpoint to
    # orbax, which would delete it when saving that update again: reported, and set aside.
    failed = [(int(name), "it is not a folder (a file, or a link to nowhere)")
              for name in not_folders]
    with _quiet_orbax(), checkpoint_manager(run_dir) as manager:
        for update in reversed(updates):
            record = _digest_record_of(folder / f"{update}{DIGEST_SUFFIX}")
            if record is None and digested - {update}:
                record = _digest_of_a_save_ending(folder / f"{update}{DIGEST_SUFFIX}")
                if record is None:
                    failed.append((update, "it has no SHA-256 digest where the run's other "
                                           "checkpoint has one: its save stopped before the "
                                           "digest was written, or the digest was removed"))
                    continue
            digest = folder / f"{update}{DIGEST_SUFFIX}"
            if record is not None and not _is_digest_record(record):
                failed.append((update, f"its digest record {str(digest)!r} is not one (a folder, "
                                       "empty, or other bytes than a SHA-256 and file names), so "
                                       "its files cannot be checked"))
                continue
            if record is not None and not _matches_its_digest(folder / str(update), record):
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
            except Exception as error:  # orbax raises many types for corrupt or mismatched files
                failed.append((update, f"{type(error).__name__}: {_reason(error)}"))
                continue
            if counter_value(state.update) != update:  # a folder renamed by hand
                failed.append((update, f"it holds the state of update "
                                       f"{counter_value(state.update)}, not {update}"))
                continue
            return state, dict(restored.history), failed
    newest, reason = failed[0]
    verdict = ("the checkpoint itself may be intact" if reason.startswith("its digest record")
               else "it is corrupt or from other settings")
    raise SettingError(f"checkpoint {str(folder / str(newest))!r} cannot be restored ({reason}); "
                       f"{verdict}, and no older checkpoint restores")


def _digest_of_a_save_ending(path: Path, wait_s: float = 5.0) -> str | None:
    """The digest record at ``path`` once it appears, within ``wait_s`` seconds: a run being
    trained writes it right after orbax's commit, so a reader (``diffpg eval`` during
    training) can find a checkpoint a moment before its digest. ``None`` if it never comes."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        record = _digest_record_of(path)
        if record is not None:
            return record
    return None


def _reason(error: BaseException) -> str:
    """The first line of a restore's error, without what TensorStore appends for programs (``See
    full TensorStore details: <bound method ...>``), at most 200 characters."""
    line = (str(error).strip().splitlines() or [""])[0]
    return line.split("See full TensorStore")[0].rstrip()[:200]


def set_aside(run_dir: Path, update: int) -> Path:
    """Rename an unreadable checkpoint out of the way (``<update>.unreadable``): resuming can save
    that update again, and nothing is deleted."""
    folder = run_dir / "checkpoints"
    target, earlier = folder / f"{update}.unreadable", 0
    while target.exists() or target.is_symlink():  # one set aside before: keep it too
        earlier += 1
        target = folder / f"{update}.unreadable.{earlier}"
    (folder / str(update)).rename(target)
    digest = folder / f"{update}{DIGEST_SUFFIX}"
    if digest.is_dir() and not digest.is_symlink():  # not a record: set aside with the rest
        digest.rename(target / digest.name)
    else:
        digest.unlink(missing_ok=True)
    return target
