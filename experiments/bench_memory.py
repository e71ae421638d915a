"""Memory of one BPTT gradient against the horizon, with and without rematerialisation.

For each horizon ``T`` the full-horizon BPTT gradient (``bptt`` estimator) of ``B`` envs is
compiled with ``remat_segment=0`` (reverse mode keeps every step's intermediates) and with
``remat_segment=S`` (``jax.checkpoint`` over segments of ``S`` steps: it keeps the segment
boundaries and recomputes one segment at a time). XLA's own buffer assignment reports the memory
the compiled gradient needs (``memory_analysis()``: temporaries + arguments + outputs), without
running it; ``--run`` also runs each configuration once, in its own process, and reports that
process's peak resident memory. Target (issue 5): horizon 1000 fits in 24 GiB on CPU.

    python experiments/bench_memory.py                      # ant, 64 envs, T = 32, 128, 1024
    python experiments/bench_memory.py --horizons 32 64 128 256 512 1024 --run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import jax
from diffpg import envs
from diffpg import estimators
from diffpg.normalization import init_statistics
from diffpg.policy import make_gaussian_mlp_policy

env_name, num_envs, horizon, segment, execute = sys.argv[1:6]
num_envs, horizon, segment, execute = int(num_envs), int(horizon), int(segment), execute == "1"
env = envs.make(env_name, episode_length=max(horizon, 1000))
policy = make_gaussian_mlp_policy(env.observation_size, env.action_size)
params = policy.init(jax.random.PRNGKey(0))
starts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), num_envs))
estimator = estimators.make("bptt", env, policy, horizon=horizon, remat_segment=segment)
state = estimator.init(jax.random.PRNGKey(2), params)
stats = init_statistics(env.observation_size)
gradient = jax.jit(lambda p, s, k: estimator.estimate(p, stats, state, s, k).grad)
started = time.perf_counter()
compiled = gradient.lower(params, starts, jax.random.PRNGKey(3)).compile()
compile_s = time.perf_counter() - started
analysis = compiled.memory_analysis()
result = {"xla_gib": (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
                      + analysis.output_size_in_bytes) / 2**30, "compile_s": compile_s}
if execute:
    started = time.perf_counter()
    jax.block_until_ready(compiled(params, starts, jax.random.PRNGKey(3)))
    result["run_s"] = time.perf_counter() - started
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT" + json.dumps(result))
"""


def measure(env: str, num_envs: int, horizon: int, segment: int, execute: bool) -> dict:
    environment = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3",
                                "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, env, str(num_envs), str(horizon), str(segment),
         "1" if execute else "0"], env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.split("RESULT")[-1])


def main() -> None:
    parser = common.parser("bench_memory", __doc__.split("\n")[0])
    parser.add_argument("--env", default="ant")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--horizons", type=int, nargs="+", default=[32, 128, 1024])
    parser.add_argument("--segment", type=int, default=32,
                        help="remat segment length (must divide every horizon)")
    parser.add_argument("--run", action="store_true", help="also run each gradient once")
    arguments = parser.parse_args()
    out = common.prepare_output(arguments.out, arguments.overwrite)
    rows = []
    started = time.perf_counter()
    for horizon in arguments.horizons:
        for segment in (0, arguments.segment):
            if segment and horizon % segment:
                continue
            result = measure(arguments.env, arguments.num_envs, horizon, segment, arguments.run)
            rows.append({"horizon": horizon, "remat_segment": segment} | result)
            print(rows[-1], flush=True)
    columns = ["horizon", "remat_segment", "xla_gib", "compile_s"]
    if arguments.run:
        columns += ["peak_rss_gib", "run_s"]
    if any("error" in row for row in rows):
        columns.append("error")
    header = (f"one BPTT gradient, {arguments.env}, {arguments.num_envs} envs "
              f"({time.perf_counter() - started:.0f} s in all)")
    table = common.format_table(rows, columns)
    print(header)
    print(table)
    common.write_json(out / "results.json", {"env": arguments.env,
                                             "num_envs": arguments.num_envs, "rows": rows})
    (out / "report.md").write_text(f"# Memory against horizon\n\n{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
