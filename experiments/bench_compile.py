"""Compile time of one training update, cold and with the persistent compilation cache warm.

Two fresh processes share one empty cache folder: the first compiles from nothing (cold), the
second finds the executable in the cache (warm). Each reports the stages of its first training
call: Python tracing, lowering, XLA compilation (or loading from the cache) and the run; the
compile cost is the sum of the first three. Targets (issue 5): cold <= 60 s, warm <= 10 s, on CPU for Ant.

    python experiments/bench_compile.py                 # ant, 64 envs, horizon 32, its AHAC
    python experiments/bench_compile.py --estimator shac  # the same with SHAC
    python experiments/bench_compile.py --gpu           # ant, 2048 envs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from diffpg.configs import default_estimator  # noqa: E402

CHILD = r"""
import json, sys, time
started = time.perf_counter()
import diffpg
diffpg.setup()  # the persistent compilation cache in $DIFFPG_CACHE_DIR, as the commands
import jax
from diffpg.training import make_trainer, settings_for
imported = time.perf_counter() - started
env, estimator, num_envs, horizon = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
settings = settings_for(env=env, estimator=estimator, num_envs=num_envs, horizon=horizon,
                        updates=10, updates_per_call=1, eval_envs=1)
started = time.perf_counter()
trainer = make_trainer(settings)
state = jax.block_until_ready(trainer.init_run())
built = time.perf_counter() - started
# The stages of a first call, one by one (ahead-of-time API): Python tracing, lowering to
# StableHLO, then XLA compilation or, with the cache warm, loading the cached executable.
started = time.perf_counter()
traced = trainer.run_updates.trace(state)
trace_s = time.perf_counter() - started
started = time.perf_counter()
lowered = traced.lower()
lower_s = time.perf_counter() - started
started = time.perf_counter()
compiled = lowered.compile()
compile_s = time.perf_counter() - started
started = time.perf_counter()
state, _ = jax.block_until_ready(compiled(state))
run_s = time.perf_counter() - started
print("RESULT" + json.dumps({"import_s": imported, "build_and_init_s": built,
                             "trace_s": trace_s, "lower_s": lower_s,
                             "xla_compile_or_load_s": compile_s, "run_s": run_s,
                             "platform": jax.devices()[0].platform}))
"""


def child(env: str, estimator: str, num_envs: int, horizon: int, cache: str) -> dict:
    environment = os.environ | {"DIFFPG_CACHE_DIR": cache, "TF_CPP_MIN_LOG_LEVEL": "3",
                                "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CHILD, env, estimator, str(num_envs),
                           str(horizon)],
                          env=environment, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.split("RESULT")[-1])


def main() -> None:
    parser = common.parser("bench_compile", __doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="GPU size: 2048 envs")
    parser.add_argument("--env", default="ant")
    parser.add_argument("--num-envs", type=int, default=None)
    parser.add_argument("--horizon", type=int, default=32)
    parser.add_argument("--estimator", default=None,
                        help="default: the env's configured one (diffpg.configs)")
    arguments = parser.parse_args()
    estimator = arguments.estimator or default_estimator(arguments.env)
    num_envs = arguments.num_envs or (2048 if arguments.gpu else 64)
    out = common.prepare_output(arguments.out, arguments.overwrite)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for kind in ("cold", "warm"):
            result = child(arguments.env, estimator, num_envs, arguments.horizon, cache)
            result["compile_s"] = (result["trace_s"] + result["lower_s"]
                                   + result["xla_compile_or_load_s"])
            rows.append({"cache": kind} | result)
    columns = ["cache", "compile_s", "trace_s", "lower_s", "xla_compile_or_load_s", "run_s",
               "build_and_init_s", "import_s"]
    header = (f"one {estimator} update, {arguments.env}, {num_envs} envs x {arguments.horizon} steps, "
              f"{rows[0]['platform']}")
    table = common.format_table(rows, columns)
    targets = {"cold_compile_s (target <= 60)": rows[0]["compile_s"],
               "warm_compile_s (target <= 10)": rows[1]["compile_s"]}
    print(header)
    print(table)
    for name, value in targets.items():
        print(f"{name}: {value:.1f}")
    common.write_json(out / "results.json", {"env": arguments.env, "estimator": estimator,
                                             "num_envs": num_envs,
                                             "horizon": arguments.horizon, "rows": rows,
                                             "targets": targets})
    (out / "report.md").write_text(f"# Compile time\n\n{header}\n\n{table}\n\n" + "\n".join(
        f"- {k}: {v:.1f}" for k, v in targets.items()) + "\n")


if __name__ == "__main__":
    main()
