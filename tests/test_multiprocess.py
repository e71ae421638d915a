"""Several processes (``DIFFPG_COORDINATOR_ADDRESS`` / ``DIFFPG_NUM_PROCESSES`` /
``DIFFPG_PROCESS_ID``): two processes on 127.0.0.1, one CPU device each, run ``diffpg train`` and
``diffpg compare`` over both devices and give the results of one process with two devices."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_COMPILE_XLA_FLAGS

TRAIN = ["train", "--env", "pendulum", "--updates", "4", "--updates-per-call", "2",
         "--num-envs", "8", "--eval-envs", "2", "--hidden-sizes", "16", "--devices", "2",
         "shac", "--horizon", "8"]
COMPARE = ["compare", "--env", "pendulum", "--estimators", "bptt", "shac", "--sweep", "none",
           "--horizon", "4", "--num-estimates", "4", "--num-envs", "4",
           "--reference-estimates", "8", "--critic-warmup", "5", "--hidden-sizes", "16",
           "--devices", "2"]
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(forced_devices: int | None = None, **extra: str) -> dict:
    """This process's environment without a coordinator, with the tests' compile flags, if
    given ``forced_devices`` host devices, and ``extra``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DIFFPG_COORDINATOR")}
    flags = FAST_COMPILE_XLA_FLAGS + (f" --xla_force_host_platform_device_count={forced_devices}"
                                      if forced_devices else "")
    return environment | {"PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "3",
                          "XLA_FLAGS": flags} | extra


def _one_process(arguments: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "diffpg.cli", *arguments], capture_output=True,
                          text=True, timeout=TIMEOUT, env=_environment(forced_devices=2))
    assert done.returncode == 0, done.stderr[-3000:]


def _two_processes(arguments: list[str], program: tuple[str, ...] = ("-m", "diffpg.cli")) -> None:
    """Run ``program arguments`` as processes 0 and 1 of one run; when one fails, the other is
    stopped (it would wait for its partner until TIMEOUT) and both their errors are reported."""
    port = _free_port()
    logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    processes = [subprocess.Popen(
        [sys.executable, *program, *arguments], stdout=subprocess.DEVNULL, stderr=log, text=True,
        env=_environment(DIFFPG_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                         DIFFPG_NUM_PROCESSES="2", DIFFPG_PROCESS_ID=str(index)))
        for index, log in enumerate(logs)]
    deadline = time.monotonic() + TIMEOUT
    try:
        while (any(p.poll() is None for p in processes) and time.monotonic() < deadline
               and not any(p.poll() for p in processes)):
            time.sleep(0.2)
        time.sleep(1 if any(p.poll() for p in processes) else 0)  # the partner's own error
    finally:
        for process in processes:  # never leave a process behind, whatever happened
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = []
    for index, (process, log) in enumerate(zip(processes, logs, strict=True)):
        log.seek(0)
        if process.returncode != 0:
            failed.append(f"process {index} (exit {process.returncode}):\n{log.read()[-3000:]}")
        log.close()
    assert not failed, "\n".join(failed)  # every failing process's end: the first cause is there


def _metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_two_processes_train_and_compare_like_one_process_with_two_devices(tmp_path):
    _one_process([*TRAIN[:1], "--out", str(tmp_path / "one"), *TRAIN[1:]])
    _two_processes([*TRAIN[:1], "--out", str(tmp_path / "two"), *TRAIN[1:]])
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [row["update"] for row in two] == ["2", "4"]
    for name in ("eval/episode_reward", "training/grad_norm", "training/critic_loss"):
        np.testing.assert_allclose([float(r[name]) for r in two], [float(r[name]) for r in one],
                                   rtol=1e-4, err_msg=name)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()
                  if not p.name.endswith(".sha256")) == ["2", "4"]

    _one_process([*COMPARE, "--out", str(tmp_path / "compare-one")])
    _two_processes([*COMPARE, "--out", str(tmp_path / "compare-two")])
    tables = [json.loads((tmp_path / f"compare-{n}" / "results.json").read_text())
              ["results"][0]["estimators"] for n in ("one", "two")]
    for name in ("bptt", "shac"):
        np.testing.assert_allclose(tables[1][name]["mean_norm"], tables[0][name]["mean_norm"],
                                   rtol=1e-4)
        np.testing.assert_allclose(tables[1][name]["variance_trace"],
                                   tables[0][name]["variance_trace"], rtol=1e-3)


LATE_PROCESS = """
import time
import jax
from diffpg import devices
devices.initialize_distributed_from_environment()
if jax.process_index() == 1:
    time.sleep(40)  # later than the 30 s the CPU collectives wait for a process to connect
devices.barrier("one process late")
devices.barrier("both on time")
"""


@pytest.mark.slow
def test_a_process_late_by_more_than_the_collectives_timeout_still_meets_the_others():
    _two_processes([], program=("-c", LATE_PROCESS))
