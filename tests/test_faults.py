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
    arguments = [*COMPARE, "--out", str(out)]
    arguments[arguments.index("--num-estimates") + 1] = "5000"  # (80,000 bytes of samples)
    done = subprocess.run(under_ulimit("-f", 64, [sys.executable, "-m", "diffpg.cli", *arguments]),
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


# --------------------------------------------- faults an outside probe found, one class each


def test_a_lock_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path, capsys):
    """The lock is written: through a link it overwrote the file it pointed to (any file, run
    as root). A lock file's text (another owner's) is printed as one printable line."""
    from diffpg.envs.core import SettingError

    from diffpg.folders import run_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("important")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(SettingError, match="not the lock file diffpg writes"), run_lock(run):
        pass
    assert victim.read_text() == "important"
    (run / ".lock").unlink()
    (run / ".lock").write_text("garbage line1\nline2\n\x1b[31mRED\x1b[0m\n")
    with run_lock(run):
        pass
    taken_over = capsys.readouterr().err
    assert taken_over == f"diffpg: taking over the lock of {run} from garbage line1, which " \
                         "has ended\n"


def test_an_immutable_file_or_too_few_file_descriptors_are_named_as_the_system_s_refusal():
    """EPERM (``chattr +i``, even for root) and EMFILE (``ulimit -n``) were tracebacks on
    resume: each is one of the refusals a command reports in one line with what to do."""
    import errno

    from diffpg.folders import storage_problem

    for code, words in ((errno.EPERM, "chattr -i"), (errno.EMFILE, "ulimit -n"),
                        (errno.ENFILE, "close some programs")):
        happened, advice = storage_problem(OSError(code, "refused"))
        assert words in advice, (code, advice)


def test_a_run_file_that_is_a_link_to_nowhere_is_one_line_on_resume(tmp_path):
    from diffpg.envs.core import SettingError

    from diffpg.run_files import check_rewritable

    (tmp_path / "tensorboard").symlink_to("loop")
    (tmp_path / "loop").symlink_to("tensorboard")
    with pytest.raises(SettingError, match="'.*tensorboard' is a link that leads nowhere"):
        check_rewritable(tmp_path)


def test_brax_env_options_hold_the_kind_of_their_default():
    """Brax checks no constructor setting: ``terminate_when_unhealthy=maybe`` trained as true,
    ``ctrl_cost_weight=abc`` failed inside the first step with a TypeError."""
    from diffpg.envs.core import SettingError

    from diffpg import envs

    for bad, named in ((dict(terminate_when_unhealthy="maybe"), "must be true or false"),
                       (dict(ctrl_cost_weight="abc"), "must be a number"),
                       (dict(healthy_z_range=0.5), "must be a tuple of numbers")):
        with pytest.raises(SettingError, match=named):
            envs.check("hopper", **bad)
    envs.check("hopper", terminate_when_unhealthy=False, ctrl_cost_weight=0.01,
               healthy_z_range=(0.5, 2.0), reset_noise_scale=1)


@pytest.mark.parametrize("variables, named", [
    ({"JAX_ENABLE_X64": "1"}, "JAX_ENABLE_X64 is set"),
    # another key generator or splitting: other numbers from the same seed, silently
    ({"JAX_DEFAULT_PRNG_IMPL": "rbg"}, "JAX_DEFAULT_PRNG_IMPL sets 'rbg'"),
    ({"JAX_THREEFRY_PARTITIONABLE": "0"}, "JAX_THREEFRY_PARTITIONABLE sets False"),
    ({"JAX_PLATFORM_NAME": "gpu"}, "JAX_PLATFORM_NAME='gpu' names a platform"),
    ({"JAX_DEFAULT_MATMUL_PRECISION": "bogus"}, 'Invalid value "bogus" for JAX flag'),
    ({"DIFFPG_COORDINATOR_ADDRESS": "127.0.0.1:1", "DIFFPG_NUM_PROCESSES": "2",
      "DIFFPG_PROCESS_ID": "5"}, "DIFFPG_PROCESS_ID=5 must be in 0..1"),
])
def test_an_environment_variable_a_command_cannot_honour_is_one_line(variables, named):
    """64-bit mode or another key generator changed results silently (and a run resumed
    without it mixed them); a process number beyond the processes, JAX's older platform
    variable and a JAX variable JAX itself refuses were tracebacks."""
    import os
    import sys

    done = subprocess.run([sys.executable, "-m", "diffpg.cli", "eval", "/nonexistent/run"],
                          capture_output=True, text=True, timeout=HANG_LIMIT_S,
                          env=os.environ | variables)
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_coordinator_that_never_answers_is_one_line_and_its_wait_can_be_stopped():
    """Process 1's wait for process 0 was JAX's, in C++: 5 minutes deaf to SIGINT and SIGTERM,
    then a C++ abort. It is now polled from Python (a signal stops it) and ends in one line."""
    from diffpg.envs.core import SettingError

    from diffpg.devices import _wait_for_coordinator

    with pytest.raises(SettingError, match="nothing answered there within 1 s"):
        _wait_for_coordinator("127.0.0.1:1", wait_s=1)
    with pytest.raises(SettingError, match="must be host:port"):
        _wait_for_coordinator("localhost", wait_s=1)


def test_a_comparison_whose_saved_settings_no_longer_match_its_samples_is_not_resumed():
    """``num_estimates`` changed in results.json gave a result mixing 8 and 16 estimates per
    point, marked complete."""
    import numpy as np
    from diffpg.envs.core import SettingError

    from diffpg.comparison_files import check_finished_points
    from diffpg.comparison_settings import CompareSettings

    settings = CompareSettings(env="pendulum", sweep="none", horizon=4, num_estimates=16,
                               estimators=("bptt",))
    point = settings.points[0]
    entry = {"sweep_value": point.value, "horizon": point.horizon, "estimators": {"bptt": {}},
             "reference": {"kind": "reinforce"}}
    with pytest.raises(SettingError, match="holds 8 samples of estimates/bptt, where this "
                                           "comparison's settings take 16"):
        check_finished_points(((entry, {"estimates/bptt": np.zeros((8, 3))}),), settings)
    check_finished_points(((entry, {"estimates/bptt": np.zeros((16, 3))}),), settings)


def test_a_home_that_is_a_file_prints_nothing_from_matplotlib(tmp_path):
    """matplotlib's two warnings (its config folder cannot be made; a temporary one is used)
    reached every command's output when HOME was not a folder."""
    import os
    import sys

    home = tmp_path / "a_file"
    home.write_text("")
    done = subprocess.run([sys.executable, "-c", "import diffpg; diffpg.setup(); "
                           "import matplotlib.pyplot"], capture_output=True, text=True,
                          timeout=HANG_LIMIT_S, env=os.environ | {
                              "HOME": str(home), "DIFFPG_CACHE_DIR": "off",
                              "MPLCONFIGDIR": ""})
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_too_few_file_descriptors_is_one_line_with_nothing_after_it(tmp_path):
    """``ulimit -n 12``: orbax's save failed with EMFILE: a traceback, then the unawaited
    coroutines' and the half-built event loop's reports at exit. Now the one line, and the
    library's leftovers are freed quietly before the exit."""
    import sys

    out = tmp_path / "run"
    done = subprocess.run(under_ulimit("-n", 12, [sys.executable, "-m", "diffpg.cli", "train",
                                                  *TRAIN, "--out", str(out)]),
                          capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("diffpg train: error: too many files are open") and "ulimit -n" in last
    assert "Traceback" not in done.stderr and "never awaited" not in done.stderr, done.stderr


def test_the_advice_to_resume_is_one_shell_word_for_any_folder_name():
    """``--resume sp ace`` and ``--resume -y``, printed as they were, failed when followed."""
    import shlex
    from pathlib import Path

    for name in ("sp ace", "-y", "plain", "it's"):
        advice = cli._shell_word(Path(name))
        (word,) = shlex.split(advice)
        assert Path(word) == Path(name) and not word.startswith("-"), advice


def test_more_critic_minibatches_than_samples_is_one_line(tmp_path, capsys):
    """``--critic-minibatches 1000`` on 16 samples trained with empty minibatches: a NaN
    critic loss on every row, exit 0."""
    out = tmp_path / "run"
    assert cli.main(["train", *TRAIN, "--out", str(out), "shac", "--window", "2",
                     "--critic-minibatches", "1000"]) == 2
    error = capsys.readouterr().err
    assert "critic_minibatches=1000 is more than the 16 samples" in error
