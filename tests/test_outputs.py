"""Every command that writes keeps its results whole: the output is checked before any work, one
process owns a folder, ``--overwrite`` leaves no earlier result beside the new one, and a signal
never leaves half a result (``diffpg.folders``)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import HANG_LIMIT_S, compiles, small_disk

from diffpg import cli
from diffpg.folders import run_lock

SMALL_COMPARE = ["compare", "--env", "lqr", "--estimators", "bptt", "--sweep", "none",
                 "--horizon", "2", "--num-estimates", "2", "--num-envs", "2",
                 "--critic-warmup", "0"]


def _one_line(capsys, *expected: str) -> str:
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    for text in expected:
        assert text in error, error
    return error


@pytest.mark.parametrize("where", ["under a file", "a dangling link", "a file"])
def test_compare_checks_its_output_folder_before_any_work(tmp_path, capsys, monkeypatch, where):
    from diffpg import compare

    (tmp_path / "file").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    out = {"under a file": tmp_path / "file" / "out", "a dangling link": tmp_path / "link",
           "a file": tmp_path / "file"}[where]
    computed = []
    monkeypatch.setattr(compare, "run_comparison", lambda *args, **kw: computed.append(args))
    assert cli.main(SMALL_COMPARE + ["--out", str(out)]) == 2
    _one_line(capsys, "out=")
    assert computed == []
    assert (tmp_path / "file").read_text() == "mine"


def test_a_compare_into_a_folder_in_use_is_refused(tmp_path, capsys, monkeypatch):
    from diffpg import compare

    out = tmp_path / "busy"
    out.mkdir()
    (out / "results.json").write_text("another process's")
    computed = []
    monkeypatch.setattr(compare, "run_comparison", lambda *args, **kw: computed.append(args))
    with run_lock(out):
        assert cli.main(SMALL_COMPARE + ["--out", str(out), "--overwrite"]) == 2
    _one_line(capsys, "is in use by process")
    assert computed == [] and (out / "results.json").read_text() == "another process's"


def test_a_train_into_a_comparisons_folder_in_use_is_refused(tmp_path, capsys):
    """compare and train take the same lock: neither writes into a folder the other is using
    (here a comparison still computing: its samples are kept, its results not yet written)."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "samples.npz").write_text("a comparison's")
    with run_lock(out):
        assert cli.main(["train", "--env", "pendulum", "--num-envs", "2", "--horizon", "4",
                         "--updates", "2", "--updates-per-call", "2", "--eval-envs", "2",
                         "--out", str(out), "--overwrite"]) == 2
    _one_line(capsys, "is in use by process")
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz"]
    assert (out / "samples.npz").read_text() == "a comparison's"


def test_overwrite_leaves_no_earlier_result_beside_the_new_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("variance_vs_horizon.png", "samples.npz", "results.json"):
        (out / name).write_text("earlier")
    (out / "notes.txt").write_text("the user's own")
    assert cli.main(SMALL_COMPARE + ["--out", str(out), "--overwrite"]) == 0
    assert not (out / "variance_vs_horizon.png").exists()  # one point: no sweep plot this time
    assert json.loads((out / "results.json").read_text())["settings"]["horizon"] == 2
    assert (out / "notes.txt").read_text() == "the user's own"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_signal_while_compare_writes_waits_until_every_file_is_written(tmp_path, capsys,
                                                                         monkeypatch):
    from diffpg import report

    markdown = report._markdown

    def interrupted_while_writing(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return markdown(*args)

    monkeypatch.setattr(report, "_markdown", interrupted_while_writing)
    out = tmp_path / "out"
    assert cli.main(SMALL_COMPARE + ["--out", str(out)]) == 128 + signal.SIGINT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(f"interrupted (SIGINT); the comparison had finished: every file is "
                         f"written to {out}"), line  # (not "interrupted" alone)
    for name in ("results.json", "table.csv", "samples.npz", "bias_and_cosine.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert not [p for p in out.iterdir() if ".partial" in p.name]


def test_a_compare_stopped_before_writing_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from diffpg import compare

    def interrupted(settings, progress, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(compare, "run_comparison", interrupted)
    out = tmp_path / "out"
    assert cli.main(SMALL_COMPARE + ["--out", str(out)]) == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("where", ["a read-only disk", "a folder on a read-only disk",
                                   "a deleted working directory"])
def test_compare_onto_a_folder_it_cannot_write_is_one_line_before_any_work(
        tmp_path, capsys, monkeypatch, where):
    import contextlib

    from diffpg import compare

    computed = []
    monkeypatch.setattr(compare, "run_comparison", lambda *args, **kw: computed.append(args))
    with contextlib.ExitStack() as stack:
        if where == "a deleted working directory":
            gone = tmp_path / "gone"
            gone.mkdir()
            monkeypatch.chdir(gone)
            gone.rmdir()
            arguments = SMALL_COMPARE  # the default folder, runs/compare-..., under the gone one
        else:
            disk = stack.enter_context(small_disk(tmp_path / "disk", "1m", read_only=True))
            out = disk if where == "a read-only disk" else disk / "out"
            arguments = SMALL_COMPARE + ["--out", str(out), "--overwrite"]
        assert cli.main(arguments) == 2
    _one_line(capsys, "out=", "choose another --out")
    assert computed == []


def test_a_disk_that_fills_up_during_a_compare_is_one_line_and_keeps_no_partial_file(
        tmp_path, capsys):
    with small_disk(tmp_path / "disk", "64k") as disk:
        (disk / "filler").write_bytes(b"\0" * 60_000)
        out = disk / "out"
        assert cli.main(SWEEP + ["--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert "Traceback" not in error
        assert "no space left on the device of" in error.rstrip("\n").splitlines()[-1], error
        assert not [p for p in out.rglob("*") if ".partial" in p.name]


SWEEP = ["compare", "--env", "lqr", "--estimators", "bptt", "reinforce", "--horizon", "4",
         "--num-estimates", "2", "--num-envs", "2", "--critic-warmup", "0"]


def _without_times(value):
    """A comparison's results without what depends on the clock."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "second" not in k}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_a_compare_stopped_mid_sweep_keeps_its_points_and_resume_finishes_it(tmp_path, capsys,
                                                                             monkeypatch):
    """SIGINT as the third of three sweep points starts: the two finished are kept (results.json
    and samples.npz, marked incomplete) and the line says so; ``--resume`` computes the third
    only, and gives what an uninterrupted comparison gives, number for number."""
    import numpy as np

    from diffpg import compare

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert cli.main(SWEEP + ["--out", str(whole)]) == 0
    at_point = compare._compare_at_point
    computed = []

    def stop_at_the_third(settings, inputs, *args):
        computed.append(inputs.point.horizon)
        if len(computed) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return at_point(settings, inputs, *args)

    monkeypatch.setattr(compare, "_compare_at_point", stop_at_the_third)
    capsys.readouterr()
    assert cli.main(SWEEP + ["--out", str(stopped)]) == 128 + signal.SIGINT
    error = capsys.readouterr().err  # the progress bar, then one line
    assert "Traceback" not in error
    assert error.rstrip("\n").splitlines()[-1] == (
        f"diffpg compare: interrupted (SIGINT); 2 of 3 sweep points are kept in {stopped}: "
        f"continue with diffpg compare --resume {stopped}")
    kept = json.loads((stopped / "results.json").read_text())
    assert (kept["finished_points"], kept["total_points"], kept["complete"]) == (2, 3, False)
    assert not (stopped / "report.md").exists()

    computed.clear()
    assert cli.main(["compare", "--resume", str(stopped)]) == 0
    assert computed == [4]
    resumed, expected = (json.loads((folder / "results.json").read_text())
                         for folder in (stopped, whole))
    assert resumed["complete"] and (stopped / "report.md").exists()
    assert _without_times(resumed["results"]) == _without_times(expected["results"])
    with np.load(stopped / "samples.npz") as a, np.load(whole / "samples.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize(("extra", "message"), [
    (["--horizon", "8"], "horizon cannot be given with resume"),
    (["--out", "elsewhere"], "out cannot be given with resume"),
])
def test_resume_keeps_the_comparisons_own_settings(tmp_path, capsys, extra, message):
    out = tmp_path / "done"
    assert cli.main(SMALL_COMPARE + ["--out", str(out)]) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert cli.main(["compare", "--resume", str(out)] + extra) == 2
    _one_line(capsys, message)
    assert (out / "results.json").read_text() == before


@pytest.mark.parametrize("damage", ["no results", "not json", "samples truncated",
                                    "another comparison's points", "a setting not valid",
                                    "a setting edited", "results a pipe"])
def test_resume_of_a_folder_that_is_not_a_stopped_comparison_is_one_line(tmp_path, capsys,
                                                                         damage):
    out = tmp_path / "done"
    assert cli.main(SMALL_COMPARE + ["--out", str(out)]) == 0
    results = out / "results.json"
    if damage == "no results":
        results.unlink()
    elif damage == "results a pipe":  # (it read as "has no results.json")
        results.unlink()
        os.mkfifo(results)
    elif damage == "not json":
        results.write_text("{")
    elif damage == "samples truncated":
        (out / "samples.npz").write_bytes((out / "samples.npz").read_bytes()[:100])
    elif damage in ("a setting not valid", "a setting edited"):
        values = json.loads(results.read_text())
        values["settings"]["num_estimates" if damage == "a setting not valid" else "seed"] = (
            1 if damage == "a setting not valid" else 5)
        results.write_text(json.dumps(values))
    else:
        values = json.loads(results.read_text())
        values["results"][0]["estimators"] = {"reinforce": {}}
        results.write_text(json.dumps(values))
    capsys.readouterr()
    assert cli.main(["compare", "--resume", str(out)]) == 2
    _one_line(capsys, {"another comparison's points": "is not this comparison's",
                       "a setting not valid": f"resume={str(out)!r}: its results.json holds a "
                       "setting that is not valid (num_estimates=1 must be at least 2",
                       "a setting edited": f"resume={str(out)!r}: its results.json has seed=5, "
                       "but its samples were computed with 0 (was results.json edited?)",
                       "results a pipe": "its results.json is not a file (a folder, a pipe"}.get(
                           damage, f"resume={str(out)!r}"))


@pytest.mark.parametrize(("name", "message"), [
    ("policy.mp4", "must end in .gif"),
    ("missing/policy.gif", "does not exist"),
    ("", "is a folder"),
    # legal itself (249 characters), too long with the temporary name's prefix and suffix
    ("p" * 245 + ".gif", "cannot be written (a file name is too long); choose a shorter --out"),
])
def test_video_checks_its_output_before_any_work(tmp_path, capsys, name, message):
    with compiles() as compiled:
        assert cli.main(["video", str(tmp_path / "run"), "--out", str(tmp_path / name)]) == 2
    _one_line(capsys, message)
    assert compiled == []


def test_a_video_of_a_file_names_the_run_not_the_gif_beside_it(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    assert cli.main(["video", str(tmp_path / "notes.txt")]) == 2
    _one_line(capsys, f"run={str(tmp_path / 'notes.txt')!r} is not a folder")


def _earlier_gif(path) -> bytes:
    """An earlier GIF of diffpg's at ``path`` (one frame, its comment); returns its bytes."""
    from PIL import Image

    from diffpg.video import GIF_COMMENT

    Image.new("RGB", (4, 4)).save(path, format="GIF", comment=GIF_COMMENT)
    return path.read_bytes()


def test_a_video_replaces_no_file_diffpg_did_not_write(tmp_path, capsys):
    """``video --out mine.gif`` replaced the user's file silently (train and compare refuse a
    folder that holds files); --overwrite into a folder that is not a run's replaced a user's
    metrics.csv and learning_curve.png."""
    mine = tmp_path / "mine.gif"
    mine.write_bytes(b"GIF89a the user's")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "settings.json").write_text("{}")
    assert cli.main(["video", str(run), "--out", str(mine)]) == 2
    assert "is a file that is not a GIF diffpg drew" in capsys.readouterr().err
    assert mine.read_bytes() == b"GIF89a the user's"
    os.mkfifo(tmp_path / "fifo.gif")  # (its reader would block) and a link to a device
    (tmp_path / "null.gif").symlink_to("/dev/null")
    for other in ("fifo.gif", "null.gif"):
        assert cli.main(["video", str(run), "--out", str(tmp_path / other)]) == 2
        assert "is a FIFO, a device or a link" in capsys.readouterr().err
    assert (tmp_path / "null.gif").is_symlink() and not (tmp_path / "fifo.gif").is_file()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "metrics.csv").write_text("the user's")
    for command in (["train", "--env", "pendulum"], SMALL_COMPARE):
        assert cli.main([*command, "--out", str(folder), "--overwrite"]) == 2
        error = capsys.readouterr().err
        assert "holds 'metrics.csv' but is not a" in error and len(error.splitlines()) == 1, error
    assert (folder / "metrics.csv").read_text() == "the user's"


def test_a_video_stopped_while_saving_keeps_the_earlier_gif(tmp_path, capsys, monkeypatch):
    from diffpg import video
    from diffpg.runs import train
    from diffpg.training import settings_for

    run = tmp_path / "run"
    train(settings_for(env="pendulum", updates=2, updates_per_call=2, num_envs=2, horizon=4,
                       eval_envs=2, hidden_sizes=(8,)), run)
    gif = tmp_path / "policy.gif"
    earlier = _earlier_gif(gif)

    def stopped_half_way(env, positions, rewards, path, **options):
        path.write_bytes(b"GIF89a half")
        raise KeyboardInterrupt

    monkeypatch.setattr(video, "save_gif", stopped_half_way)
    assert cli.main(["video", str(run), "--out", str(gif)]) == 128 + signal.SIGINT
    assert gif.read_bytes() == earlier
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []


def test_a_signal_whose_exception_was_dropped_still_stops_the_command(tmp_path, capsys,
                                                                      monkeypatch):
    """Python drops an exception raised inside a garbage-collection callback (JAX's, busy in a
    command's first seconds): the signal is remembered, and the command stops at its next
    progress point with one line and status 130 instead of running to the end."""
    from diffpg import compare

    real = compare.run_comparison

    def interrupted_in_a_callback(settings, progress, **kwargs):
        fired = []

        def callback(phase, info):
            if not fired:
                fired.append(phase)
                signal.raise_signal(signal.SIGINT)
                fired.append("handled")  # the handler runs in here; Python drops its exception

        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)
        assert fired  # the command goes on: only the remembered signal can stop it
        return real(settings, progress, **kwargs)

    monkeypatch.setattr(compare, "run_comparison", interrupted_in_a_callback)
    printed = []  # what Python would print as "Exception ignored in ..."
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    out = tmp_path / "out"
    assert cli.main(SMALL_COMPARE + ["--out", str(out)]) == 128 + signal.SIGINT
    error = capsys.readouterr().err
    assert "interrupted (SIGINT)" in error and "Traceback" not in error
    assert printed == []  # the dropped exception is not printed either
    assert not out.exists()


def test_a_dropped_signal_stops_training_before_its_first_call(tmp_path, capsys, monkeypatch):
    from diffpg import runs

    real = runs.train

    def interrupted_while_starting(settings, run_dir, **options):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except KeyboardInterrupt:
            pass
        return real(settings, run_dir, **options)

    monkeypatch.setattr(runs, "train", interrupted_while_starting)
    out = tmp_path / "run"
    assert cli.main(["train", "--env", "pendulum", "--updates", "2", "--updates-per-call", "2",
                     "--out", str(out)]) == 128 + signal.SIGTERM
    error = capsys.readouterr().err
    assert ("interrupted (SIGTERM); before the first checkpoint: diffpg train --resume "
            f"{out} starts it again from its settings") in error
    assert not (out / "metrics.csv").exists()  # stopped before the first training call


def test_a_signal_inside_a_half_built_object_stops_with_one_line_and_no_finalizer_noise():
    """A signal that lands inside a library's constructor (as in asyncio's event loop, which
    orbax builds) leaves a half-built object whose finalizer fails, and a coroutine never
    awaited: the command still ends with its one line, no traceback and no warning."""
    import subprocess

    script = (
        "import signal, sys\n"
        "from diffpg import cli\n"
        "class HalfBuilt:\n"
        "    def __init__(self):\n"
        "        signal.raise_signal(signal.SIGTERM)\n"
        "        self.closed = False\n"
        "    def __del__(self):\n"
        "        self.closed\n"
        "async def never_awaited():\n"
        "    pass\n"
        "def video(argv, guard):\n"
        "    pending = never_awaited()\n"
        "    HalfBuilt()\n"
        "cli.RUNNERS['video'] = video\n"
        "sys.exit(cli.main(['video']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": os.getcwd()}, timeout=HANG_LIMIT_S)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr.strip() == "diffpg video: interrupted (SIGTERM)", done.stderr


def test_a_signal_during_a_long_computation_ends_the_process_at_once():
    """The line came at once, but the process ended only when the device's computation did
    (minutes for a large batch: the interpreter's teardown waits for it). Here the computation
    would run for days; the process must end within the limit."""
    import subprocess

    script = (
        "import os, signal, sys, threading\n"
        "from diffpg import cli\n"
        "def video(argv, guard):\n"
        "    import jax, jax.numpy as jnp\n"
        "    x = jnp.ones((2000, 2000)) * 1e-3\n"
        "    forever = jax.jit(lambda x: jax.lax.fori_loop(\n"
        "        0, 2**30, lambda i, y: jnp.tanh(y @ y), x).sum()).lower(x).compile()\n"
        "    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()\n"
        "    print(float(forever(x)))\n"
        "cli.RUNNERS['video'] = video\n"
        "sys.argv = ['diffpg', 'video']\n"
        "cli.run()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": os.getcwd()}, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr.strip() == "diffpg video: interrupted (SIGTERM)", done.stderr
    assert done.stdout == ""


# ------------------------------------------------------------- signals at random moments


def _subprocess(arguments: list[str], rng, stop_after: tuple[float, float]):
    """Run ``diffpg ARGUMENTS`` in a new process; at a random moment in ``stop_after`` seconds
    send it SIGINT, SIGTERM or SIGKILL. Returns ``(exit status, stderr)``; a clean stop is one
    line and no traceback."""
    import subprocess

    process = subprocess.Popen(
        [sys.executable, "-m", "diffpg.cli", *arguments], text=True,
        env=os.environ | {"PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + rng.uniform(*stop_after)
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL]))
    _, stderr = process.communicate(timeout=HANG_LIMIT_S)
    status = process.returncode
    assert status in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGKILL), stderr
    assert "Traceback" not in stderr, stderr[-2000:]
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        assert "interrupted" in stderr.rstrip("\n").splitlines()[-1], stderr[-2000:]
    return status, stderr


@pytest.mark.slow
def test_comparisons_stopped_by_any_signal_at_random_moments_resume_to_the_same_result(tmp_path):
    """Start a comparison, stop it with a random signal at a random moment, continue it
    (``--resume`` once a point is kept, else start again), until one finishes: what it writes
    is what an uninterrupted comparison writes, and at every stop the folder holds either
    nothing or a readable, consistent part of it."""
    import random

    import numpy as np

    from diffpg.comparison_files import load_finished_points

    arguments = ["compare", "--env", "lqr", "--estimators", "bptt", "reinforce", "--horizon",
                 "8", "--num-estimates", "4", "--num-envs", "2", "--critic-warmup", "0"]
    whole = tmp_path / "whole"
    assert cli.main(arguments + ["--out", str(whole)]) == 0
    expected = json.loads((whole / "results.json").read_text())
    rng = random.Random(0)
    for trial in range(1):
        out, log = tmp_path / f"stopped-{trial}", []
        command = arguments + ["--out", str(out)]
        for attempt in range(16):  # a window that grows, so that a loaded machine finishes
            status, _ = _subprocess(command, rng, (3.0, 12.0 * 1.25**attempt))
            log.append(status)
            if status == 0:
                break
            if (out / "results.json").exists():
                settings, finished = load_finished_points(out)  # readable and consistent
                assert 1 <= len(finished) <= len(settings.points), log
                command = ["compare", "--resume", str(out)]
            else:  # stopped before its first point: nothing kept, start again
                command = arguments + ["--out", str(out), "--overwrite"]
        else:
            raise AssertionError(f"the comparison never finished: {log}")
        resumed = json.loads((out / "results.json").read_text())
        assert _without_times(resumed["results"]) == _without_times(expected["results"]), log
        with np.load(out / "samples.npz") as a, np.load(whole / "samples.npz") as b:
            for name in b.files:
                np.testing.assert_array_equal(a[name], b[name])
        assert (out / "report.md").exists()


@pytest.mark.slow
def test_videos_stopped_by_any_signal_at_random_moments_keep_the_earlier_gif(tmp_path):
    """``diffpg video`` stopped at random moments: the GIF at ``--out`` is the earlier one
    until a run finishes, then a whole new one."""
    import random

    from PIL import Image

    from diffpg.runs import train
    from diffpg.training import settings_for

    run = tmp_path / "run"
    train(settings_for(env="pendulum", updates=2, updates_per_call=2, num_envs=2, horizon=4,
                       eval_envs=2, hidden_sizes=(8,)), run)
    gif = tmp_path / "policy.gif"
    earlier = _earlier_gif(gif)
    rng, log = random.Random(1), []
    for attempt in range(12):
        status, _ = _subprocess(["video", str(run), "--out", str(gif), "--every", "4"], rng,
                                (1.0, 8.0 * 1.25**attempt))
        log.append(status)
        if status == 0:
            break
        assert gif.read_bytes() == earlier, log
    else:
        raise AssertionError(f"the video never finished: {log}")
    with Image.open(gif) as image:
        assert image.n_frames > 1


@pytest.mark.parametrize("stop_at_frame", [0, 1])
def test_a_gif_stopped_while_drawing_writes_nothing_and_passes_the_interruption_on(
        tmp_path, monkeypatch, stop_at_frame):
    """A Ctrl-C while the frames are drawn reaches the caller as itself and writes no file;
    finished, the GIF has one frame per drawn state. (matplotlib's movie writers finish on the
    way out of an exception: Pillow's wrote a partial GIF, or with no frame yet failed with an
    IndexError that replaced the interruption.)"""
    import numpy as np
    from PIL import Image

    from diffpg import video

    drawn = []

    def draw(axis, state):
        if len(drawn) == stop_at_frame:
            raise KeyboardInterrupt
        drawn.append(state)
        axis.plot([0, state[0]], [0, 1])

    monkeypatch.setattr(video, "_drawer", lambda env, positions: draw)
    path = tmp_path / "policy.gif"
    with pytest.raises(KeyboardInterrupt):
        video.save_gif(None, np.arange(6.0).reshape(3, 2), np.ones(2), path)
    assert not path.exists()

    stop_at_frame = None
    video.save_gif(None, np.arange(6.0).reshape(3, 2), np.ones(2), path, fps=10)
    with Image.open(path) as image:
        assert image.n_frames == 3 and image.info["duration"] == 100


def test_two_processes_writing_one_file_at_once_each_write_it_whole(tmp_path):
    """Two ``diffpg video`` of one run at once wrote one GIF through the same temporary name,
    and one died with a traceback: each process now has its own."""
    import subprocess

    path = tmp_path / "shared.txt"
    writer = ("import sys; from pathlib import Path; from diffpg.folders import write_atomically\n"
              "for i in range(300): write_atomically(Path(sys.argv[1]), sys.argv[2] * 1000)")
    processes = [subprocess.Popen([sys.executable, "-c", writer, str(path), letter],
                                  stderr=subprocess.PIPE, text=True) for letter in "ab"]
    for process in processes:
        assert process.wait(timeout=HANG_LIMIT_S) == 0, process.stderr.read()
    assert path.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]


def test_overwrite_removes_what_writes_cut_short_left(tmp_path):
    from diffpg.folders import remove_files
    from diffpg.run_files import RUN_FILES

    for name in ("metrics.csv", ".metrics.partial-123.csv", ".settings.partial.json", "mine.txt"):
        (tmp_path / name).write_text("x")
    remove_files(tmp_path, RUN_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_a_title_in_a_script_the_font_lacks_is_drawn_without_warnings(tmp_path):
    """A run folder named in a script matplotlib's font lacks (or with an emoji) printed a
    missing-glyph warning per character for the learning curve and every GIF frame: such
    characters are drawn as "?"; the font's own (accented Latin) are kept."""
    import warnings

    import numpy as np
    from diffpg.envs.drawing import drawable_text

    from diffpg import video
    from diffpg.runs import plot_learning_curve

    title = "runs/運行🐜-é"
    assert drawable_text(title) == "runs/???-é"
    rows = [{"env_steps": s, "training/walltime": s, "eval/episode_reward": 1.0,
             "eval/stochastic_episode_reward": 0.5} for s in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_learning_curve(rows, tmp_path / "curve.png", title=title)
        video.save_gif(None, np.arange(4.0).reshape(2, 2), np.ones(1), tmp_path / "p.gif",
                       title=title)
    assert (tmp_path / "curve.png").exists() and (tmp_path / "p.gif").exists()


def test_a_path_with_control_characters_is_printed_escaped(tmp_path, capsys):
    """A newline in --out split the "wrote N files" listing across lines (a script reading it
    line by line misreads it) and an escape code reached the terminal: such paths print
    quoted with their escapes, and the shell word a stop suggests reads back as the path."""
    out = tmp_path / "new\nline\x1b[31m"
    assert cli.main(SMALL_COMPARE + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and f"wrote 5 files to {str(out)!r}:" in printed
    listing = printed.split(":\n", 1)[1].splitlines()[:5]
    assert all(line.startswith("  '") and "\\nline\\x1b[31m/" in line for line in listing), listing
    word = cli._shell_word(out)
    done = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, text=True)
    assert done.stdout == str(out)


def test_a_second_signal_is_named_beside_the_first_which_stopped_the_command(capsys):
    """SIGINT, then SIGTERM while the save the first one waits for finishes: the line names both
    in order, and the exit status is the first's (it stopped the command)."""
    from diffpg.folders import Interrupted, interruptions

    with interruptions() as guard, pytest.raises(Interrupted) as stopped:
        with guard.critical():  # a save: both signals wait for it
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
    assert stopped.value.signals == (signal.SIGINT, signal.SIGTERM)
    assert cli.main(["compare", "--help"], received=[signal.SIGINT, signal.SIGTERM]) == 130
    assert capsys.readouterr().err.strip() == "diffpg: interrupted (SIGINT, then SIGTERM)"


def test_two_signals_during_one_native_call_are_named_in_the_order_they_came():
    """SIGTERM, then SIGINT while the main thread is inside one native call (an XLA compile in
    a run's first seconds): Python runs their handlers after it in the order of their numbers,
    and the line said "SIGINT, then SIGTERM", exit 130. The order is the one they came in."""
    import hashlib
    import threading

    from diffpg.folders import Interrupted, interruptions

    def send():  # (from a thread: the main one is in C, its handlers wait for it to return)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=send)
    ignored = {signum: signal.signal(signum, signal.SIG_IGN)  # (what comes after the guard)
               for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(Interrupted) as stopped, interruptions():
            sender.start()
            hashlib.pbkdf2_hmac("sha256", b"key", b"salt", 6_000_000)  # about 1.4 s, in C
        sender.join()
    finally:
        for signum, handler in ignored.items():
            signal.signal(signum, handler)
    assert stopped.value.signals == (signal.SIGTERM, signal.SIGINT)


def test_a_second_signal_while_the_first_unwinds_is_named_not_raised(monkeypatch, capsys):
    """SIGTERM then SIGINT in quick succession: the second was raised into the first's
    unwinding (a lock's release in compare: "release unlocked lock"; the line's own printing in
    video), a traceback and exit 1. It is named on the one line. A signal a library turned into
    its own error (matplotlib's C++ callback: a TypeError), or swallowed, still ends the command
    as interrupted, not as a defect or a success."""
    from diffpg.folders import Interrupted, interruptions

    with interruptions() as guard:
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)  # (while the first unwinds: named, not raised)
        time.sleep(0.1)
        assert guard.received == [signal.SIGTERM, signal.SIGINT]

    def turned_into_a_type_error(argv, guard):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except Interrupted:
            raise TypeError("affine_transform(): incompatible function arguments") from None

    def swallowed(argv, guard):
        with contextlib.suppress(Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)

    for runner in (turned_into_a_type_error, swallowed):
        monkeypatch.setitem(cli.RUNNERS, "video", runner)
        assert cli.main(["video", "run"]) == 128 + signal.SIGTERM
        assert capsys.readouterr().err.strip() == "diffpg video: interrupted (SIGTERM)"


def test_a_signal_kept_by_the_command_s_guard_is_not_forgotten_by_an_inner_one():
    """A SIGINT whose exception Python dropped was kept by the command's guard; the training
    loop's own guard, inside it, started empty, and a SIGTERM then stopped the run as if it
    were the only signal (exit 143, SIGINT not named)."""
    from diffpg.folders import Interrupted, interruptions

    with interruptions() as command_guard:
        command_guard.received.append(signal.SIGINT)  # (its exception dropped)
        with interruptions() as inner, pytest.raises(Interrupted) as stopped:
            assert inner is command_guard
            with inner.critical(), inner.critical():  # nested saves: the outer one ends it
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)
            pytest.fail("the signals were not raised at the end of the outer save")
        assert stopped.value.signals == (signal.SIGINT, signal.SIGTERM)
