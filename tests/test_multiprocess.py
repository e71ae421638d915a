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


def _two_processes(arguments: list[str]) -> None:
    port = _free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-m", "diffpg.cli", *arguments], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=_environment(DIFFPG_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                         DIFFPG_NUM_PROCESSES="2", DIFFPG_PROCESS_ID=str(index)))
        for index in range(2)]
    try:
        outputs = [process.communicate(timeout=TIMEOUT) for process in processes]
    finally:
        for process in processes:  # never leave a process behind, whatever happened
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]


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
