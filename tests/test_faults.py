"""File-system faults by class, crossed with every command: each is one line naming what to do
(exit status 2), or a correct run where the command needs nothing the fault takes away (``eval``
writes nothing); never a traceback, and never a folder the advice cannot continue.

The faults are real: a tmpfs mounted read-only or filled up (skipped where mounting is not
allowed), and a name longer than the file system takes. The file-size limit (``ulimit -f``) and
the address-space limit are process-wide, so their tests run ``diffpg`` in a new process
(``tests/test_run_folders.py``)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import HANG_LIMIT_S, small_disk, under_ulimit

from diffpg import cli

TRAIN = ["--env", "pendulum", "--num-envs", "4", "--eval-envs", "2", "--hidden-sizes", "8",
         "--horizon", "4", "--updates", "2", "--updates-per-call", "2"]
COMPARE = ["compare", "--env", "lqr", "--estimators", "bptt", "--horizon", "2",
           "--num-estimates", "2", "--num-envs", "2", "--sweep", "none"]
FAULTS = ("read-only", "full", "name too long")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-update run, copied into each fault's folder."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", *TRAIN, "--out", str(run)]) == 0
    return run


def _commands(folder, run):
    """Each command, writing under ``folder`` (``run``: a finished run there)."""
    return {
        "train": ["train", *TRAIN, "--out", str(folder / "new")],
        "train --resume": ["train", "--resume", str(run), "--updates", "4"],
        "compare": [*COMPARE, "--out", str(folder / "comparison")],
        "eval": ["eval", str(run)],
        "video": ["video", str(run), "--out", str(folder / "policy.gif")],
    }


EXPECTED = {
    # What each command does under each fault: 0 (it needs nothing the fault takes) or the words
    # its one line must hold.
    ("read-only", "train"): "read-only",
    ("read-only", "train --resume"): "read-only",
    ("read-only", "compare"): "read-only",
    ("read-only", "eval"): 0,
    ("read-only", "video"): "read-only",
    ("full", "train"): "no space left",
    ("full", "train --resume"): "no space left",
    ("full", "compare"): "no space left",
    ("full", "eval"): 0,
    ("full", "video"): "no space left",
    ("name too long", "train"): "too long",
    ("name too long", "train --resume"): "too long",
    ("name too long", "compare"): "too long",
    ("name too long", "eval"): "too long",
    ("name too long", "video"): "too long",
}


@pytest.mark.parametrize("command", ["train", "train --resume", "compare", "eval", "video"])
@pytest.mark.parametrize("fault", FAULTS)
def test_every_fault_class_is_one_line_for_every_command(fault, command, trained, tmp_path,
                                                         capsys):
    expected = EXPECTED[fault, command]
    with small_disk(tmp_path / "disk", "4m") as disk:
        run = disk / "run"
        shutil.copytree(trained, run)
        folder = disk
        if fault == "read-only":
            remounted = subprocess.run(["mount", "-o", "remount,ro", str(disk)],
                                       capture_output=True, text=True)
            if remounted.returncode:
                pytest.skip(f"cannot remount read-only here ({remounted.stderr.strip()})")
        elif fault == "full":
            with (disk / "filler").open("wb", buffering=0) as filler:
                try:
                    while True:
                        filler.write(b"\0" * 4096)
                except OSError:  # full
                    pass
        else:  # every name below it too long for the file system (255 bytes a name)
            folder = disk / ("n" * 256)
            run = folder / "run"
        capsys.readouterr()
        status = cli.main(_commands(folder, run)[command])
        error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if "error" in line]
    assert "Traceback" not in error, error
    if expected == 0:
        assert status == 0, error
        return
    assert status == 2, error
    assert len(lines) == 1 and expected in lines[0].lower(), error


def test_a_file_size_limit_below_a_comparison_s_samples_is_one_line_before_any_work(tmp_path):
    """``ulimit -f`` below the samples file a comparison will write: it failed after all its
    work; now one line before any."""
    import sys

    out = tmp_path / "comparison"
    done = subprocess.run(under_ulimit("-f", 64, [sys.executable, "-m", "diffpg.cli", *COMPARE,
                                                  "--num-estimates", "2000", "--out", str(out)]),
                          capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if "error" in line]
    assert "ulimit -f: 65,536 bytes" in line and "samples.npz" in line, line
    assert not out.exists()


def test_a_file_size_limit_below_a_gif_is_one_line_before_drawing(trained, tmp_path):
    import sys

    gif = tmp_path / "policy.gif"
    done = subprocess.run(under_ulimit("-f", 64, [sys.executable, "-m", "diffpg.cli", "video",
                                                  str(trained), "--out", str(gif)]),
                          capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if "error" in line]
    assert "ulimit -f" in line and "--every" in line and "frame/s" not in done.stderr  # no drawing
    assert not gif.exists()


@pytest.mark.parametrize("name, replacement", [("metrics.csv", "folder"),
                                               ("learning_curve.png", "folder"),
                                               ("tensorboard", "file")])
def test_a_rewritten_file_of_the_other_kind_is_one_line_on_resume(name, replacement, trained,
                                                                 tmp_path, capsys):
    """A folder where the run keeps a file (or a file where it keeps a folder) is not the run's:
    resuming names it, deletes nothing, and resumes once it is moved away."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = run / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    if replacement == "folder":
        path.mkdir()
        (path / "notes.txt").write_text("mine")
    else:
        path.write_text("mine")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--updates", "4"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1, error
    assert repr(str(path)) in error and "move it away" in error
    assert (path / "notes.txt").exists() if replacement == "folder" else path.read_text() == "mine"
    path.rename(run / "moved")
    assert cli.main(["train", "--resume", str(run), "--updates", "4"]) == 0


@pytest.mark.parametrize("command, room", [("train", 100), ("compare", 30)])
def test_an_out_that_leaves_no_room_for_the_files_inside_it_is_one_line(command, room, tmp_path,
                                                                       capsys):
    """A 4,000-character --out whose own path fits, but not the checkpoint's files inside it:
    orbax printed about 108 lines of thread tracebacks before the one line, after compiling.
    Now one line before any work, and the folders made for it are gone again."""
    import os

    limit = os.pathconf(tmp_path, "PC_PATH_MAX")
    parts, rest = divmod(limit - len(str(tmp_path)) - room, 201)  # room bytes left below it
    out = tmp_path.joinpath(*["d" * 200] * parts, "e" * rest)
    arguments = {"train": ["train", *TRAIN, "--out", str(out)],
                 "compare": [*COMPARE, "--out", str(out)]}[command]
    capsys.readouterr()
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "choose a shorter --out" in error, error
    assert list(tmp_path.iterdir()) == []
