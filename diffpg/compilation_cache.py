"""JAX's persistent compilation cache, on by default.

Brax physics takes tens of seconds to compile on a CPU; cached executables make the second run of a
command start in seconds. The directory is ``$DIFFPG_CACHE_DIR`` if set, else
``~/.cache/diffpg/jax``; ``DIFFPG_CACHE_DIR=off`` disables it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def default_cache_dir() -> str | None:
    configured = os.environ.get("DIFFPG_CACHE_DIR")
    if configured is not None:
        return None if configured.lower() in ("", "off", "none", "0") else configured
    return str(Path.home() / ".cache" / "diffpg" / "jax")


def enable_compilation_cache(directory: str | None = "default", min_compile_secs: float = 1.0):
    """Point JAX's persistent cache at ``directory`` (``"default"``: ``default_cache_dir()``).

    Only compilations slower than ``min_compile_secs`` are stored. Returns the directory used, or
    ``None`` when caching is off.
    """
    if directory == "default":
        directory = default_cache_dir()
    if directory is None:
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
