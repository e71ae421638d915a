"""Compiled programs kept across processes, under a key naming everything that shapes them.

JAX's persistent compilation cache (``diffpg.compilation_cache``) skips XLA's compile in a new
process, but not the Python tracing and the lowering to StableHLO that come before it, which JAX
redoes in every process: for a comparison's 75 programs, about 28 s on 2 cores, half of a warm
``diffpg compare``. This cache keeps the compiled executable itself
(``jax.experimental.serialize_executable``) and loads it without tracing anything.

It cannot check a loaded program against the code, so the key must name everything the program
depends on. ``program_key(description)`` hashes the caller's ``description`` (the settings, sizes
and which program: what the caller knows shapes it) with what no caller can vouch for: the source
of every module of the ``diffpg`` and ``diffpg.envs`` packages, the versions of jax, jaxlib, flax, optax
and brax, the devices, and the settings that change how JAX traces or XLA compiles
(``XLA_FLAGS``, x64, the default matmul precision). The caller adds the shapes of the program's
inputs (``avals_fingerprint``), the values of the arrays it closes over (``array_fingerprint``) and the
source of code from outside the packages it runs (``module_fingerprint``, e.g. an estimator
registered from a user's file).

Files live in ``<compilation cache>/programs/<key>.bin`` (no cache folder: nothing is kept); the
least recently used are removed once the folder exceeds ``MAX_BYTES``. Only programs this process
compiled are kept: an executable JAX's persistent cache loaded serializes without some of its
kernels on XLA:CPU (``module_name`` keeps the two caches apart). A file that cannot be read or
loaded, or that holds another key's program (renamed or swapped: each file records its key), is
removed and the program compiled again; a program that cannot be serialized is not
kept; while a source file is newer than the process, nothing is. The files are pickles, to be
trusted as the user's own ``__pycache__`` is: the folder should be writable by its user alone.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import pickle
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import jax
import numpy as np

from diffpg.folders import read_regular_file

MAX_BYTES = 2 * 2**30
"""The programs folder's size beyond which the least recently used files are removed."""

_PACKAGES = ("diffpg", "diffpg.envs")
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "brax")


def programs_dir() -> Path | None:
    """``<JAX's compilation cache folder>/programs``, or ``None`` when that cache is off."""
    directory = jax.config.jax_compilation_cache_dir
    return Path(directory) / "programs" if directory else None


_IMPORTED_AT = time.time()
"""When this process imported this module (about when it imported the packages' code)."""


def _package_sources_digest() -> str | None:
    """A digest of every source file of the packages; ``None`` when one changed after this
    process started (the code it runs may then not be the code on disk)."""
    files = []
    for package in _PACKAGES:
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            stat = path.stat()
            if stat.st_mtime > _IMPORTED_AT:
                return None
            files.append((str(path), str(path.relative_to(root)), stat.st_mtime_ns, stat.st_size))
    return _digest_of(tuple(files))


@functools.lru_cache(maxsize=4)
def _digest_of(files: tuple[tuple[str, str, int, int], ...]) -> str:
    """The digest of ``files`` (path, name, modification time, size), read once per version."""
    digest = hashlib.sha256()
    for path, name, _, _ in files:
        digest.update(name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


@functools.cache
def _installed_versions() -> dict[str, str | None]:
    """The versions of the libraries a program's code comes from (read once per process)."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def module_fingerprint(module_name: str) -> str | None:
    """A digest of the source file of module ``module_name`` (e.g. an estimator registered from
    outside the packages, whose code a program runs); ``None`` when it has none to read (a
    notebook's ``__main__``): such code cannot be keyed, and its programs are not kept."""
    path = getattr(sys.modules.get(module_name), "__file__", None)
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    except OSError:
        return None


def array_fingerprint(tree: Any) -> str:
    """A digest of ``tree``'s structure and of its arrays' dtypes, shapes and values (for the
    arrays a program closes over, e.g. the policy's parameters)."""
    digest = hashlib.sha256(str(jax.tree.structure(tree)).encode())
    for leaf in jax.tree.leaves(tree):
        array = np.asarray(leaf)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def avals_fingerprint(args: Any) -> str:
    """A digest of the shapes, dtypes and shardings of ``args`` (a program's inputs)."""
    return hashlib.sha256(str([(jax.typeof(leaf), getattr(leaf, "sharding", None))
                               for leaf in jax.tree.leaves(args)]
                              + [jax.tree.structure(args)]).encode()).hexdigest()


def program_key(description: dict) -> str | None:
    """The cache key (hex) of a program described by ``description`` (JSON-able: what the caller
    knows shapes the program), this process's code, library versions, devices and JAX settings;
    ``None`` (keep nothing) when a source file changed since the process started, or in a run of
    several processes (``jax.distributed``: their programs share collectives, and one process
    loading what another compiled broke them)."""
    if jax.process_count() > 1:
        return None
    sources = _package_sources_digest()
    if sources is None:
        return None
    everything = {
        "description": description,
        "sources": sources,
        "versions": _installed_versions(),
        "devices": [str(d.device_kind) for d in jax.devices()],
        "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }
    text = json.dumps(everything, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def module_name(base: str, description: dict | None) -> str:
    """``base`` with ``program_key(description)``'s first digits: the name of a program's jitted
    function, and so of its compiled module, which JAX's persistent cache keys on. A program to
    keep is then one JAX's cache has not seen, and is compiled here: an executable that cache
    loaded serializes incompletely (below). ``base`` alone without a description or key."""
    key = program_key(description) if description is not None else None
    return base if key is None else f"{base}_{key[:16]}"


def _load_or_prepare(key: str | None, prepare: Callable[[], Callable[[], Any]]
                     ) -> Callable[[], Any]:
    """``finish() -> compiled``: the program stored under ``key`` (loaded now), or the
    ``finish`` that ``prepare()`` returns (called now: what comes before compiling), whose
    compiled program is then stored.

    ``key=None`` or no cache folder: ``prepare()``'s ``finish`` alone. Anything that goes wrong
    reading or writing the cache (a damaged file, a program XLA cannot serialize, a full disk)
    falls back to compiling; it never changes what the program computes.
    """
    directory = programs_dir() if key is not None else None
    if directory is None:
        return prepare()
    path = directory / f"{key}.bin"
    loaded = _load(path)
    if loaded is not None:
        return lambda: loaded
    compile_prepared = prepare()

    def finish() -> Any:
        _listen_for_cache_hits()
        hits_before = getattr(_jax_cache_hits, "count", 0)
        compiled = compile_prepared()
        if getattr(_jax_cache_hits, "count", 0) == hits_before:
            _store(path, compiled)
        return compiled

    return finish


_jax_cache_hits = threading.local()
"""Per thread, how many compiles JAX's persistent cache answered. An executable it loaded
serializes incompletely on XLA:CPU (the copy lacks some of its kernels: "Function ... not found"
when it runs), so only a program this process compiled itself is kept. ``module_name`` makes the
programs to keep new to JAX's cache; one it answers all the same (its file here was removed while
JAX's entry stayed) is traced and loaded from there, as without this cache."""


@functools.cache
def _listen_for_cache_hits() -> None:
    def count(event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            _jax_cache_hits.count = getattr(_jax_cache_hits, "count", 0) + 1

    jax.monitoring.register_event_listener(count)


def _load(path: Path) -> Any | None:
    from jax.experimental import serialize_executable

    try:
        stored_key, payload, in_tree, out_tree = pickle.loads(read_regular_file(path))
        if stored_key != path.stem:  # a file renamed, swapped or copied: another program
            raise ValueError(f"{path.name} holds the program of key {stored_key}")
        compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - damaged, unreadable or from another build: compile again
        with contextlib.suppress(OSError):  # a read-only (shared) cache keeps it
            path.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):  # recently used; a read-only cache cannot say so
        os.utime(path)
    return compiled


def _store(path: Path, compiled: Any) -> None:
    from jax.experimental import serialize_executable

    temporary = None
    try:
        blob = pickle.dumps((path.stem, *serialize_executable.serialize(compiled)))
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as file:
            temporary = Path(file.name)
            file.write(blob)
        os.replace(temporary, path)  # whole or absent, also for a process reading it now
    except Exception:  # noqa: BLE001 - not serializable here, or no room: just not kept
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        return
    _remove_least_recently_used(path.parent, MAX_BYTES)


def _remove_least_recently_used(directory: Path, max_bytes: int) -> None:
    files = []
    for path in directory.glob("*.bin"):
        try:
            stat = path.stat()
        except OSError:  # gone meanwhile, or a link to nowhere
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        total -= size


CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1,
                        "xla_cpu_parallel_codegen_split_count": 1}
"""XLA:CPU options a comparison's loops compile with (the critics' warm-up, run for hundreds of
rounds): XLA's loop emitters for fusions, LLVM's ``-O1``, and one LLVM module per program. A
comparison compiles some 75 programs and runs each once, so compiling is most of its time on a
CPU; these options halve it (BENCHMARKS.md section 4). A jaxlib that no longer knows them
compiles with its defaults."""


CPU_RUN_ONCE_OPTIONS = CPU_COMPILER_OPTIONS | {"xla_backend_optimization_level": 0}
"""XLA:CPU options for a program that runs once in a few milliseconds (the estimates): LLVM
without optimisation, which compiles in less than half the CPU time and runs a few times
slower (BENCHMARKS.md section 4)."""


def compile_program(jitted, *args, description: dict | None = None,
                    cpu_options: dict = CPU_COMPILER_OPTIONS):
    """``jitted`` lowered for ``args`` and compiled (with ``cpu_options`` on a CPU).

    ``description``: everything besides ``args``' shapes that shapes the program (JSON-able);
    given, the compiled program is kept across processes under it (``program_key``).
    """
    return prepare_program(jitted, *args, description=description, cpu_options=cpu_options)()


def prepare_program(jitted, *args, description: dict | None = None,
                    cpu_options: dict = CPU_COMPILER_OPTIONS) -> Callable[[], Any]:
    """``compile_program`` in two steps: what comes before compiling, now (the program loaded
    from the cache, or traced and lowered for ``args``, arrays or ``jax.ShapeDtypeStruct``s: a
    setting refused where the program is traced is raised here), and ``finish() -> compiled``,
    which compiles what was lowered (and keeps it, as ``compile_program`` does)."""
    options = cpu_options if jax.default_backend() == "cpu" else {}
    key = None
    if description is not None:
        key = program_key(description | {
            "args": avals_fingerprint(args), "compiler_options": options})

    def lower() -> Callable[[], Any]:
        lowered = jitted.lower(*args)
        return lambda: _compile_lowered(lowered, options)

    return _load_or_prepare(key, lower)


def _compile_lowered(lowered, options: dict):
    if options:
        try:
            return lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as error:
            if "compile option" not in str(error):
                raise
    return lowered.compile()
