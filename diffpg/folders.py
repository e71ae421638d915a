"""Output folders, the same discipline for every command that writes (train, compare, video).

* ``prepare_output`` / ``output_folder``: the folder chosen, refused in one line when it
  cannot be used (a file, a dangling link, under a file, not writable, a folder of earlier
  results without ``--overwrite``), all **before** any work is done;
* ``run_lock``: one process owns a folder while it writes (``.lock``, under ``flock``);
* ``file_system_errors``: a write the file system refuses (full, over quota, past the file-size
  limit, read-only...) is one line naming the folder, what was being written and what to do;
* ``write_atomically`` / ``atomic_path``: a file is written under a temporary name and renamed
  into place, so a reader sees the old file or the new one, never half of one;
* ``interruptions``: SIGINT and SIGTERM become ``Interrupted`` (exit status 128 + signal),
  held back while a write is in progress (``critical()``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import os
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from diffpg.devices import process_count
from diffpg.envs.core import SettingError


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command; raised between writes, never inside one.
    ``signals``: every one received, in order (a second while a save finished); ``signum``: the
    first, which stopped it. Its text names them all (``SIGINT, then SIGTERM``)."""

    def __init__(self, *signals: int):
        super().__init__(", then ".join(signal.Signals(s).name for s in signals))
        self.signals = signals
        self.signum = signals[0]


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Own ``run_dir`` while the block runs: ``.lock`` holds this process's pid and host under
    an exclusive ``flock``, which the system releases when the process ends, however it ends.
    Another live owner is a ``SettingError``; the lock file of a process that is gone is taken
    over, with a message."""
    path = run_dir / ".lock"
    with file_system_errors(run_dir, "the run folder's lock"):
        # Without blocking (a FIFO put there would wait for a writer), and never through a
        # link (the lock is written: a link would overwrite the file it points to).
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW,
                                 0o644)
        except IsADirectoryError:
            descriptor = None
        except OSError as error:
            if error.errno != errno.ELOOP or not path.is_symlink():
                raise
            descriptor = None
    if descriptor is None or not stat.S_ISREG(os.fstat(descriptor).st_mode):
        if descriptor is not None:
            os.close(descriptor)
        raise SettingError(f"{str(path)!r} is not the lock file diffpg writes (a link, folder, "
                           "FIFO or device is there); remove it and run the command again")
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = ""
            for _ in range(20):  # the owner writes its name right after it takes the lock
                owner = _printable(os.pread(descriptor, 4096, 0))
                if owner:
                    break
                time.sleep(0.05)
            raise SettingError(f"folder {str(run_dir)!r} is in use by "
                               f"{owner or 'another process'}; wait for it to finish, or give "
                               "a new command another --out") from None
        previous = _printable(os.pread(descriptor, 4096, 0))
        if previous:
            print(f"diffpg: taking over the lock of {run_dir} from {previous}, which has ended",
                  file=sys.stderr)
        os.ftruncate(descriptor, 0)
        with file_system_errors(run_dir, "the run folder's lock"):
            os.pwrite(descriptor, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(descriptor)  # releases the flock


def _printable(content: bytes, limit: int = 120) -> str:
    """A lock file's owner as one printable line: its first line, control characters (a
    terminal's escape codes) dropped, at most ``limit`` characters."""
    line = (content.decode(errors="replace").strip().splitlines() or [""])[0]
    return "".join(c for c in line if c.isprintable())[:limit]


STORAGE_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or raise the quota"),
    errno.EFBIG: ("a file reached the file-size limit", "raise the limit (ulimit -f)"),
    errno.EROFS: ("the file system is read-only", "make it writable or choose another folder"),
    errno.EACCES: ("permission denied", "make it writable or choose another folder"),
    errno.ENAMETOOLONG: ("a file name is too long", "choose a shorter path"),
    errno.ELOOP: ("a link loop", "remove the loop or choose another path"),
    errno.EPERM: ("the operation is not permitted (an immutable file, or a system folder "
                  "such as /sys or /proc)", "choose another folder (an immutable file: chattr -i)"),
    errno.EMFILE: ("too many files are open in this process",
                   "raise the limit of open files (ulimit -n, 1024 or more)"),
    errno.ENFILE: ("too many files are open on the system", "close some programs"),
}
"""The file-system errors a write can meet however correct the program (errno: what happened,
what to do); the library calls that write (orbax's TensorStore) report them in their own
exception types, with the system's message or ``os_error_code='N'`` in the text."""



def read_regular_file(path: Path) -> bytes:
    """The bytes of the regular file ``path``; ``OSError`` otherwise: missing
    (``FileNotFoundError``), a folder, or a FIFO, socket or device, which would block a read or
    never end (opened without blocking, checked, then read)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return file.read()

def storage_problem(error: BaseException) -> tuple[str, str] | None:
    """``(what happened, what to do)`` when ``error`` is one of ``STORAGE_ERRORS``, else
    ``None``."""
    text = str(error)
    for code, problem in STORAGE_ERRORS.items():
        if ((isinstance(error, OSError) and error.errno == code) or os.strerror(code) in text
                or f"os_error_code='{code}'" in text):
            return problem
    if "RESOURCE_EXHAUSTED" in text:
        return STORAGE_ERRORS[errno.ENOSPC]
    return None


def what_happened(error: OSError) -> str:
    """What the system refused, in ``STORAGE_ERRORS``' words where it is one of them, else in
    the system's own."""
    problem = storage_problem(error)
    return problem[0] if problem else (error.strerror or str(error))


def not_diffpg_s(path: Path, removing: str, what: str) -> SettingError:
    """The one line refusing to delete ``path``, a file diffpg does not write, which
    ``removing`` (``--overwrite``, or a resume's own clearing) would delete with ``what``."""
    elsewhere = " or choose another --out" if removing == "--overwrite" else ""
    return SettingError(f"{str(path)!r} is not a file diffpg writes; {removing} would delete it "
                        f"with {what}: move it away{elsewhere}")


def is_storage_error(error: BaseException) -> bool:
    """Whether ``error`` is a write that failed for the file system's sake (``STORAGE_ERRORS``:
    full, over quota or the file-size limit, read-only...), not the program's."""
    return storage_problem(error) is not None


@contextlib.contextmanager
def file_system_errors(run_dir: Path, what: str) -> Iterator[None]:
    """A write of ``what`` that the file system refuses (``STORAGE_ERRORS``) becomes one line
    naming the folder, what happened, what was being written and what to do."""
    try:
        yield
    except Exception as error:
        problem = storage_problem(error)
        if problem is None:
            raise
        happened, advice = problem
        if happened.startswith("no space") and _no_free_inodes(run_dir):
            happened, advice = (f"no free inodes (file entries) left on the device of "
                                f"{str(run_dir)!r}", "remove some files")
        elif happened.startswith("no space"):
            free = shutil.disk_usage(run_dir).free if run_dir.exists() else 0
            happened += f" of {str(run_dir)!r} ({free:,} bytes free)"
        else:
            happened += f" in {str(run_dir)!r}"
        raise SettingError(f"{happened} while writing {what}; {advice}, then run again (train "
                           "and compare: --resume continues what was saved)") from None


FEW_INODES = 100
"""Free file entries below which a full disk's ENOSPC is read as a lack of entries: the failed
write's own files, removed before the message, free a few."""


def _no_free_inodes(folder: Path) -> bool:
    """Whether the file system of ``folder`` has (almost) no file entries left, the cause of a
    full disk's ENOSPC with bytes to spare."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_files > 0 and stats.f_favail < FEW_INODES  # (btrfs counts no entries: 0)


def check_file_size_limit(largest_file_bytes: int, what: str,
                          smaller: str = "make the run smaller", bound: str = "about") -> None:
    """One line, before any work, when the process's file-size limit (``ulimit -f``) is below
    ``largest_file_bytes``, about the largest file the command will write (``what``; ``bound``:
    how the size is known, "about" or, for a GIF, "at least")."""
    import resource

    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and limit < largest_file_bytes:
        raise SettingError(f"the file-size limit (ulimit -f: {limit:,} bytes) is below {what} "
                           f"({bound} {largest_file_bytes:,} bytes); raise it (ulimit -f "
                           f"unlimited) or {smaller}")


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def temporary_name(path: Path) -> Path:
    """Where ``atomic_path`` writes ``path`` first: a hidden name in the same folder with the
    same extension, unique to this process (two processes writing one file never share it)."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


PARTIAL_PATTERN = ".*.partial*"
"""The names ``temporary_name`` gives (and older versions' ``.NAME.partial.EXT``): what a write
cut short by SIGKILL leaves."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path (``temporary_name``) to write; renamed to ``path`` when the block
    completes, removed when it fails."""
    temporary = temporary_name(path)
    try:
        with file_system_errors(path.parent, path.name):
            yield temporary
            temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


WRITE_PROBE_PREFIX = ".diffpg-write-test-"
"""The name of ``check_writable``'s short-lived probe file, before its process id."""


def check_writable(folder: Path) -> None:
    """One line, before any work, when ``folder`` (which exists) cannot take a new file."""
    probe = folder / f"{WRITE_PROBE_PREFIX}{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as error:
        raise _cannot_write("out", folder, "is not writable", error) from None
    probe.unlink(missing_ok=True)


def check_path_room(folder: Path, deepest: str, option: str = "out") -> None:
    """One line, before any work, when ``folder / deepest`` (the longest path a command writes
    below ``folder``, which exists) is longer than the file system takes for a path."""
    limit = os.pathconf(folder, "PC_PATH_MAX")
    length = len(os.fsencode(os.path.abspath(folder / deepest)))
    if length >= limit:
        raise SettingError(f"{option}={str(folder)!r} leaves no room for the files written inside "
                           f"it ({deepest!r} below it is a path of {length:,} bytes, and the file "
                           f"system takes {limit - 1:,}); choose a shorter --{option}")


def _cannot_write(option: str, path: Path, verb: str, error: OSError) -> SettingError:
    """The one line for ``--option path`` that the file system refused: what happened (in
    ``STORAGE_ERRORS``' words where it is one of them) and what to do."""
    problem = storage_problem(error)
    reason = what_happened(error)
    advice = problem[1] if problem else ""
    for general in ("another folder", "another path", "a shorter path"):
        advice = advice.replace(general, f"{general.rsplit(' ', 1)[0]} --{option}")
    if f"--{option}" not in advice:
        advice = (f"{advice}, or " if advice else "") + f"choose another --{option}"
    return SettingError(f"{option}={str(path)!r} {verb} ({reason}); {advice}")


def check_file_writable(path: Path, option: str = "out") -> None:
    """One line, before any work, when the file ``path`` (in a folder that exists) cannot be
    written through ``atomic_path``: its temporary name and its own are tried (a name too long
    with the temporary's prefix, a read-only or full folder), an existing file left as it is."""
    probes = [temporary_name(path)] + ([] if path.exists() else [path])
    for probe in probes:
        try:
            probe.write_bytes(b"")
        except OSError as error:
            raise _cannot_write(option, path, "cannot be written", error) from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)


def held_entries(folder: Path) -> list[str]:
    """The names in ``folder`` besides a lock, write probes and the partial files of writes cut
    short (``atomic_path``'s), sorted: what a user or a command left there."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock" and not (
        fnmatch.fnmatch(p.name, PARTIAL_PATTERN) or p.name.startswith(WRITE_PROBE_PREFIX)))


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` holds anything besides a lock and write probes (``run_lock``'s and
    ``check_writable``'s, which another process of the same run may hold at this moment)."""
    return any(p.name != ".lock" and not p.name.startswith(WRITE_PROBE_PREFIX)
               for p in folder.iterdir())


def prepare_output(out: Path | None, overwrite: bool, default_name: str) -> Path:
    """The output folder, created and checked writable: ``out``, or
    ``runs/<default_name>-<timestamp>``. A folder that holds files is refused unless
    ``overwrite`` (the command then removes what it writes itself, under its lock, with
    ``remove_files``). Errors are one line naming ``--out``."""
    if out is None and process_count() > 1:
        raise SettingError("out is required when several processes run one command (each would "
                           "name its own default folder)")
    if out is None:
        out = Path("runs") / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise SettingError(f"out={str(out)!r} is a file, not a folder; choose another --out")
    if out.is_symlink() and not out.exists():
        raise SettingError(f"out={str(out)!r} is a link to nothing; choose another --out")
    if out.exists() and not overwrite and _holds_files(out):
        raise SettingError(f"out={str(out)!r} exists and is not empty; pass --overwrite to "
                           "write into it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SettingError(f"out={str(out)!r} is under a file, not a folder; choose another "
                           "--out") from None
    except FileNotFoundError as error:
        try:
            os.getcwd()
            reason = f"{error.strerror}: {error.filename}"
        except FileNotFoundError:
            reason = "the working directory is gone"
        raise SettingError(f"out={str(out)!r} cannot be created ({reason}); choose another "
                           "--out") from None
    except OSError as error:  # permission denied, a read-only file system, a full disk...
        raise _cannot_write("out", out, "cannot be created", error) from None
    check_writable(out)
    return out


@contextlib.contextmanager
def output_folder(out: Path | None, overwrite: bool, default_name: str) -> Iterator[Path]:
    """``prepare_output``'s folder for the block; the folders the block created (``out`` and
    any missing parents) are removed again when the block fails before writing anything into
    them (a bad setting leaves no trace)."""
    created = [] if out is None else [p for p in (out, *out.parents) if not p.exists()]
    path = prepare_output(out, overwrite, default_name)
    created = created or ([path] if out is None else [])
    try:
        yield path
    except BaseException:
        with contextlib.suppress(OSError):
            if created and not _holds_files(path) and not locked_by_another_process(path):
                (path / ".lock").unlink(missing_ok=True)
                for folder in created:  # the deepest first; each is empty once below is gone
                    folder.rmdir()
        raise


def locked_by_another_process(folder: Path) -> bool:
    """Whether another process holds ``folder``'s ``run_lock`` now (two commands started
    together on one new folder: the one refused must not remove the folder the other runs in)."""
    try:
        descriptor = os.open(folder / ".lock", os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


def remove_files(folder: Path, names: tuple[str, ...]) -> None:
    """Remove the files and folders ``names`` (names or glob patterns) of ``folder`` that
    exist."""
    for name in names:
        for path in folder.glob(name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


UNWINDING_S = 2.0
"""Seconds after a signal raised ``Interrupted`` during which another is named beside it rather
than raised into its unwinding."""


class _Interruptions:
    """SIGINT and SIGTERM as ``Interrupted`` exceptions, held back inside ``critical()``.

    Every signal is also remembered (``received``, in order): Python drops an exception raised
    while it runs a garbage-collection callback (JAX has one, busy in a command's first
    seconds), so ``check()`` and the end of every ``critical()`` raise it again, naming every
    signal that came."""

    def __init__(self, arrivals: int | None = None):
        self.deferring = False
        self.stopping = False  # the command is reporting: later signals are named, not raised
        self._raised_at = -float("inf")
        self.received: list[int] = []
        self._arrivals = arrivals  # the read end of the wakeup pipe (None: no order kept)
        self._recorded_ahead: list[int] = []  # read from the pipe before their handler ran

    def handle(self, signum, frame):
        del frame
        arrived = self._arrived()
        self.received += arrived
        self._recorded_ahead += arrived
        if signum in self._recorded_ahead:
            self._recorded_ahead.remove(signum)
        else:  # (no wakeup pipe, or another took its place)
            self.received.append(signum)
        # A signal soon after one that raised is named, not raised: inside the first's
        # unwinding it broke a lock's release or a library's cleanup (a traceback). One later
        # raises again (a library may have swallowed the first).
        unwinding = time.monotonic() - self._raised_at < UNWINDING_S
        if not (self.deferring or self.stopping or unwinding):
            self._raised_at = time.monotonic()
            raise Interrupted(*self.received)

    def _arrived(self) -> list[int]:
        """SIGINT and SIGTERM in the order they arrived since the last call. Python runs the
        handlers of signals that came during one native call (an XLA compile: seconds) in the
        order of their numbers, SIGINT's before SIGTERM's whichever came first; the C-level
        handler writes each number to the wakeup pipe as the signal arrives."""
        if self._arrivals is None:
            return []
        try:
            numbers = os.read(self._arrivals, 512)
        except BlockingIOError:
            return []
        return [number for number in numbers if number in (signal.SIGINT, signal.SIGTERM)]

    def check(self) -> None:
        """Raise ``Interrupted`` if a signal came (and its first exception was dropped)."""
        if self.received:
            self._raised_at = time.monotonic()
            raise Interrupted(*self.received)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A save: a signal waits until it is complete (the outermost one, when nested)."""
        outer, self.deferring = self.deferring, True
        try:
            yield
        finally:
            self.deferring = outer
        if not outer:
            self.check()


@contextlib.contextmanager
def interruptions() -> Iterator[_Interruptions]:
    """Route SIGINT and SIGTERM to ``Interrupted`` while the block runs (main thread only;
    elsewhere nothing is installed and ``critical`` does nothing). Inside another such block
    (a command's, around a library call's), the outer guard is the guard: a signal it kept
    (its exception dropped) is not forgotten, and the next one names both."""
    if threading.current_thread() is not threading.main_thread():
        yield _Interruptions()
        return
    outer = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    if isinstance(outer, _Interruptions):
        yield outer
        return
    read_end, write_end = os.pipe()
    for end in (read_end, write_end):
        os.set_blocking(end, False)
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    guard = _Interruptions(read_end)
    previous = {s: signal.signal(s, guard.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook = sys.unraisablehook

    def unraisable(report):  # Python dropped an Interrupted (in a gc callback): kept as pending
        if not isinstance(report.exc_value, Interrupted):
            previous_hook(report)

    sys.unraisablehook = unraisable
    try:
        yield guard
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_wakeup, warn_on_full_buffer=False)
        for end in (read_end, write_end):
            os.close(end)
