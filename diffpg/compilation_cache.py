"""JAX's persistent compilation cache and quiet XLA logs (both turned on by ``diffpg.setup()``).

Brax physics takes tens of seconds to compile on a CPU; cached executables make the second run of a
command start in seconds. The directory is ``$DIFFPG_CACHE_DIR`` if set, else
``~/.cache/diffpg/jax``; ``DIFFPG_CACHE_DIR=off`` disables it.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_JAX_DEFAULT_LOG_LEVEL = "1"
"""What jax sets TF_CPP_MIN_LOG_LEVEL to when nobody has."""


def quiet_xla_logs() -> None:
    """Silence XLA's C++ log lines (a note for every cached executable loaded on a CPU whose
    features differ slightly, version notes) unless ``TF_CPP_MIN_LOG_LEVEL`` asks for them (set
    it to 0, 1 or 2 to see them). The variable is read when jaxlib loads; if jax was imported
    first, jaxlib's minimum level is set directly."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", _JAX_DEFAULT_LOG_LEVEL) != _JAX_DEFAULT_LOG_LEVEL:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if "jax" in sys.modules:
        try:
            from jax._src.lib import utils  # jaxlib's own setter (what jax_logging_level uses)

            utils.absl_set_min_log_level(3)
        except (ImportError, AttributeError):
            pass


def default_cache_dir() -> str | None:
    configured = os.environ.get("DIFFPG_CACHE_DIR")
    if configured is not None:
        return None if configured.lower() in ("", "off", "none", "0") else configured
    return str(Path.home() / ".cache" / "diffpg" / "jax")


JAX_CACHE_ENTRY_WARNINGS = r"Error (reading|writing) persistent compilation cache entry"
"""The warnings JAX's persistent cache gives for an entry it cannot read or write (it then
compiles, or does not keep the program)."""


def unusable_cache_folder(directory: Path) -> str | None:
    """Why ``directory`` cannot hold a compilation cache (it is a file, a link loop, cannot be
    created...), or ``None`` when it is a folder (writable or not: a read-only cache is read)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "is not a folder"
    except OSError as error:
        return f"cannot be created ({error.strerror or error})"
    if not directory.is_dir():
        return "is not a folder"
    return None


def enable_compilation_cache(directory: str | None = "default", min_compile_secs: float = 0.0):
    """Point JAX's persistent cache at ``directory`` (``"default"``: ``default_cache_dir()``).

    Only compilations slower than ``min_compile_secs`` are stored: by default every one (JAX's
    own default, 1 s, leaves out most of a comparison's programs, which its compile options
    compile in under a second, and a warm ``diffpg compare`` then compiled 118 of its 189
    programs again). Returns the directory used, or ``None`` when caching is off.
    """
    import jax

    if directory == "default":
        directory = default_cache_dir()
    if directory is None:
        return None
    problem = unusable_cache_folder(Path(directory))
    if problem is not None:
        print(f"diffpg: compilation cache {directory!r} {problem}; compiling without it "
              "(set DIFFPG_CACHE_DIR to a folder, or to off)", file=sys.stderr)
        return None
    # A read-only (shared) cache still answers; JAX warns at every entry it cannot write or
    # read, and compiles instead: an accelerator's failure is not the user's business.
    warnings.filterwarnings("ignore", message=JAX_CACHE_ENTRY_WARNINGS)
    _remove_cut_entries(Path(directory))
    _remove_entries_that_fail_to_load()
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory


def _remove_entries_that_fail_to_load() -> None:
    """Make an entry that JAX fails to load (cut short by a full disk or a kill while JAX wrote
    it) be removed when it fails, so that the program compiled instead takes its place: JAX
    never writes over an entry, and compiled that program at every run. JAX reads entries in
    ``jax._src.compilation_cache.get_executable_and_time(cache_key, ...)``, which is wrapped
    (a private function: where a JAX has none, entries stay as JAX leaves them)."""
    from jax._src import compilation_cache as jax_cache

    load = getattr(jax_cache, "get_executable_and_time", None)
    if load is None or getattr(load, "removes_what_fails", False):
        return

    def load_or_remove(cache_key, *args, **kwargs):
        try:
            return load(cache_key, *args, **kwargs)
        except Exception:
            import jax

            try:  # (a read-only cache keeps it)
                (Path(jax.config.jax_compilation_cache_dir) / f"{cache_key}-cache").unlink()
            except (OSError, TypeError):
                pass
            raise

    load_or_remove.removes_what_fails = True
    jax_cache.get_executable_and_time = load_or_remove


def _remove_cut_entries(directory: Path) -> None:
    """Remove the empty entries a full disk left (JAX writes an entry in place: cut short, it
    stays, and JAX, which never writes over an entry, compiled that program at every run).
    An entry cut later is removed when JAX fails to load it (``_remove_entries_that_fail_to_load``)."""
    try:
        for entry in directory.glob("*-cache"):
            if entry.is_file() and entry.stat().st_size == 0:
                entry.unlink()
    except OSError:  # (a read-only or vanishing cache: nothing to do)
        pass
