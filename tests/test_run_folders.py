"""Run folders that never lose data: one owner at a time, --overwrite starts afresh, any
interruption resumes without a gap or a repeat, damaged files and a full disk are one line,
settings that would surprise are refused, and every command is quiet."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_LIMIT_S, compiles, small_disk, under_ulimit

from diffpg import cli
from diffpg.checkpoints import checkpoint_updates
from diffpg.run_files import load_settings
from diffpg.runs import evaluate_run, train
from diffpg.training import settings_for

SMALL = ["--env", "pendulum", "--num-envs", "4", "--eval-envs", "2", "--hidden-sizes", "16"]


def _small(**overrides):
    return settings_for(env="pendulum", num_envs=4, horizon=8, eval_envs=2, hidden_sizes=(16,),
                        updates_per_call=2, **overrides)


def _rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _tensorboard_steps(folder: Path, tag: str = "eval/episode_reward") -> list[int]:
    """The steps of ``tag`` in the TFRecord event files of ``folder``, in file order."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def _environment() -> dict:
    return os.environ | {"PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "3"}


def _command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "diffpg.cli", *arguments]


# ----------------------------------------------------------------------------- 1. --overwrite


def test_overwrite_onto_a_longer_run_starts_a_fresh_one(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--updates", "8", "--updates-per-call", "2",
                     "--out", str(out), "shac", "--horizon", "8"]) == 0
    assert checkpoint_updates(out) == [6, 8]
    assert cli.main(["train", *SMALL, "--updates", "4", "--updates-per-call", "2", "--seed", "5",
                     "--out", str(out), "--overwrite", "shac", "--horizon", "8"]) == 0
    assert checkpoint_updates(out) == [2, 4]  # the older run's 6 and 8 are gone, not kept
    assert [r["update"] for r in _rows(out)] == ["2", "4"]
    assert _tensorboard_steps(out / "tensorboard") == [64, 128]
    assert evaluate_run(out)["update"] == 4 and load_settings(out).seed == 5


def test_overwrite_never_deletes_a_file_diffpg_did_not_write(tmp_path, capsys):
    """A user's file inside ``checkpoints/`` (or ``tensorboard/``), folders ``--overwrite``
    removes whole: it was deleted with them. Now one line naming it, and nothing removed; the
    checkpoints diffpg set aside are its own and go; a link to checkpoints elsewhere is
    removed, not followed."""
    out = tmp_path / "run"
    train(_small(updates=2), out)
    for folder in ("checkpoints", "tensorboard"):
        (out / folder / "mine.txt").write_text("notes")
        capsys.readouterr()
        assert cli.main(["train", *SMALL, "--updates", "2", "--updates-per-call", "2",
                         "--out", str(out), "--overwrite"]) == 2
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1 and "mine.txt' is not a file diffpg writes" \
            in error, error
        assert (out / folder / "mine.txt").read_text() == "notes" and checkpoint_updates(out) == [2]
        (out / folder / "mine.txt").unlink()
    (out / "checkpoints" / "2.unreadable").mkdir()
    assert cli.main(["train", *SMALL, "--updates", "2", "--updates-per-call", "2",
                     "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "2.sha256"]
    # Checkpoints on another disk (checkpoints/ a link to them) are the run's: read through
    # the link; --overwrite removes the link, never the files it points to.
    elsewhere = tmp_path / "other_disk"
    (out / "checkpoints").rename(elsewhere)
    (out / "checkpoints").symlink_to(elsewhere)
    assert evaluate_run(out)["update"] == 2
    assert cli.main(["train", *SMALL, "--updates", "2", "--updates-per-call", "2",
                     "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in elsewhere.iterdir()) == ["2", "2.sha256"]
    assert not (out / "checkpoints").is_symlink() and checkpoint_updates(out) == [2]


@pytest.mark.parametrize(("marker", "arguments", "kind"), [
    ("results.json", ["train", *SMALL, "--updates", "2", "--updates-per-call", "2"],
     "a comparison (results.json), which a training run does not replace"),
    ("settings.json", ["compare", "--num-estimates", "2"],
     "a training run (settings.json), which a comparison does not replace"),
])
def test_overwrite_replaces_only_its_own_kind_of_folder(tmp_path, marker, arguments, kind,
                                                        capsys):
    """A comparison's folder is not a run's: overwriting one with the other would leave the
    older command's files beside the new ones, so it is refused before any work."""
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("{}")
    assert cli.main([*arguments, "--out", str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"error: out={str(out)!r} holds {kind}; choose another --out")
    assert sorted(p.name for p in out.iterdir()) == [marker]


# ----------------------------------------------------------------------------- 2. one owner


def test_a_command_refused_a_new_folder_s_lock_leaves_the_folder_to_its_owner(tmp_path):
    """Two commands started together on one new folder both create it; the one the lock
    refuses used to remove it (it had created it and written nothing), under the other's run."""
    import fcntl

    from diffpg.envs.core import SettingError

    from diffpg.folders import output_folder

    out = tmp_path / "new"
    with pytest.raises(SettingError), output_folder(out, False, "unused"):
        owner = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)  # the other process's lock
        fcntl.flock(owner, fcntl.LOCK_EX)
        raise SettingError("refused: in use")
    assert out.is_dir() and (out / ".lock").exists()
    os.close(owner)
    with pytest.raises(SettingError), output_folder(tmp_path / "alone", False, "unused"):
        raise SettingError("a bad setting")
    assert not (tmp_path / "alone").exists()  # nobody else's: no trace left


@pytest.mark.slow
def test_of_two_runs_started_together_on_one_folder_one_is_refused(tmp_path):
    out = tmp_path / "run"
    arguments = ["train", *SMALL, "--updates", "40", "--updates-per-call", "2", "--out", str(out),
                 "--overwrite", "shac", "--horizon", "8"]
    processes = [subprocess.Popen(_command(*arguments), env=_environment(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
    try:
        outputs = [process.communicate(timeout=HANG_LIMIT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    codes = sorted(process.returncode for process in processes)
    assert codes == [0, 2], outputs
    refused = next(err for process, (_, err) in zip(processes, outputs, strict=True)
                   if process.returncode == 2)
    assert "is in use by process" in refused and len(refused.strip().splitlines()) == 1
    assert [int(r["update"]) for r in _rows(out)] == list(range(2, 41, 2))
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_lock_that_is_not_a_file_is_one_line(kind, tmp_path, capsys):
    """A folder or a FIFO named ``.lock`` in a run folder: a traceback (IsADirectoryError,
    "Illegal seek"); now one line naming it and what to do, and the run is left as it was."""
    out = tmp_path / "run"
    train(_small(updates=2), out)
    (out / ".lock").mkdir() if kind == "folder" else os.mkfifo(out / ".lock")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--updates", "4"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "is not the lock file diffpg writes" in error
    assert checkpoint_updates(out) == [2]


def test_the_lock_of_a_process_that_is_gone_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("process 999999 on elsewhere")
    train(_small(updates=2), out)
    assert "taking over the lock" in capsys.readouterr().err
    assert checkpoint_updates(out) == [2] and not (out / ".lock").exists()


# ----------------------------------------------------------------------------- 3. signals


def _run_until_done(arguments, rng, out, log) -> None:
    """Start the run, stop it with a random signal at a random moment (within a window that
    grows with each attempt), resume, repeat until a run finishes; every stop must leave one
    clear line, no traceback, no temporary folder."""
    command = _command(*arguments)
    for attempt in range(12):
        process = subprocess.Popen(command, env=_environment(), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # The window grows with each attempt, so that a loaded machine still lets a run finish.
        deadline = time.monotonic() + rng.uniform(3.0, 12.0 * 1.25**attempt)
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None:
            signum = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
            process.send_signal(signum)
        _, stderr = process.communicate(timeout=HANG_LIMIT_S)
        log.append((attempt, process.returncode))
        assert not list((out / "checkpoints").glob("*.orbax-checkpoint-tmp*")) or \
            process.returncode == -signal.SIGKILL, "a signal interrupted a save"
        if process.returncode == 0:
            return
        assert "Traceback" not in stderr, stderr[-2000:]
        if process.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            assert "interrupted" in stderr, stderr[-2000:]
        else:
            assert process.returncode == -signal.SIGKILL, (process.returncode, stderr[-2000:])
        if checkpoint_updates(out):
            command = _command("train", "--resume", str(out))
        else:  # stopped before its first checkpoint: nothing to resume, start it again
            command = _command(arguments[0], "--overwrite", *arguments[1:])
    raise AssertionError(f"the run never finished: {log}")


@pytest.mark.slow
def test_runs_stopped_by_any_signal_at_random_moments_resume_without_gap_or_repeat(tmp_path):
    arguments = ["train", *SMALL, "--updates", "16", "--updates-per-call", "2",
                 "shac", "--horizon", "8"]
    whole = tmp_path / "whole"
    assert subprocess.run(_command(*arguments[:1], "--out", str(whole), *arguments[1:]),
                          env=_environment(), capture_output=True).returncode == 0
    expected = _rows(whole)
    rng = random.Random(0)
    for trial in range(3):
        out, log = tmp_path / f"stopped-{trial}", []
        _run_until_done([*arguments[:1], "--out", str(out), *arguments[1:]], rng, out, log)
        rows = _rows(out)
        assert [r["update"] for r in rows] == [r["update"] for r in expected], log
        for name in ("eval/episode_reward", "training/grad_norm", "env_steps"):
            assert [r[name] for r in rows] == [r[name] for r in expected], (name, log)
        assert _tensorboard_steps(out / "tensorboard") == [int(r["env_steps"]) for r in expected]


def test_resume_refuses_what_it_cannot_do_and_leaves_the_run_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *SMALL, "--updates", "4",
                     "--updates-per-call", "2", "shac", "--horizon", "8"]) == 0
    capsys.readouterr()
    before = (out / "settings.json").read_text()
    for arguments, message in [
        (["--updates", "2"], "updates=2 is below the 4 updates the run has done"),
        (["--out", str(tmp_path / "other")], "cannot be given with resume"),
        (["--overwrite"], "overwrite cannot be given with resume"),
        (["bptt"], "estimator cannot change when resuming (the run has estimator='shac')"),
    ]:
        assert cli.main(["train", "--resume", str(out), *arguments]) == 2, arguments
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error
    assert (out / "settings.json").read_text() == before
    assert not (tmp_path / "other").exists()


def test_an_interrupted_run_says_what_it_kept(tmp_path, monkeypatch, capsys):
    """A signal between calls stops the run with one line naming the checkpoint kept and the
    exit status 128 + signal; before the first checkpoint it says there is nothing to resume."""
    import diffpg.runs

    calls = []
    original = diffpg.runs.save_checkpoint

    def save_then_signal(*arguments):
        original(*arguments)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the metrics are written

    monkeypatch.setattr(diffpg.runs, "save_checkpoint", save_then_signal)
    out = tmp_path / "run"
    status = cli.main(["train", "--out", str(out), *SMALL, "--updates", "8",
                       "--updates-per-call", "2", "shac", "--horizon", "8"])
    assert status == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "interrupted (SIGTERM); the checkpoint of update 4 is kept" in err
    assert [r["update"] for r in _rows(out)] == ["2", "4"]  # the row of the saved update too
    assert "nothing to resume" in cli._what_is_kept(tmp_path / "empty")
    (tmp_path / "settings_only").mkdir()
    (tmp_path / "settings_only" / "settings.json").write_text("{}")
    assert ("diffpg train --resume" in cli._what_is_kept(tmp_path / "settings_only")
            and "starts it again from its settings" in cli._what_is_kept(tmp_path / "settings_only"))


# ----------------------------------------------------------------------------- 4. checkpoints


def _flip_bytes(folder: Path, count: int = 400) -> None:
    """Flip ``count`` bytes in the middle of the largest file of ``folder``."""
    target = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    start = len(data) // 2 - count // 2
    for index in range(start, start + count):
        data[index] ^= 0xFF
    target.write_bytes(bytes(data))


def test_a_bit_flipped_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    settings = _small(updates=6)
    whole = train(settings, tmp_path / "whole")
    out = tmp_path / "run"
    train(settings, out)
    _flip_bytes(out / "checkpoints" / "6")
    assert evaluate_run(out)["update"] == 4  # read-only use: the intact one, with a warning
    warning = capsys.readouterr().err
    assert "checkpoint 6" in warning and "SHA-256" in warning
    resumed = train(settings, out, resume=True)  # sets 6 aside, trains it again from 4
    assert (out / "checkpoints" / "6.unreadable").is_dir()
    for a, b in zip(_leaves(whole), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_digest_record_that_is_no_record_is_damage_and_a_set_aside_keeps_the_earlier(
        tmp_path, capsys):
    """A checkpoint whose digest record is a folder, or not UTF-8, does not restore (eval uses
    the intact one before it, one warning); resuming sets it aside beside a checkpoint set
    aside earlier, deleting neither."""
    out = tmp_path / "run"
    settings = _small(updates=6)
    train(settings, out)
    folder = out / "checkpoints"
    (folder / "6.unreadable").mkdir()
    (folder / "6.unreadable" / "NOTE").write_text("set aside before")
    (folder / "6.sha256").write_bytes(b"\xff\xfe\x00garbage")
    assert evaluate_run(out)["update"] == 4
    assert "checkpoint 6" in capsys.readouterr().err
    (folder / "6.sha256").unlink()
    (folder / "6.sha256").mkdir()
    assert evaluate_run(out)["update"] == 4
    train(settings, out, resume=True)
    assert (folder / "6.unreadable" / "NOTE").read_text() == "set aside before"
    assert (folder / "6.unreadable.1" / "6.sha256").is_dir()
    assert (folder / "6.sha256").is_file() and evaluate_run(out)["update"] == 6


def test_a_damaged_digest_record_is_named_and_the_checkpoint_not_blamed(tmp_path, capsys):
    """The only checkpoint's digest record emptied, made a folder or overwritten with other
    bytes: eval and --resume name the record, and do not call the checkpoint's files corrupt
    (a user would delete a good checkpoint)."""
    out = tmp_path / "run"
    train(_small(updates=2), out)
    digest = out / "checkpoints" / "2.sha256"
    kept = digest.read_bytes()
    for damage in (lambda: digest.write_bytes(b""), lambda: digest.write_bytes(b"\x8f" * 700),
                   lambda: (digest.unlink(), digest.mkdir())):
        damage()
        for command in (["eval", str(out)], ["train", "--resume", str(out), "--updates", "4"]):
            assert cli.main(command) == 2
            error = capsys.readouterr().err.strip()
            assert len(error.splitlines()) == 1, error
            assert f"its digest record {str(digest)!r} is not one" in error, error
            assert "the checkpoint itself may be intact" in error and "corrupt" not in error
        digest.rmdir() if digest.is_dir() else digest.unlink()
        digest.write_bytes(kept)
    assert evaluate_run(out)["update"] == 2


def test_a_checkpoint_linked_from_elsewhere_is_refused_on_resume_and_read_by_eval(tmp_path,
                                                                                  capsys):
    """Resuming retires the oldest checkpoints by deleting them, which orbax cannot do through a
    link (a traceback at the retirement, on every resume after): refused in one line before
    training, the link and its folder left as they were; eval reads through it."""
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    train(_small(updates=4), out)
    (out / "checkpoints" / "2").rename(elsewhere)
    (out / "checkpoints" / "2").symlink_to(elsewhere)
    assert cli.main(["train", "--resume", str(out), "--updates", "8"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.endswith(
        f"{str(out / 'checkpoints' / '2')!r} is a link, and the run deletes its oldest "
        "checkpoints as it saves new ones, which it cannot do through a link; replace the link "
        f"by a copy of the folder it points to (cp -rL), or move it out of "
        f"{str(out / 'checkpoints')!r}"), error
    assert (out / "checkpoints" / "2").is_symlink() and (elsewhere / "state").is_dir()
    assert checkpoint_updates(out) == [2, 4] and evaluate_run(out)["update"] == 4


def test_a_stray_file_inside_a_checkpoint_does_not_retire_it(tmp_path, capsys):
    """An editor's backup, a sync tool's file or a GIF written there is not the checkpoint's:
    its digest covers the files it recorded, so eval and resume keep using it; a recorded
    file that goes missing is still damage."""
    out = tmp_path / "run"
    train(_small(updates=4), out)
    newest = out / "checkpoints" / "4"
    (newest / ".sync-conflict").write_text("not the checkpoint's")
    (newest / "state" / "notes.txt~").write_text("an editor's")
    assert evaluate_run(out)["update"] == 4
    assert "checkpoint 4" not in capsys.readouterr().err
    recorded = next(p for p in sorted(newest.rglob("*")) if p.is_file() and "~" not in p.name
                    and p.name != ".sync-conflict")
    recorded.unlink()
    assert evaluate_run(out)["update"] == 2
    assert "checkpoint 4" in capsys.readouterr().err


def test_overwrite_refuses_a_user_s_file_inside_a_checkpoint_and_resume_sets_aside_a_file_named_as_one(
        tmp_path, capsys):
    """--overwrite removed a user's notes inside ``checkpoints/4/`` silently; a file named
    ``checkpoints/4`` (no checkpoint to orbax) was deleted by the resumed run's save of update 4
    without a line."""
    out = tmp_path / "run"
    train(_small(updates=4), out)
    notes = out / "checkpoints" / "4" / "notes.txt"
    notes.write_text("mine")
    assert cli.main(["train", "--out", str(out), "--overwrite", *SMALL, "--updates", "4",
                     "--updates-per-call", "2", "shac", "--horizon", "8"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{str(notes)!r} is not a file diffpg writes; --overwrite would delete it" in error
    assert len(error.splitlines()) == 1 and notes.read_text() == "mine"
    # Resuming retires the oldest checkpoints, each folder whole: refused too, as is a user's
    # file among the TensorBoard events, which a resume rewrites.
    assert cli.main(["train", "--resume", str(out), "--updates", "6"]) == 2
    assert "resuming (older checkpoints are removed) would delete it" in capsys.readouterr().err
    # The same through a checkpoints/ that is a link elsewhere (orbax deletes inside it).
    (out / "checkpoints").rename(tmp_path / "kept")
    (out / "checkpoints").symlink_to(tmp_path / "kept")
    assert cli.main(["train", "--resume", str(out), "--updates", "6"]) == 2
    assert "resuming (older checkpoints are removed) would delete it" in capsys.readouterr().err
    (out / "checkpoints").unlink()
    (tmp_path / "kept").rename(out / "checkpoints")
    notes.unlink()
    (out / "tensorboard" / "notes.txt").write_text("mine")
    assert cli.main(["train", "--resume", str(out), "--updates", "4"]) == 2
    assert "resuming (the events are rewritten) would delete it" in capsys.readouterr().err
    (out / "tensorboard" / "notes.txt").unlink()
    # A tensorboard/ that is a link elsewhere: the link is replaced, what it names is kept.
    (out / "tensorboard").rename(tmp_path / "events")
    (out / "tensorboard").symlink_to(tmp_path / "events")
    assert cli.main(["train", "--resume", str(out), "--updates", "4"]) == 0
    assert (tmp_path / "events").is_dir() and not (out / "tensorboard").is_symlink()
    capsys.readouterr()
    shutil.rmtree(out / "checkpoints" / "4")
    (out / "checkpoints" / "4").write_text("junk")
    assert cli.main(["train", "--resume", str(out)]) == 0
    error = capsys.readouterr().err
    assert "checkpoint 4 of" in error and "it is not a folder" in error, error
    assert (out / "checkpoints" / "4.unreadable").read_text() == "junk"
    assert checkpoint_updates(out) == [2, 4]


def test_settings_json_edited_by_hand_is_refused_on_resume(tmp_path, capsys):
    """The command line refuses a change on resume; the same change written into settings.json
    continued the run under it silently (and eval evaluated another env under the run's name).
    Each checkpoint records the settings it was trained with; resuming and evaluating compare
    them."""
    out = tmp_path / "run"
    train(_small(updates=4), out)
    original = json.loads((out / "settings.json").read_text())
    edits = [({"learning_rate": 0.5}, "settings.json has learning_rate=0.5, but its checkpoint "
                                      "of update 4 was trained with"),
             ({"seed": 7}, "settings.json has seed=7"),
             ({"estimator_settings": original["estimator_settings"] | {"critic_learning_rate": 0.5}},
              "settings.json has estimator_settings.critic_learning_rate=0.5")]
    for edit, message in edits:
        (out / "settings.json").write_text(json.dumps(original | edit))
        for command in (["train", "--resume", str(out), "--updates", "6"], ["eval", str(out)]):
            assert cli.main(command) == 2, (edit, command)  # (eval: another env's numbers)
            error = capsys.readouterr().err.strip()
            assert message in error and len(error.splitlines()) == 1, error
    assert checkpoint_updates(out) == [2, 4]
    (out / "settings.json").write_text(json.dumps(original | {"eval_envs": 3}))  # changeable
    assert cli.main(["eval", str(out)]) == 0
    assert cli.main(["train", "--resume", str(out), "--updates", "6"]) == 0


def test_a_run_resumed_with_nothing_left_to_do_draws_its_learning_curve(tmp_path):
    """Stopped after its last checkpoint but before its last plot, a resumed run had no plot."""
    out = tmp_path / "run"
    train(_small(updates=4), out)
    (out / "learning_curve.png").unlink()
    train(_small(updates=4), out, resume=True)
    assert (out / "learning_curve.png").stat().st_size > 0


def test_a_checkpoint_without_its_digest_beside_one_with_is_not_restored(tmp_path, capsys):
    """The digest, written after orbax's commit, ends a save: a checkpoint without one (a save
    stopped before it, or a digest removed, and then a flipped byte restores silently) is
    not used while the run's other checkpoint has its own; a run whose checkpoints have none
    (an earlier version's) restores its newest."""
    out = tmp_path / "run"
    train(_small(updates=4), out)
    folder = out / "checkpoints"
    (folder / "4.sha256").unlink()
    assert evaluate_run(out)["update"] == 2
    assert "checkpoint 4" in (warning := capsys.readouterr().err) and "no SHA-256" in warning
    (folder / "2.sha256").unlink()
    assert evaluate_run(out)["update"] == 4


def test_a_checkpoint_folder_renamed_to_another_update_is_not_taken_for_it(tmp_path, capsys):
    """``checkpoints/2`` renamed ``8`` (with its digest) restored as the newest: eval printed
    update 2 for ``--checkpoint 8``, and a resume never saved its real update 8. The state's
    own counter must be the folder's number."""
    out = tmp_path / "run"
    train(_small(updates=4), out)
    folder = out / "checkpoints"
    (folder / "2").rename(folder / "8")
    (folder / "2.sha256").rename(folder / "8.sha256")
    assert evaluate_run(out)["update"] == 4
    assert "it holds the state of update 2, not 8" in capsys.readouterr().err


def test_a_restore_s_reason_leaves_out_what_tensorstore_appends_for_programs():
    from diffpg.checkpoints import _reason

    error = ValueError("NOT_FOUND: Error opening \"ocdbt\" driver. See full TensorStore "
                       "details: <bound method Status.to_json of <tensorstore.Status>>")
    assert _reason(error) == 'NOT_FOUND: Error opening "ocdbt" driver.'


def test_resuming_a_run_stopped_before_its_first_checkpoint_starts_it_from_its_settings(
        tmp_path, capsys):
    """A run stopped before its first checkpoint holds its settings only: the stop's line and
    eval's advised --overwrite, which without the run's options trained the defaults. --resume
    starts it again from settings.json, as the line now says, and ends where a fresh run does."""
    from diffpg.run_files import save_settings

    out = tmp_path / "run"
    out.mkdir()
    save_settings(_small(updates=4), out)
    assert cli.main(["eval", str(out)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "has no checkpoint yet" in error
    assert "diffpg train --resume RUN" in error
    (out / "checkpoints" / "2.orbax-checkpoint-tmp-123").mkdir(parents=True)  # a save cut short
    assert cli.main(["train", "--resume", str(out)]) == 0
    fresh = tmp_path / "fresh"
    train(_small(updates=4), fresh)
    def learned(run):  # (the rows without their timings)
        return [{k: v for k, v in row.items() if k not in ("training/sps", "training/walltime")}
                for row in _rows(run)]

    assert learned(out) == learned(fresh) and len(learned(out)) == 2
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "2").write_text("junk")  # its only checkpoint, not a folder
    for command in (["eval", str(out)], ["train", "--resume", str(out)]):
        assert cli.main(command) == 2
        error = capsys.readouterr().err
        assert "checkpoint 2 of run=" in error and "(it is not a folder" in error, error
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("not the checkpoints")  # a file where they belong
    assert cli.main(["train", "--resume", str(out)]) == 2
    error = capsys.readouterr().err
    assert "checkpoints' is not a folder, where the run keeps its checkpoints" in error


def test_a_run_whose_checkpoints_were_removed_says_it_starts_again(tmp_path, capsys):
    """Every checkpoint removed by hand: --resume started the run again from its settings
    without a word, rewriting the metrics of the updates it had trained. It says so."""
    out = tmp_path / "run"
    train(_small(updates=4), out)
    for checkpoint in (out / "checkpoints").iterdir():
        shutil.rmtree(checkpoint) if checkpoint.is_dir() else checkpoint.unlink()
    assert cli.main(["train", "--resume", str(out)]) == 0
    assert (f"diffpg: no checkpoint of {out} is left, though its metrics.csv records 4 "
            "updates: the run starts again from its settings") in capsys.readouterr().err
    assert checkpoint_updates(out) == [2, 4]


def test_no_intact_checkpoint_is_one_line_naming_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    train(_small(updates=4), out)
    for update in (2, 4):
        _flip_bytes(out / "checkpoints" / str(update))
    assert cli.main(["train", "--resume", str(out)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and str(out / "checkpoints") in error


def _leaves(state):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


# ----------------------------------------------------------------------------- 5. damaged files


@pytest.mark.parametrize("damage", ["truncated last row", "garbled header", "deleted", "empty"])
def test_a_damaged_metrics_file_is_rebuilt_from_the_checkpoint_on_resume(tmp_path, damage):
    settings = _small(updates=6)
    out = tmp_path / "run"
    train(settings, out, stop_at_update=4)
    expected = (out / "metrics.csv").read_text()
    path = out / "metrics.csv"
    if damage == "truncated last row":
        path.write_text(expected[: len(expected) - 20])
    elif damage == "garbled header":
        path.write_text("#@!" + expected[3:])
    elif damage == "deleted":
        path.unlink()
    else:
        path.write_text("")
    train(settings, out, resume=True)
    rows = _rows(out)
    assert [r["update"] for r in rows] == ["2", "4", "6"]
    assert (out / "metrics.csv").read_text().startswith(expected.splitlines()[0])


@pytest.mark.parametrize(("content", "message"), [
    ("{", "not valid"),
    ("[1, 2]", "object of settings"),
    ('{"env": "pendulum"}', "lacks the setting"),
    ("unknown", "not valid"),
])
def test_a_damaged_settings_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    out = tmp_path / "run"
    train(_small(updates=2), out)
    (out / "settings.json").write_text(content)
    assert cli.main(["train", "--resume", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and "settings.json" in error and len(error.strip().splitlines()) == 1


def test_a_run_written_before_a_setting_existed_reads_with_its_default(tmp_path):
    """A settings.json written before a setting was added (diffpg.run_files.SETTINGS_ADDED_LATER)
    loads with that setting's default, the behaviour the run had; its other settings unchanged."""
    import json

    from diffpg.run_files import SETTINGS_ADDED_LATER, load_settings
    from diffpg.training import TrainSettings

    out = tmp_path / "run"
    train(_small(updates=2), out)
    written = load_settings(out)
    values = json.loads((out / "settings.json").read_text())
    for name in SETTINGS_ADDED_LATER:
        del values[name]
    (out / "settings.json").write_text(json.dumps(values))
    assert load_settings(out) == written
    for name in SETTINGS_ADDED_LATER:
        assert getattr(load_settings(out), name) == TrainSettings.__dataclass_fields__[name].default


def test_a_run_written_with_the_value_critic_s_old_names_reads_with_the_shared_ones(tmp_path):
    """REINFORCE's and PPO's value-critic settings were once ``value_*``; now every estimator
    says ``critic_*`` (diffpg.run_files.ESTIMATOR_SETTINGS_RENAMED). A settings.json with the old
    names, and without ``critic_betas`` (then fixed at Adam's 0.7, 0.95), reads as the same
    settings."""
    import json

    from diffpg.run_files import ESTIMATOR_SETTINGS_RENAMED, load_settings

    settings = _small(estimator="ppo", updates=2,
                      estimator_options={"critic_learning_rate": 3e-4, "critic_iterations": 3})
    values = settings.to_json()
    nested = values["estimator_settings"]
    for old, new in ESTIMATOR_SETTINGS_RENAMED.items():
        nested[old] = nested.pop(new)
    assert nested.pop("critic_betas") == (0.7, 0.95)
    (tmp_path / "settings.json").write_text(json.dumps(values))
    loaded = load_settings(tmp_path)
    assert loaded.resolved_estimator_settings == settings.resolved_estimator_settings
    assert loaded.resolved_estimator_settings.critic_learning_rate == 3e-4


def test_an_unknown_setting_in_settings_json_is_named(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    train(_small(updates=2), out)
    values = json.loads((out / "settings.json").read_text()) | {"learning_rat": 1.0}
    (out / "settings.json").write_text(json.dumps(values))
    assert cli.main(["eval", str(out)]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_a_settings_file_replaced_by_a_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train(_small(updates=2), out)
    (out / "settings.json").unlink()
    (out / "settings.json").mkdir()
    for command in (["eval", str(out)], ["train", "--resume", str(out)],
                    ["video", str(out), "--out", str(tmp_path / "x.gif")]):
        assert cli.main(command) == 2, command
        error = capsys.readouterr().err
        assert "settings.json" in error and "cannot be read" in error, error
        assert len(error.strip().splitlines()) == 1, error


def test_a_checkpoint_of_other_shapes_is_one_line_without_orbax_s_tracebacks(tmp_path):
    """settings.json edited to another network: eval says so in one line, and orbax's
    background threads print nothing at exit (their tracebacks once followed by the
    thousand). The run is named by a relative path, as a user types it: orbax reads a relative
    checkpoint path's metadata as empty, and the shapes were then never compared."""
    import json

    out = tmp_path / "run"
    train(_small(updates=2), out)
    values = json.loads((out / "settings.json").read_text()) | {"hidden_sizes": [8]}
    (out / "settings.json").write_text(json.dumps(values))
    done = subprocess.run(_command("eval", "run"), env=_environment(), capture_output=True,
                          text=True, timeout=HANG_LIMIT_S, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr[-2000:]
    assert "shapes differ" in done.stderr


# ----------------------------------------------------------------------------- 6. disk full


# Orbax's unfinished writes of the failed save end, when collected, with an exception nobody
# can retrieve any more: expected here, and not this test's subject.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_is_one_line_and_leaves_nothing_that_blocks_a_rerun(tmp_path, capsys):
    """A disk that fills up during a run, and one full before a run starts: one line naming the
    folder each time, no temporary folder left, settings.json whole; once space is freed the run
    resumes."""
    with small_disk(tmp_path / "disk", "2m") as disk:
        (disk / "filler").write_bytes(b"\0" * 1_550_000)
        out = disk / "run"
        arguments = ["train", *SMALL, "--updates", "200", "--updates-per-call", "2",
                     "--out", str(out), "shac", "--horizon", "8"]
        assert cli.main(arguments) == 2  # the disk fills up while checkpoints pile up
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "no space left on the device of" in errors[0], errors
        assert not list((out / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
        kept = checkpoint_updates(out)
        assert kept, "some checkpoints were written before the disk filled up"
        load_settings(out)  # never half-written
        with contextlib.suppress(OSError), (disk / "more").open("wb") as more:
            more.write(b"\0" * 2_000_000)  # now full before the next start
        assert cli.main(["train", "--resume", str(out)]) == 2
        assert "no space left" in capsys.readouterr().err
        (disk / "filler").unlink()
        (disk / "more").unlink()
        assert cli.main(["train", "--resume", str(out), "--updates", str(kept[-1] + 2)]) == 0
        assert checkpoint_updates(out)[-1] == kept[-1] + 2


def _diffpg(arguments, limit_file_bytes=None, **environment):
    """``diffpg ARGUMENTS`` in a new process (under a file-size limit if given, with
    ``environment`` added to its variables)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "diffpg.cli", *arguments]
    if limit_file_bytes:
        command = under_ulimit("-f", limit_file_bytes // 1024, command)
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_LIMIT_S,
                          env=os.environ | environment, errors="replace")


def test_a_disk_full_in_the_first_checkpoint_is_one_line_without_event_loop_reports(tmp_path):
    """A save that fails with other writes pending: TensorStore's writes finish after orbax has
    closed its event loop and used to print a traceback each ("Event loop is closed"), in about
    half the runs; three runs in a row now print the one line."""
    for attempt in range(3):
        with small_disk(tmp_path / f"disk{attempt}", "120k") as disk:
            done = _diffpg(["train", "--env", "pendulum", "--horizon", "4", "--num-envs", "8",
                            "--updates", "8", "--updates-per-call", "2", "--eval-envs", "2",
                            "--out", str(disk / "run")])
        assert done.returncode == 2, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "no space left on the device of" in errors[0], (
            done.stderr[-3000:])
        assert "Traceback" not in done.stderr


def test_a_disk_without_free_inodes_is_named_so(tmp_path):
    """A file system out of file entries with bytes to spare said "no space left ... (52,416,512
    bytes free)... free some space": now it names the inodes."""
    with small_disk(tmp_path / "disk", "16m", inodes=12) as disk:
        done = _diffpg(["train", *SMALL, "--updates", "2", "--updates-per-call", "2", "--horizon",
                        "4", "--out", str(disk / "run")])
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if "error" in line]
    assert "no free inodes" in line and "remove some files" in line, line


def test_networks_beyond_the_address_space_limit_are_one_line_not_a_hang(tmp_path):
    """``ulimit -v`` below what the networks need: XLA waited forever on the refused allocation,
    deaf to Ctrl-C; the limit counts in the memory check."""
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run(under_ulimit("-v", 6_000_000_000 // 1024, [
        sys.executable, "-m", "diffpg.cli", "train", *SMALL[:-2], "--hidden-sizes", "20000", "20000",
        "--updates", "2", "--updates-per-call", "2", "--out", str(out)]),
        capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if "error" in line]
    assert "lower hidden_sizes" in line and not out.exists()


def test_an_address_space_limit_that_leaves_no_room_for_threads_is_one_line(tmp_path):
    """``ulimit -v`` a little above what JAX maps at its start: the run passed every memory check
    and aborted when a thread could not start (``terminate called ... Resource temporarily
    unavailable``, exit 134), leaving an unfinished checkpoint. Now one line, no folder."""
    import subprocess
    import sys

    started = subprocess.run([sys.executable, "-c", "import jax; jax.devices(); print(next("
                              "line.split()[1] for line in open('/proc/self/status') if "
                              "line.startswith('VmSize:')))"],
                             capture_output=True, text=True, timeout=HANG_LIMIT_S)
    limit_kib = int(started.stdout) + 400 * 1024  # 0.4 GiB above JAX's start
    out = tmp_path / "run"
    done = subprocess.run(under_ulimit("-v", limit_kib, [
        sys.executable, "-m", "diffpg.cli", "train", *SMALL, "--updates", "2",
        "--updates-per-call", "2", "--out", str(out)]),
        capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert "address-space limit (ulimit -v)" in line and not out.exists(), line


@pytest.mark.parametrize("option, value, named", [("-v", 500_000, "ulimit -v"),
                                                   ("-v", 300_000, "ulimit -v"),
                                                   ("-n", 8, "ulimit -n")])
def test_a_limit_too_low_to_load_the_libraries_is_one_line(option, value, named):
    """Address space (KiB) or open files too few to load JAX, Brax and MuJoCo: each failed its
    own way (a shared object that could not be mapped, MemoryError, numpy's BLAS aborting,
    GLFW's pipe: 18 to 38 lines), for every command, --help too. Now one line."""
    import subprocess
    import sys

    for command in (["--help"], ["eval", "run"]):
        done = subprocess.run(under_ulimit(option, value, [sys.executable, "-m", "diffpg.cli",
                                                           *command]),
                              capture_output=True, text=True, timeout=HANG_LIMIT_S)
        assert done.returncode == 2, done.stderr[-3000:]
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("diffpg: error: the ") and named in line, line


def test_a_folder_name_the_console_cannot_encode_does_not_fail_a_finished_run(tmp_path):
    """A non-ASCII --out under an ASCII console: the run's last line failed (exit 1, a
    traceback) after everything was saved; a script would retry, or --overwrite the good run."""
    out = tmp_path / "r\u00e9sultat"
    done = _diffpg(["train", *SMALL, "--updates", "2", "--updates-per-call", "2", "--horizon",
                    "4", "--out", str(out)], PYTHONIOENCODING="ascii")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "r\\xe9sultat" in done.stdout and "Traceback" not in done.stderr
    assert checkpoint_updates(out) == [2]


def test_a_file_size_limit_below_a_checkpoint_is_one_line_before_any_work(tmp_path):
    """``ulimit -f`` below what a checkpoint writes: 624 lines of orbax's tracebacks and no
    checkpoint; now one line before anything is compiled or written."""
    out = tmp_path / "run"
    done = _diffpg(["train", *SMALL, "--updates", "2", "--updates-per-call", "2", "--out", str(out)],
                   limit_file_bytes=8192)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if "error" in line]
    assert "ulimit -f: 8,192 bytes" in line and "Traceback" not in done.stderr
    assert not out.exists()
    # A limit this run's checkpoint fits (its largest file is about 40 KB) is no refusal: a
    # flat 1 MiB of room for metadata refused it.
    done = _diffpg(["train", *SMALL, "--updates", "2", "--updates-per-call", "2", "--horizon", "4",
                    "--out", str(out)], limit_file_bytes=400 * 1024)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint_updates(out) == [2]


def test_a_read_only_file_system_on_resume_is_one_line(tmp_path):
    with small_disk(tmp_path / "disk", "16m") as disk:
        out = disk / "run"
        assert cli.main(["train", *SMALL, "--updates", "2", "--updates-per-call", "2",
                         "--out", str(out)]) == 0
        import subprocess

        remounted = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True,
                                   text=True)
        if remounted.returncode:
            pytest.skip(f"cannot remount read-only here ({remounted.stderr.strip()})")
        done = _diffpg(["train", "--resume", str(out), "--updates", "4"])
        assert done.returncode == 2, done.stderr[-3000:]
        (line,) = [line for line in done.stderr.splitlines() if "error" in line]
        assert "read-only" in line and str(out) in line and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- 7. surprises


@pytest.mark.parametrize(("arguments", "message"), [
    (["--updates", "25", "--updates-per-call", "10"], "not a multiple of updates_per_call"),
    (["--num-envs", "100000000"], "GiB for the simulated states"),
    (["--eval-envs", "2000000000"], "eval_envs=2000000000 (x seeds=1, episode_length=200) needs"),
    (["--learning-rate", "inf"], "learning_rate"),
    (["--grad-clip", "nan"], "grad_clip"),
    (["--final-learning-rate", "nan"], "final_learning_rate"),
    (["--learning-rate", "1e39"], "learning_rate=1e+39 must be a positive number in"),
    (["--init-log-std", "100"], "init_log_std=100.0 must be a number in [-87.3, 88.7]"),
    (["--init-log-std", "-100"], "init_log_std"),
    (["--hidden-sizes", "100000", "100000"], "lower hidden_sizes"),
])
def test_settings_that_would_surprise_are_refused_before_compiling(tmp_path, capsys, arguments,
                                                                    message):
    out = tmp_path / "never"
    with compiles() as compiled:
        assert cli.main(["train", "--env", "pendulum", *arguments, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error
    assert compiled == [] and not out.exists()


def test_out_at_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["train", "--env", "pendulum", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_resume_with_more_updates_extends_the_run_and_nothing_else_changes(tmp_path, capsys):
    out = tmp_path / "run"
    train(_small(updates=4), out)
    assert cli.main(["train", "--resume", str(out), "--updates", "8"]) == 0
    # What runs is said as the run's own settings, not the sizes of a fresh command line, and
    # the progress bar starts where the run does.
    err = capsys.readouterr().err
    assert "(defaults: the run's own, resumed)" in err and "| 4/8 [" in err
    assert checkpoint_updates(out) == [6, 8]
    assert [r["update"] for r in _rows(out)] == ["2", "4", "6", "8"]
    assert load_settings(out).updates == 8
    assert cli.main(["train", "--resume", str(out), "--num-envs", "8"]) == 2
    assert "num_envs cannot change when resuming" in capsys.readouterr().err


def test_a_run_trained_over_more_devices_than_this_machine_has_reads_and_resumes_here(
        tmp_path, capsys):
    """Devices split the batch, not the computation: a run's settings.json naming 2 devices
    (as one trained with --devices 2 has) is evaluated and drawn on one device, and resumes
    on one with --devices 1; without it, one line naming the setting."""
    out = tmp_path / "run"
    train(_small(updates=4), out)
    values = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps(values | {"devices": 2}))
    assert cli.main(["eval", str(out)]) == 0
    assert "update: 4\n" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(out), "--updates", "6"]) == 2
    error = capsys.readouterr().err.strip()
    assert "devices=2 but only 1 are available; allowed: 1..1" in error, error
    assert len(error.splitlines()) == 1 and checkpoint_updates(out) == [2, 4]
    assert cli.main(["train", "--resume", str(out), "--updates", "6", "--devices", "1"]) == 0
    assert checkpoint_updates(out) == [4, 6] and load_settings(out).devices == 1
    assert cli.main(["train", "--resume", str(out), "--updates", "9"]) == 2
    assert "or (in a new run) --updates-per-call" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 8. quiet


def test_commands_print_their_own_output_and_nothing_else(tmp_path):
    done = subprocess.run(_command("--help"), env=os.environ | {"PYTHONPATH": os.getcwd()},
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "" and done.stdout.startswith("usage: diffpg")
    cache = tmp_path / "cache"
    script = ("import jax, diffpg, envs, jax.numpy as jnp\n"
              "diffpg.setup()\n"
              "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
              "env = envs.make('inverted_pendulum')\n"
              "print(float(jax.jit(lambda x: jnp.sin(x).sum() + 1.25)(jnp.ones(3))))\n")
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"} | {
        "PYTHONPATH": os.getcwd(), "DIFFPG_CACHE_DIR": str(cache)}
    for _ in range(2):  # the second run loads the executable from the persistent cache
        done = subprocess.run([sys.executable, "-c", script], env=environment,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines() == [done.stdout.strip()] and done.stderr == "", (
            done.stdout, done.stderr)
    assert any(cache.iterdir())


def test_video_shows_progress_and_titles_its_frames(tmp_path, capsys, monkeypatch):
    import diffpg.video

    out = tmp_path / "run"
    train(_small(updates=2), out)
    titles = []
    original = diffpg.video.save_gif

    def spy(*arguments, **keywords):
        titles.append(keywords.get("title"))
        return original(*arguments, **keywords)

    monkeypatch.setattr(diffpg.video, "save_gif", spy)
    assert cli.main(["video", str(out), "--every", "50"]) == 0
    assert titles == ["pendulum (shac), run, update 2"]
    assert "video" in capsys.readouterr().err  # the progress bar


def test_a_partner_processs_lock_and_write_probe_leave_the_folder_empty(tmp_path):
    """The processes of one run prepare the same folder at once: the lock and the short-lived
    write probe of one must not make the folder "not empty" for the other (a race that stopped
    two-process runs); any other file still does."""
    from diffpg.envs.core import SettingError

    from diffpg.folders import WRITE_PROBE_PREFIX, prepare_output

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("")
    (out / f"{WRITE_PROBE_PREFIX}12345").write_bytes(b"")
    assert prepare_output(out, overwrite=False, default_name="unused") == out
    (out / "settings.json").write_text("{}")
    with pytest.raises(SettingError, match="exists and is not empty"):
        prepare_output(out, overwrite=False, default_name="unused")


def test_a_fifo_or_a_device_inside_a_checkpoint_is_one_line_not_a_hang(tmp_path):
    """Orbax opens each checkpoint's metadata to list them, and the digest read every file: a
    FIFO there blocked eval, video and --resume forever (in a thread the process then waited
    for), a link to /dev/zero filled the memory. Either is one line naming it, unread."""
    out = tmp_path / "run"
    train(_small(updates=4), out)
    for inside in ("_CHECKPOINT_METADATA", "state/_METADATA"):  # (listing; restoring)
        for replace in (os.mkfifo, lambda path: path.symlink_to("/dev/zero")):
            path = out / "checkpoints" / "4" / inside
            kept = path.read_bytes()
            path.unlink()
            replace(path)
            resume = [["train", "--resume", str(out)]] if inside == "state/_METADATA" else []
            for command in [["eval", str(out)], *resume]:
                done = subprocess.run([sys.executable, "-m", "diffpg.cli", *command],
                                      capture_output=True, text=True, timeout=300)
                assert done.returncode == 2, done.stderr[-2000:]
                assert done.stderr.strip().endswith(f"{str(path)!r} is not a regular file (a "
                                                    "FIFO, a socket or a device, or a link to "
                                                    "one), which no checkpoint holds and which "
                                                    "would block reading the checkpoints; remove "
                                                    "it"), done.stderr
            path.unlink()
            path.write_bytes(kept)
    assert evaluate_run(out)["update"] == 4


def test_a_run_folder_whose_name_is_not_utf8_is_refused_before_anything_is_made(tmp_path,
                                                                                capsys):
    """Orbax's TensorStore cannot write a checkpoint under a name of non-UTF-8 bytes: train
    failed with a traceback after compiling and left a folder --resume failed on again."""
    out = Path(os.fsdecode(bytes(tmp_path) + b"/run\xff\xfe"))
    assert cli.main(["train", *SMALL, "--updates", "2", "--updates-per-call", "2",
                     "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "has a name that is not UTF-8" in error and len(error.splitlines()) == 1, error
    assert not out.exists()
    out.mkdir()  # (one an earlier version made)
    assert cli.main(["eval", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_checkpoint_retired_while_another_process_lists_them_is_listed_again(tmp_path,
                                                                               monkeypatch):
    """``eval`` while the run trains: orbax listed a checkpoint the run retired meanwhile and
    failed with FileNotFoundError (a traceback); the listing is made again."""
    import diffpg.checkpoints as checkpoints

    out = tmp_path / "run"
    train(_small(updates=4), out)
    real, calls = checkpoints.ocp.CheckpointManager, []

    def retired_once(*arguments, **keywords):
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", str(out / "checkpoints/2"))
        return real(*arguments, **keywords)

    monkeypatch.setattr(checkpoints.ocp, "CheckpointManager", retired_once)
    assert checkpoint_updates(out) == [2, 4] and len(calls) == 2


def test_a_closed_event_loop_reported_from_a_thread_is_dropped_and_nothing_else():
    """Ctrl-C while eval restored a checkpoint: TensorStore's threads woke orbax's closed event
    loop, and their tracebacks followed the one line."""
    program = ("import threading\n"
               "from diffpg.checkpoints import _drop_closed_event_loop_reports\n"
               "_drop_closed_event_loop_reports()\n"
               "for text in ('Event loop is closed', 'another failure'):\n"
               "    def fail(text=text):\n"
               "        raise RuntimeError(text)\n"
               "    thread = threading.Thread(target=fail)\n"
               "    thread.start()\n"
               "    thread.join()\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=HANG_LIMIT_S)
    assert "another failure" in done.stderr and "Event loop is closed" not in done.stderr, \
        done.stderr
