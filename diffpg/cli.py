"""The ``diffpg`` command line: ``compare``, ``train``, ``eval`` and ``video``.

Options come from the settings dataclasses through tyro, with the documentation written under
each field as their help; on ``diffpg train`` the estimator is a subcommand with its own
settings (``diffpg train --env hopper shac --window 16``). A user error (``diffpg.envs.core.SettingError``:
a bad setting, an existing output folder) prints one line naming the setting and exits with
status 2, without a traceback; any other exception is a defect and keeps its traceback (status 1).
``diffpg --import MODULE ...`` imports MODULE first (a user's estimators registering themselves).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

# Only the standard library is imported here: ``run`` takes SIGINT and SIGTERM before jax, brax
# and the rest load (seconds), and the functions import what they use.

COMMANDS = {
    "compare": "variance, bias and cost of every estimator, against the horizon",
    "train": "train a policy with any estimator (one loop for all)",
    "eval": "evaluate the latest checkpoint of a training run",
    "video": "an animated GIF of a training run's latest policy (offline, matplotlib)",
}


def usage() -> str:
    """The top-level help: the commands, every registered estimator with its description, and
    every environment."""
    import textwrap

    from diffpg import envs, estimators
    from diffpg.command_line import help_width

    width = help_width()

    def wrapped(text: str, indent: str, hanging: str | None = None) -> str:
        return textwrap.fill(text, width, initial_indent=indent,
                             subsequent_indent=indent if hanging is None else hanging) + "\n"

    return (wrapped("usage: diffpg [--import MODULE] {" + ",".join(COMMANDS) + "} [--help] ...",
                    "", " " * 14)
            + "       diffpg --version\n\n"
            + wrapped("Policy-gradient estimators compared on the same policy and states, and "
                      "trained in one loop.", "") + "\ncommands:\n"
            + "".join(wrapped(f"{name:8s} {text}", "  ", " " * 11)
                      for name, text in COMMANDS.items())
            + "\n" + wrapped("estimators (diffpg train ESTIMATOR ..., diffpg compare --estimators "
                            "NAME ...):", "", "  ")
            + "".join(wrapped(f"{name:16s}{estimators.registration(name).description}", "  ",
                              " " * 18)
                      for name in estimators.names())
            + "\nenvironments (--env NAME):\n" + wrapped(", ".join(envs.names()), "  "))


FOLDER_KINDS = {"a training run": ("settings.json", "checkpoints"),
                "a comparison": ("results.json", "report.md")}
"""What marks a folder as each command's output (``--overwrite`` replaces only its own kind)."""


def check_same_kind(out: Path | None, kind: str) -> None:
    """A one-line refusal to write ``kind`` (a key of ``FOLDER_KINDS``) into a folder that holds
    another command's output (``--overwrite`` would leave that output's files beside the new
    ones), or files but none of ``kind``'s (a user's folder, whose files named as ours
    ``--overwrite`` would replace)."""
    from diffpg.envs.core import SettingError
    from diffpg.folders import held_entries, locked_by_another_process

    if out is None or not out.is_dir() or locked_by_another_process(out):
        return  # (a folder in use: its lock's one line says so)
    for other, markers in FOLDER_KINDS.items():
        found = [name for name in markers if (out / name).exists()]
        if other != kind and found:
            raise SettingError(f"out={str(out)!r} holds {other} ({found[0]}), which {kind} does "
                               "not replace; choose another --out")
    held = held_entries(out)
    if held and not any((out / name).exists() for name in FOLDER_KINDS[kind]):
        raise SettingError(f"out={str(out)!r} holds {held[0]!r} but is not {kind}'s folder (it "
                           f"has no {FOLDER_KINDS[kind][0]}), whose files alone --overwrite "
                           "replaces; choose another --out")


def run_compare(argv: list[str], guard) -> Path:
    from tqdm import tqdm

    from diffpg.command_line import parse_compare_command
    from diffpg.compare import run_comparison
    from diffpg.devices import barrier, is_primary
    from diffpg.folders import check_path_room, check_writable, output_folder, remove_files, run_lock
    from diffpg.report import DEEPEST_FILE, OUTPUT_FILES, write_outputs, write_results

    settings, out, overwrite, finished = parse_compare_command(argv)
    check_same_kind(out, "a comparison")
    with contextlib.ExitStack() as stack:
        if finished is None:
            out = stack.enter_context(output_folder(out, overwrite, f"compare-{settings.env}"))
        else:
            check_writable(out)
        check_path_room(out, DEEPEST_FILE, "out" if finished is None else "resume")
        if is_primary():
            stack.enter_context(run_lock(out))
            if finished is None:
                remove_files(out, OUTPUT_FILES)  # --overwrite: no earlier result beside the new one
        barrier("diffpg: output folder checked")
        tasks_per_point = len(settings.specs) + 1 + settings.per_step
        bar = []  # made with the first task, so that an error before any is one line

        def progress(message: str) -> None:
            guard.check()  # a signal whose first exception was dropped stops here
            if not bar:
                bar.append(stack.enter_context(tqdm(
                    total=len(settings.points) * tasks_per_point, desc="compare", unit="task",
                    file=sys.stderr, disable=not is_primary(),
                    initial=len(finished or ()) * tasks_per_point)))
            bar[0].set_description(message)
            bar[0].update(1)

        def keep(results: dict) -> None:  # each finished point, kept if the run stops
            if is_primary() and not results["complete"]:
                with guard.critical():
                    write_results(results, out)

        try:
            results = run_comparison(settings, progress=progress, finished=finished or (),
                                     on_point=keep, keep_programs=True)
            if not is_primary():
                return out
            with guard.critical():  # a signal waits until every file is written
                written = write_outputs(results, out)
        except KeyboardInterrupt as interruption:
            interruption.kept = _comparison_kept(out)  # said on the one line main prints
            raise
    print(f"wrote {len(written)} files to {_printable(out)}:")
    for path in written:
        print(f"  {_printable(path)}")
    print((out / "report.md").read_text().split("## Reading")[0].split("## At horizon")[-1])
    return out


def _comparison_kept(out: Path) -> str:
    """What a stopped comparison left in ``out``, for the line that reports it."""
    import json

    try:
        results = json.loads((out / "results.json").read_text())
        done, total = results["finished_points"], results["total_points"]
    except (OSError, ValueError, KeyError):
        return "no sweep point had finished: nothing is kept"
    if results.get("complete"):  # (the signal came while its last files were written)
        return f"the comparison had finished: every file is written to {_printable(out)}"
    return (f"{done} of {total} sweep points are kept in {_printable(out)}: continue with diffpg compare "
            f"--resume {_shell_word(out)}")


def run_train(argv: list[str], guard) -> Path:
    from diffpg.command_line import parse_train_command
    from diffpg.folders import output_folder

    settings, out, overwrite, resume, sizes = parse_train_command(argv)
    check_same_kind(out, "a training run")
    if resume:
        return _train_into(settings, out, resume, sizes, guard)
    with output_folder(out, overwrite, f"train-{settings.env}-{settings.estimator}") as out:
        return _train_into(settings, out, resume, sizes, guard)


def _train_into(settings, out: Path, resume: bool, sizes: str, guard) -> Path:
    """Train into the checked folder ``out``, with a progress bar and a last line of results."""
    from tqdm import tqdm

    from diffpg.checkpoints import DEEPEST_FILE
    from diffpg.configs import config_for
    from diffpg.devices import barrier, is_primary
    from diffpg.folders import check_path_room
    from diffpg.runs import train

    check_path_room(out, DEEPEST_FILE, "resume" if resume else "out")
    barrier("diffpg: output folder checked")
    source = ("the run's own, resumed" if resume else
              (config_for(settings.env, settings.estimator, sizes).source
               or "no configuration for this env") + f", {sizes} sizes")
    bar = None

    def on_start(start: int) -> None:  # the settings are valid: say what runs, show progress
        nonlocal bar
        guard.check()  # a signal whose first exception was dropped stops here
        if is_primary():
            print(f"diffpg train: {settings.env} with {settings.estimator}: {settings.num_envs} "
                  f"envs x {settings.horizon} steps, {settings.updates} updates (defaults: "
                  f"{source}); run folder {_printable(out)}", file=sys.stderr)
        bar = tqdm(total=settings.updates, initial=start, desc="train", unit="update",
                   file=sys.stderr, disable=not is_primary())

    def on_log(row: dict) -> None:
        bar.n = row["update"]
        bar.set_postfix(reward=f"{row['eval/episode_reward']:.4g}",
                        sps=f"{row['training/sps']:.3g}")
        bar.refresh()

    try:
        state = train(settings, out, resume=resume, on_log=on_log, on_start=on_start)
    except KeyboardInterrupt as interruption:
        interruption.kept = _what_is_kept(out)  # said on the one line main prints
        raise
    finally:  # before any message: a bar closed later would print itself after it
        if bar is not None:
            bar.close()
    if is_primary():
        print(f"{int(state.update.ravel()[0])} updates, {int(state.env_steps.ravel()[0])} env "
              f"steps; run folder: {_printable(out)}")
    return out


def _printable(path: Path) -> str:
    """``path`` as printed: itself (``./-x`` for a name that starts with a dash, so that it reads
    back as a path, not an option), or quoted with its escapes where it holds a control
    character (a newline would split the line a script reads, an escape would reach the
    terminal)."""
    text = f"./{path}" if str(path).startswith("-") else str(path)
    return text if text.isprintable() else repr(text)


def _shell_word(path: Path) -> str:
    """``path`` as a shell reads it back as one word, and not as an option (``./-x``); with a
    control character, in bash's ``$'...'`` quoting, its escapes spelt out."""
    import shlex

    text = f"./{path}" if str(path).startswith("-") else str(path)
    if not text.isprintable():
        return "$'" + text.encode("unicode_escape").decode().replace("'", "\\'") + "'"
    return shlex.quote(text)


def _what_is_kept(out: Path) -> str:
    """What an interrupted training run left in ``out``, for the line that reports it."""
    from diffpg.checkpoints import checkpoint_updates

    kept = checkpoint_updates(out) if out.exists() else []
    if kept:
        return (f"the checkpoint of update {kept[-1]} is kept: continue with diffpg train "
                f"--resume {_shell_word(out)}")
    if (out / "settings.json").is_file():
        return (f"before the first checkpoint: diffpg train --resume {_shell_word(out)} starts "
                "it again from its settings")
    return "before the first checkpoint: nothing to resume, start it again"


def run_eval(argv: list[str], guard) -> None:
    del guard
    from diffpg.command_line import parse_run_command
    from diffpg.runs import evaluate_run

    command = parse_run_command(argv, "diffpg eval")
    for name, value in evaluate_run(command.run_dir, command.episodes, command.seed,
                                    command.checkpoint).items():
        print(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")


def run_video(argv: list[str], guard) -> None:
    del guard
    from diffpg.command_line import parse_run_command
    from diffpg.estimators.base import check_positive_int
    from diffpg.video import video_of_run

    command = parse_run_command(argv, "diffpg video", video=True)
    check_positive_int("every", command.every)
    gif = video_of_run(command.run_dir, command.out, command.every, command.seed_index)
    print(f"wrote {_printable(gif)}")


RUNNERS = {"compare": run_compare, "train": run_train, "eval": run_eval, "video": run_video}


def import_user_modules(argv: list[str]) -> list[str]:
    """Import the modules named by leading ``--import MODULE`` options (from the working
    directory too); returns the remaining arguments."""
    from diffpg.envs.core import SettingError

    while argv and (argv[0] == "--import" or argv[0].startswith("--import=")):
        if argv[0] == "--import":
            if len(argv) < 2:
                raise SettingError("--import needs a module name")
            name, argv = argv[1], argv[2:]
        else:
            name, argv = argv[0].split("=", 1)[1], argv[1:]
        if not name.strip() or name.startswith("."):
            raise SettingError(f"--import {name!r}: needs a module's absolute name (a module on "
                               "the path, or a .py file's name without .py in the working "
                               "directory)")
        if name.endswith(".py") or "/" in name or "\\" in name:
            stem = Path(name).stem
            raise SettingError(f"--import {name}: needs a module's name, not a file's path; from "
                               f"the file's folder (or with it on PYTHONPATH): --import {stem}")
        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            importlib.import_module(name)
        except ImportError as error:  # (an exception of the module's own code is its own)
            raise SettingError(f"--import {name}: {error}") from error
        except SyntaxError as error:
            raise SettingError(f"--import {name}: {error.msg} ({error.filename}, line "
                               f"{error.lineno})") from error
        except SystemExit as error:  # a script's exit, not the command's
            raise SettingError(f"--import {name}: the module exits when imported "
                               f"(sys.exit({error.code!r})); import a module that only "
                               "defines and registers") from None
    return argv


def _name(command: str) -> str:
    return f"diffpg {command}" if command != "diffpg" else "diffpg"


def _free_interrupted_frames(interruption: BaseException) -> None:
    """Free what the interrupted or failed code held (the frames of ``interruption`` and of
    the errors chained to it), its finalizers' complaints silenced. A signal, or a refusal such
    as too many open files, can land inside a library's half-built object (an asyncio event
    loop's constructor, whose finalizer then fails) or leave a coroutine never awaited; after
    the one-line message, their tracebacks and warnings at exit would be noise."""
    unraisable_hook = sys.unraisablehook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.unraisablehook = lambda unraisable: None
        try:
            chained, seen = interruption, set()
            while chained is not None and id(chained) not in seen:  # (a refusal's line keeps
                seen.add(id(chained))                                # the library's error)
                traceback.clear_frames(chained.__traceback__)
                with contextlib.suppress(AttributeError):  # (a frozen dataclass exception)
                    chained.__traceback__ = None
                chained = chained.__context__ or chained.__cause__
            gc.collect()
        finally:
            sys.unraisablehook = unraisable_hook


def _report_interruption(command: str, guard, stopped: BaseException) -> int:
    """The one line of a command that signals stopped (``stopped``: the exception that ended
    it, an ``Interrupted`` or what a library made of one): every signal ``received``, in order
    (those after the first came while it stopped), and what it kept; returns 128 + the first.
    ``guard``: the command's ``folders.interruptions()`` (``None`` before it was in place)."""
    received = guard.received if guard is not None else []
    signals = list(received) or [getattr(stopped, "signum", signal.SIGINT)]
    if guard is not None:
        guard.stopping = True  # a signal now is named by the line below, not raised into it
    kept = getattr(stopped, "kept", None)
    # A progress bar left mid-line is ended first (no blank line where none was drawn).
    print(("\n" if getattr(sys.stderr, "mid_line", False) else "")
          + f"{_name(command)}: interrupted ("
          + ", then ".join(signal.Signals(s).name for s in signals) + ")"
          + (f"; {kept}" if kept else ""), file=sys.stderr)
    _free_interrupted_frames(stopped)
    return 128 + signals[0]


def main(argv: list[str] | None = None, received: list[int] | None = None) -> int:
    """Run one command; returns its exit status. ``received``: signals ``run`` took while the
    program was loading, acted on as soon as the command's own handling is in place."""
    from diffpg import devices
    from diffpg.compilation_cache import default_cache_dir
    from diffpg.envs.core import SettingError
    from diffpg.folders import interruptions
    from diffpg.runs import TrainingStopped

    argv = list(sys.argv[1:] if argv is None else argv)
    command = "diffpg"
    stack = contextlib.ExitStack()
    # What exists before the command is none of its garbage: frozen, a refusal's collection
    # (_free_interrupted_frames) skips it (after JAX's and Brax's imports: 0.8 s, then 0.1 s).
    gc.freeze()
    stack.callback(gc.unfreeze)
    guard = None
    try:
        # SIGINT and SIGTERM stop every command from here on with one line (interruptions()).
        guard = stack.enter_context(interruptions())
        guard.received.extend(received or ())
        guard.check()
        if sys.stderr is None:  # started with its error output closed (``diffpg ... 2>&-``)
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process's, until it exits)
        if sys.stdout is None:  # started with its standard output closed (``diffpg ... >&-``)
            raise SettingError("standard output is closed, so the command's results would be "
                               "lost; send it to a file or a terminal (> FILE)")
        argv = import_user_modules(argv)
        if not argv or argv[0] in ("-h", "--help"):  # asked for: output; missing: an error
            print(usage(), end="", file=sys.stdout if argv else sys.stderr)
            return 0 if argv else 2
        if argv[0] in ("-V", "--version"):
            import diffpg

            print(f"diffpg {diffpg.__version__}")
            return 0
        command, argv = argv[0], argv[1:]
        if command not in RUNNERS:
            raise SettingError(f"command {command!r} is not known; allowed: {list(COMMANDS)}")
        devices.check_xla_flags(default_cache_dir())
        devices.initialize_distributed_from_environment()
        devices.check_platforms()
        devices.check_single_precision()
        devices.check_address_space()
        RUNNERS[command](argv, guard)
        guard.check()  # a signal a library swallowed: the command does not end as if none came
    except SettingError as error:  # a bad setting (CommandLineError too): one line
        print(f"{_name(command)}: error: {error}", file=sys.stderr)
        if error.__context__ is not None:  # a library's failure, reported in the line above
            _free_interrupted_frames(error)
        return 2
    except TrainingStopped as error:
        print(f"{_name(command)}: stopped: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as interruption:
        return _report_interruption(command, guard, interruption)
    except BrokenPipeError:  # the reader of the output went away (``diffpg eval RUN | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 128 + signal.SIGPIPE
    except OSError as error:  # the file system refused a path or a write: not a defect
        return _storage_error(command, error)
    except SystemExit as exit_info:  # --help printed (to a full device: run() says so)
        return exit_info.code if isinstance(exit_info.code, int) else 2
    except Exception as error:  # a bug (diffpg's or an imported module's): keep its traceback
        if guard and guard.received:  # a signal a library turned into its own error (a C++
            return _report_interruption(command, guard, error)  # callback's)
        _print_defect(command, error)
        return 1
    finally:
        stack.close()
    return 0


def _storage_error(command: str, error: OSError) -> int:
    """The one line (status 2) of a path or write the file system refused; another ``OSError``
    is a defect (status 1)."""
    from diffpg.folders import storage_problem

    problem = storage_problem(error)
    if problem is None:
        _print_defect(command, error)
        return 1
    where = f" at {error.filename!r}" if error.filename else ""
    print(f"{_name(command)}: error: {problem[0]}{where}; {problem[1]}", file=sys.stderr)
    return 2


def _print_defect(command: str, error: BaseException) -> None:
    """A bug (diffpg's or an imported module's): its traceback, and a line saying so."""
    traceback.print_exception(error)
    print(f"{_name(command)}: error: the {type(error).__name__} above is not a bad setting: "
          "a defect in diffpg or in a module given with --import", file=sys.stderr)


class GuardedOutput:
    """A standard stream (``sys.stdout`` or ``sys.stderr``) whose failed writes do not stop the
    command. A full disk or device under ``> FILE`` or ``2> FILE`` (``/dev/full``, a quota) would
    otherwise stop a run at its first progress line, or fail it after everything was saved. The
    first failure is kept in ``failure``; later output is dropped. A reader that went away
    (``BrokenPipeError`` on standard output, ``diffpg eval RUN | head``) still stops the
    command: nobody reads its results any more. Everything else is the wrapped stream's."""

    PROGRESS_LINE_EVERY_S = 60.0
    """Not a terminal (a log file, a pipe): a progress bar's frames (``\r`` + the bar, redrawn
    in place on a terminal) become a line at most this often, and the bar's last frame a line
    when it closes."""

    def __init__(self, stream, stops_on_broken_pipe: bool) -> None:
        self._stream = stream
        self._stops_on_broken_pipe = stops_on_broken_pipe
        self.failure: OSError | None = None
        self.mid_line = False
        """Whether the last text written ended inside a line (a progress bar's)."""
        try:
            self._frames_as_lines = not stream.isatty()
        except (AttributeError, ValueError, OSError):
            self._frames_as_lines = True
        self._held_frame: str | None = None  # the newest frame not written yet
        self._frame_line_at = -float("inf")
        self._last_was_frame = False

    def _guarded(self, operation, *args):
        if self.failure is not None:
            return None
        try:
            return operation(*args)
        except BrokenPipeError:
            if self._stops_on_broken_pipe:
                raise
            self._fail(BrokenPipeError())
        except OSError as error:
            self._fail(error)
        return None

    def _fail(self, error: OSError) -> None:
        self.failure = error
        # What is still buffered goes nowhere at exit, instead of failing the interpreter's flush.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def write(self, text: str) -> int:
        written = self._as_lines(text) if self._frames_as_lines else text
        if written:
            self.mid_line = not written.endswith("\n")
            self._guarded(self._stream.write, written)
        return len(text)

    def _as_lines(self, text: str) -> str:
        """What goes to a stream that is not a terminal for ``text``: a frame is held, or
        written as a line when ``PROGRESS_LINE_EVERY_S`` have passed since the last; the newline
        that closes a bar writes the frame held (and no blank line)."""
        if text.startswith("\r"):
            self._held_frame = text[1:].rstrip()
            if time.monotonic() - self._frame_line_at < self.PROGRESS_LINE_EVERY_S:
                return ""
            self._frame_line_at = time.monotonic()
        elif text == "\n" and (self._held_frame is not None or self._last_was_frame):
            pass  # a bar closes
        else:
            self._last_was_frame = False
            return text
        frame, self._held_frame = self._held_frame, None
        self._last_was_frame = True
        return f"{frame}\n" if frame else ""

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def lost_output_line(command: str, stdout: object) -> str | None:
    """The one line for a command whose standard output could not be written, else ``None``."""
    failure = getattr(stdout, "failure", None)
    if failure is None:
        return None
    from diffpg.folders import what_happened

    return (f"{_name(command)}: error: standard output could not be written "
            f"({what_happened(failure)}), so what "
            "the command printed is lost; any files it wrote are complete (send the output "
            "where there is room: > FILE)")


STARTING_ADDRESS_SPACE = 2**31
"""Address space (2 GiB) the program maps to start: its libraries (JAX, Brax, MuJoCo, orbax)
map 0.5 GiB, 1.4 GiB once JAX has started its CPU backend (measured). A lower limit is refused
before any library loads, which under it fail each their own way (a shared object that cannot
be mapped, an interpreter out of memory, numpy's BLAS aborting with its own message); above it,
``devices.check_address_space`` checks the room left once JAX has started."""

STARTING_OPEN_FILES = 10
"""Open files the program needs to load its libraries (9 measured; MuJoCo's GLFW opens a pipe):
a lower limit (``ulimit -n``) is refused before any library loads, and a file the libraries
cannot open as they load is the same one line; above it, a command that runs out of files is
refused where it does (``folders.STORAGE_ERRORS``)."""


def limit_too_low_to_start() -> str | None:
    """The refusal (one line) of a process limit below what loading the libraries takes, or
    ``None``."""
    import resource

    address_space, _ = resource.getrlimit(resource.RLIMIT_AS)
    if address_space != resource.RLIM_INFINITY and address_space < STARTING_ADDRESS_SPACE:
        return (f"the address-space limit (ulimit -v) of {address_space / 2**30:.2f} GiB is "
                f"below the {STARTING_ADDRESS_SPACE / 2**30:.0f} GiB the program maps to load "
                "its libraries; raise the limit (ulimit -v)")
    open_files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if open_files != resource.RLIM_INFINITY and open_files < STARTING_OPEN_FILES:
        return (f"the limit of open files (ulimit -n) of {open_files} is below the "
                f"{STARTING_OPEN_FILES} the program needs to load its libraries; raise it "
                "(ulimit -n, 1024 or more)")
    return None


def run() -> None:
    """The ``diffpg`` program. SIGINT and SIGTERM are taken first, before the libraries load (a
    signal then stops the command with one line as soon as it starts); then ``diffpg.setup()``
    and ``main``, then an exit during which both signals are ignored. Everything is written when
    ``main`` returns; the interpreter's own shutdown (about a second, tearing down XLA) would
    otherwise die of a late signal with no message, though nothing is lost."""
    received: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda signum, frame: received.append(signum))
    # MuJoCo's MJX imports NVIDIA Warp when it is installed (the playground extra brings it),
    # which adds about a second to every command's start and another to its exit. diffpg runs
    # MJX on its JAX implementation only, so the program does not load Warp (a library user's
    # process is left alone: this is the command line's own choice).
    sys.modules.setdefault("warp", None)
    # A name the console cannot encode (a non-ASCII --out under PYTHONIOENCODING=ascii) is
    # printed escaped: a finished run's last line must not fail it after everything is saved.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    if sys.stdout is not None:
        sys.stdout = GuardedOutput(sys.stdout, stops_on_broken_pipe=True)
    if sys.stderr is not None:
        sys.stderr = GuardedOutput(sys.stderr, stops_on_broken_pipe=False)
    import diffpg

    refusal = limit_too_low_to_start()
    if refusal is not None:  # (numpy's BLAS, imported next, aborts with a message of its own)
        print(f"diffpg: error: {refusal}", file=sys.stderr)
        sys.exit(2)
    try:
        diffpg.setup()
    except ValueError as error:  # JAX refused one of its environment variables at import
        if "JAX flag" not in str(error):
            raise
        print(f"diffpg: error: {error} (a JAX_ environment variable); fix or unset it",
              file=sys.stderr)
        sys.exit(2)
    except (OSError, MemoryError) as error:  # a limit met while the libraries load
        if isinstance(error, OSError) and error.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        what = error.strerror if isinstance(error, OSError) else "out of memory"
        print(f"diffpg: error: the libraries could not load ({what}); raise the process's "
              "limits (ulimit -n for open files, ulimit -v for memory) or free memory",
              file=sys.stderr)
        sys.exit(2)
    status = main(received=received)
    if sys.stdout is not None:
        sys.stdout.flush()  # what is buffered is written now, its failure reported below
    lost = lost_output_line(next((word for word in sys.argv[1:] if word in COMMANDS), "diffpg"),
                            sys.stdout)
    if lost is not None and status == 0:
        print(lost, file=sys.stderr)
        status = 2
    if main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        # Stopped: everything it keeps is written (main returned: its folders are closed and
        # unlocked). The interpreter's teardown would wait for a computation still running on
        # the device (minutes for a large batch) before the process ends.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
