"""Data parallelism over devices: the environment batch is split along its batch axis.

One mesh axis, ``"batch"``, over the first ``devices`` devices. Arrays of environment states are
placed with their batch axis split over it; everything else is replicated. Under ``jax.jit`` XLA
then runs each device's share of the environments and inserts the all-reduce where the
estimators take their batch mean, so the gradient is averaged over devices.

Several processes (hosts, or processes on one machine): start every process with
``jax.distributed.initialize(coordinator_address, num_processes, process_id)`` before anything
else touches JAX (``diffpg`` does so when the ``DIFFPG_COORDINATOR_ADDRESS``,
``DIFFPG_NUM_PROCESSES`` and ``DIFFPG_PROCESS_ID`` environment variables are set, with gloo for
the collectives between CPU processes); ``jax.devices()`` then lists every process's devices and
``devices`` may count them all. Every process runs the same program on the same inputs; only the
primary one (process 0) writes files other than checkpoints, which orbax writes together.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffpg.envs.core import SettingError


def check_xla_flags(remember_in: str | None) -> None:
    """A one-line ``SettingError`` for an ``XLA_FLAGS`` that XLA refuses.

    XLA reads ``XLA_FLAGS`` when the first computation starts its backend and aborts the
    process on a flag it does not know (a C++ fatal log line, no Python error). A child process
    starts one first and its refusal becomes the error; a value that passed is remembered in
    the folder ``remember_in`` (per value and jaxlib version; ``None``: not remembered), so the
    child (about 2 s) runs once per value.
    """
    flags = os.environ.get("XLA_FLAGS", "").strip()
    if not flags:
        return
    import jaxlib

    digest = hashlib.sha256(f"{jaxlib.__version__}\n{flags}".encode()).hexdigest()[:16]
    marker = None if remember_in is None else Path(remember_in) / f"xla-flags-ok-{digest}"
    if marker is not None and marker.exists():
        return
    started = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                             capture_output=True, text=True, timeout=600,
                             env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
                             | {"TF_CPP_MIN_LOG_LEVEL": "0"})  # its errors; the flags alone
    if started.returncode != 0:
        lines = started.stderr.strip().splitlines()
        # XLA's first logged error says what it refused; then it may print its whole flag list
        logged = [line for line in lines if re.match(r"[EF]\d{4} ", line)]
        named = logged or [line for line in lines if "XLA_FLAGS" in line] or lines[-1:]
        reason = named[0].split("] ", 1)[-1] if named else f"exit status {started.returncode}"
        raise SettingError(f"XLA_FLAGS={flags!r} is refused by XLA ({reason}); correct it or "
                           "unset XLA_FLAGS")
    if marker is not None:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:  # a read-only cache: the check runs again next time
            pass


def check_platforms() -> None:
    """A one-line ``SettingError`` for a ``JAX_PLATFORMS`` that names a platform this machine
    cannot start (``gpu`` where no GPU is): JAX raises at the first computation, mid-command.
    Starts the backend, so it comes after ``initialize_distributed_from_environment``."""
    for variable in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME"):  # (the second: JAX's older name)
        platforms = os.environ.get(variable, "").strip()
        if not platforms:
            continue
        try:
            jax.devices()
        except (RuntimeError, AssertionError, ValueError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise SettingError(f"{variable}={platforms!r} names a platform this machine cannot "
                               f"start ({reason}); unset {variable} or name one it has (cpu)"
                               ) from None


def check_single_precision() -> None:
    """A one-line ``SettingError`` under ``JAX_ENABLE_X64``: diffpg's runs compute in float32
    (its settings are checked in it, its checkpoints hold it); 64-bit mode changed results
    silently, and a run resumed without it continued in mixed precision. So for JAX's keys:
    another generator (``JAX_DEFAULT_PRNG_IMPL``) or splitting (``JAX_THREEFRY_PARTITIONABLE``)
    draws other numbers from the same seed, and a run resumed under it continued another run."""
    if jax.config.jax_enable_x64:
        raise SettingError("JAX_ENABLE_X64 is set, but diffpg's commands compute in float32 "
                           "(their checks, checkpoints and programs assume it); unset "
                           "JAX_ENABLE_X64")
    for variable, value, expected in (
            ("JAX_DEFAULT_PRNG_IMPL", getattr(jax.config, "jax_default_prng_impl",
                                              "threefry2x32"), "threefry2x32"),
            ("JAX_THREEFRY_PARTITIONABLE",  # (a JAX without the option splits as its default)
             getattr(jax.config, "jax_threefry_partitionable", True), True)):
        if value != expected:
            raise SettingError(f"{variable} sets {value!r}, but diffpg's seeds, checkpoints and "
                               f"results are drawn with {expected!r}; unset {variable}")


def check_devices(devices: Any, num_envs: int) -> None:
    """``devices`` must be a positive integer, available, and split ``num_envs`` evenly."""
    check_device_split(devices, num_envs)
    check_devices_available(devices)


def check_device_split(devices: Any, num_envs: int) -> None:
    """``devices`` must be a positive integer that splits ``num_envs`` evenly (what a run's
    settings must hold on any machine; whether this one has the devices is
    ``check_devices_available``)."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise SettingError(f"devices={devices!r} must be a positive integer")
    if devices > 1 and num_envs % devices:
        raise SettingError(f"num_envs={num_envs} does not split over devices={devices}; allowed: "
                           f"a multiple of {devices}")


def check_devices_available(devices: int) -> None:
    """This machine (all processes together) must have ``devices`` devices."""
    available = 1 if devices == 1 else jax.device_count()
    if devices > available:
        raise SettingError(f"devices={devices} but only {available} are available; allowed: "
                           f"1..{available} (--devices N; a resumed run reads its own from its "
                           "settings.json unless given)")


def batch_mesh(devices: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:devices]), ("batch",))


def batch_sharding(devices: int, leading_axes: int = 0) -> NamedSharding:
    """Split axis ``leading_axes`` (the batch axis) over ``devices``; earlier axes replicated."""
    return NamedSharding(batch_mesh(devices), PartitionSpec(*(None,) * leading_axes, "batch"))


def replicated(devices: int) -> NamedSharding:
    return NamedSharding(batch_mesh(devices), PartitionSpec())


def shard_batch(tree: Any, devices: int) -> Any:
    """Place every leaf of ``tree`` (leading axis: the batch) split over ``devices``; every
    process holds the whole ``tree`` and contributes the shards of its own devices."""
    if devices == 1:
        return tree
    sharding = batch_sharding(devices)

    def place(leaf):
        values = np.asarray(leaf)
        return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])

    return jax.tree.map(place, tree)


def process_count() -> int:
    """Processes running this program together (1 without ``jax.distributed``)."""
    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; the only one without
    ``jax.distributed``)."""
    return jax.process_index() == 0


BARRIER_TIMEOUT_S = 1800  # how long a process waits for the others at a barrier
_barriers_reached = itertools.count()


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (nothing to wait for in one process).

    The processes first meet at the coordination service's barrier, which waits up to
    ``BARRIER_TIMEOUT_S``, then run a collective over every device. The collectives between
    CPU processes (Gloo) give up when a process is 30 s late the first time they connect, which a
    loaded machine exceeds (one process still importing or compiling); after the first barrier
    they connect with every process already there."""
    if jax.process_count() > 1:
        from jax._src import distributed  # its client: the one JAX's own checkpointing waits on
        from jax.experimental import multihost_utils

        client = getattr(distributed.global_state, "client", None)
        if client is not None:
            client.wait_at_barrier(f"{name} #{next(_barriers_reached)}",
                                   timeout_in_ms=BARRIER_TIMEOUT_S * 1000)
        multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
    """Every leaf as a NumPy array in every process (arrays split over processes are gathered)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def initialize_distributed_from_environment() -> None:
    """``jax.distributed.initialize`` from ``DIFFPG_COORDINATOR_ADDRESS`` (host:port),
    ``DIFFPG_NUM_PROCESSES`` and ``DIFFPG_PROCESS_ID``, when the first is set."""
    import os

    address = os.environ.get("DIFFPG_COORDINATOR_ADDRESS")
    if not address:
        return
    try:
        processes = int(os.environ["DIFFPG_NUM_PROCESSES"])
        process_id = int(os.environ["DIFFPG_PROCESS_ID"])
    except (KeyError, ValueError) as error:
        raise SettingError("DIFFPG_COORDINATOR_ADDRESS is set: DIFFPG_NUM_PROCESSES and "
                           "DIFFPG_PROCESS_ID must be integers too") from error
    if not 0 <= process_id < processes:
        raise SettingError(f"DIFFPG_PROCESS_ID={process_id} must be in 0..{processes - 1} "
                           f"(DIFFPG_NUM_PROCESSES={processes})")
    if process_id != 0:
        _wait_for_coordinator(address)
    # CPU processes need a collectives library to all-reduce between them (GPUs bring NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=processes, process_id=process_id)


COORDINATOR_WAIT_S = 300
"""How long a process other than 0 waits for process 0's coordinator to answer (JAX's own
wait, in C++, ignores SIGINT and SIGTERM and ends in a C++ abort)."""


def _wait_for_coordinator(address: str, wait_s: float = COORDINATOR_WAIT_S) -> None:
    """Return once ``address`` (host:port) accepts a connection; a one-line ``SettingError``
    after ``wait_s`` seconds. Polled from Python, so a signal stops the wait."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SettingError(f"DIFFPG_COORDINATOR_ADDRESS={address!r} must be host:port")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SettingError(f"DIFFPG_COORDINATOR_ADDRESS={address!r}: nothing answered "
                                   f"there within {wait_s:g} s; start process 0 (it serves the "
                                   "address) or correct the address") from None
            time.sleep(0.5)


def environment_description() -> dict:
    """What produced a result, recorded beside it (a run's settings.json, a comparison's
    results.json): package versions, Python, the device and platform, and the git commit of
    diffpg's source when it is a git checkout (``None`` otherwise)."""
    import platform
    import subprocess
    from importlib.metadata import version

    import diffpg

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(diffpg.__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "diffpg": diffpg.__version__, "commit": commit or None, "jax": jax.__version__,
        "brax": version("brax"), "flax": version("flax"), "optax": version("optax"),
        "python": platform.python_version(), "device": str(jax.devices()[0]),
        "device_count": jax.device_count(), "platform": jax.default_backend(),
    }


def available_memory_bytes() -> int | None:
    """Memory the first device can still take: the accelerator's own limit, or for the CPU the
    host's available memory (``/proc/meminfo``) within what the process's address-space limit
    leaves; ``None`` where neither can be read."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        available = next(int(line.split()[1]) * 1024
                         for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    check_address_space()  # (what the process maps has grown since the command started)
    return min(available, _address_space_left())


ADDRESS_SPACE_ROOM = 3 * 2**28
"""Address space (0.75 GiB) a command maps beyond its arrays: the compiler's arenas and the
stacks of XLA's, TensorStore's and orbax's threads. A two-update pendulum run under ``ulimit
-v`` failed to start a thread (an abort, or a traceback from its checkpoint) with 0.61 GiB left
after JAX started, and ran with 1.08 GiB."""


def check_address_space() -> None:
    """A one-line ``SettingError`` where the address-space limit (``ulimit -v``) leaves less
    than ``ADDRESS_SPACE_ROOM`` beyond what the process maps once JAX has started: such a run
    aborts when a thread cannot start, after its work."""
    import resource

    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit != resource.RLIM_INFINITY and _address_space_left() <= 0:
        raise SettingError(f"the address-space limit (ulimit -v) of {limit / 2**30:.2f} GiB "
                           f"leaves less than the {ADDRESS_SPACE_ROOM / 2**30:.2f} GiB a command "
                           "needs beyond what JAX maps at its start (its compiler and threads); "
                           "raise the limit (ulimit -v)")


def _address_space_left() -> int:
    """What the process's address-space limit (``ulimit -v``) leaves its arrays beyond what it
    maps now and ``ADDRESS_SPACE_ROOM`` (unlimited: a huge number). XLA waits forever on an
    allocation this limit refuses."""
    import resource

    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY:
        return 2**62
    try:
        mapped = next(int(line.split()[1]) * 1024
                      for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        mapped = 0
    return max(limit - mapped - ADDRESS_SPACE_ROOM, 0)


def state_bytes(env) -> int:
    """Bytes of one environment's state (``env.reset``'s pytree), from its shapes: nothing is
    compiled or run."""
    state = jax.eval_shape(lambda: env.reset(jax.random.PRNGKey(0)))
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
