"""Where a comparison's time goes: its programs' tracing, XLA compilation and runs, with XLA's
default CPU options and with those ``diffpg compare`` compiles each with (``CPU_COMPILER_OPTIONS``
for the warm-ups, ``CPU_RUN_ONCE_OPTIONS`` for the estimates).

Part 1 builds the programs of the default comparison (every estimator at every horizon of the
sweep: the critics' warm-up where an estimator learns, and the estimates) in this process,
without the persistent cache, and compiles each lowered program twice, once per set of options,
then runs each compiled program once. Part 2 runs the whole ``diffpg compare`` command twice in
fresh processes sharing one empty cache folder: cold, then warm. ``--env``, ``--sweep``,
``--horizon``, ``--num-envs``, ``--num-estimates`` and ``--critic-warmup`` change both parts'
comparison from the default (``diffpg compare``'s options of the same names).

    python experiments/bench_compare_compile.py                       # the default comparison
    python experiments/bench_compare_compile.py --estimators shac reinforce --skip-command
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Part 1 times XLA's compilations, so this process keeps no persistent cache to load them from
# (common's diffpg.setup() reads this; part 2's processes are given a cache folder of their own).
os.environ["DIFFPG_CACHE_DIR"] = "off"
import common  # noqa: E402
import jax  # noqa: E402

from diffpg import estimators  # noqa: E402
from diffpg.compare import make_env_and_policy  # noqa: E402
from diffpg.comparison_settings import CompareSettings, estimator_settings  # noqa: E402
from diffpg.normalization import init_statistics  # noqa: E402
from diffpg.program_cache import CPU_COMPILER_OPTIONS, CPU_RUN_ONCE_OPTIONS  # noqa: E402
from diffpg.sampling import estimates_program, learns, warmup_program  # noqa: E402

DIFFPG_OPTIONS = {"warm-up": CPU_COMPILER_OPTIONS, "estimates": CPU_RUN_ONCE_OPTIONS}
"""The options ``diffpg compare`` compiles each kind of program with."""

COMPARISON_OPTIONS = {"env": str, "sweep": str, "horizon": int, "num_envs": int,
                      "num_estimates": int, "critic_warmup": int}
"""``CompareSettings`` fields this script's options of the same names set (default: not set)."""


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def program_times(jitted, args: tuple, program: str) -> dict:
    """Seconds to trace and lower ``jitted`` for ``args``, then with XLA's default options and
    with those ``diffpg compare`` uses for a ``program`` to compile it and to run it once."""
    lowered, lower_s = timed(jitted.lower, *args)
    row = {"trace_and_lower_s": lower_s}
    for name, options in {"default": None, "diffpg": DIFFPG_OPTIONS[program]}.items():
        compiled, row[f"compile_{name}_s"] = timed(lowered.compile, options)
        _, row[f"run_{name}_s"] = timed(lambda c: jax.block_until_ready(c(*args[:3])), compiled)
    return row


def programs_of_comparison(settings: CompareSettings) -> list[dict]:
    """One row per (estimator, program): the summed times over the sweep's horizons."""
    settings = settings.resolved()
    env, policy, _ = make_env_and_policy(settings, {})
    params = policy.init(jax.random.PRNGKey(0))
    obs_stats = init_statistics(env.observation_size)
    rows: dict[tuple[str, str], dict] = {}
    for point in settings.points:
        starts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), point.num_envs))
        keys = jax.random.split(jax.random.PRNGKey(2), settings.num_estimates)
        for spec in settings.specs:
            estimator = estimators.make(spec.name, env, policy,
                                        **estimator_settings(spec, settings, point.horizon))
            state = estimator.init(jax.random.PRNGKey(3), params)
            programs = [("estimates", estimates_program(estimator, params, obs_stats),
                         (state, starts, keys, settings.num_estimates))]
            if learns(state):
                programs.insert(0, ("warm-up", warmup_program(
                    estimator, params, obs_stats, settings.critic_warmup),
                    (state, starts, jax.random.PRNGKey(4))))
            for program, jitted, args in programs:
                times = program_times(jitted, args, program)
                row = rows.setdefault((spec.label, program),
                                      {"estimator": spec.label, "program": program, "count": 0})
                row["count"] += 1
                for name, value in times.items():
                    row[name] = row.get(name, 0.0) + value
        print(f"T={point.horizon}: {len(settings.specs)} estimators", file=sys.stderr, flush=True)
    return list(rows.values())


def whole_command(cache: str, out: Path, arguments: list[str]) -> dict:
    """``diffpg compare`` in a fresh process: wall-clock and CPU seconds."""
    environment = os.environ | {"DIFFPG_CACHE_DIR": cache,
                                "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffpg.cli", "compare", "--out", str(out),
                    "--overwrite", *arguments], env=environment, check=True,
                   stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.perf_counter() - started,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def comparison_options(arguments) -> dict:
    """The ``COMPARISON_OPTIONS`` given on the command line, as ``CompareSettings`` fields."""
    return {name: getattr(arguments, name) for name in COMPARISON_OPTIONS
            if getattr(arguments, name) is not None}


def main() -> None:
    parser = common.parser("bench_compare_compile", __doc__.split("\n")[0])
    parser.add_argument("--estimators", nargs="*", default=[])
    parser.add_argument("--skip-command", action="store_true",
                        help="only part 1 (the programs), not the whole command cold and warm")
    for name, kind in COMPARISON_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help="the comparison's (default: diffpg compare's)")
    arguments = parser.parse_args()
    out = common.prepare_output(arguments.out, arguments.overwrite)
    options = comparison_options(arguments)
    settings = CompareSettings(estimators=tuple(arguments.estimators), **options)
    rows = programs_of_comparison(settings)
    columns = ["estimator", "program", "count", "trace_and_lower_s", "compile_default_s",
               "compile_diffpg_s", "run_default_s", "run_diffpg_s"]
    total = {"estimator": "all", "program": "all"} | {
        c: sum(row[c] for row in rows) for c in columns[2:]}
    table = common.format_table(rows + [total], columns)
    which = f"the comparison with {options}" if options else "the default comparison"
    print(f"programs of {which}, {jax.devices()[0].platform}, diffpg's options {DIFFPG_OPTIONS}")
    print(table)
    commands = []
    if not arguments.skip_command:
        command_arguments = (["--estimators", *arguments.estimators]
                             if arguments.estimators else [])
        for name, value in options.items():
            command_arguments += ["--" + name.replace("_", "-"), str(value)]
        with tempfile.TemporaryDirectory() as cache:
            for kind in ("cold", "warm"):
                commands.append({"cache": kind} | whole_command(
                    cache, out / f"compare_{kind}", command_arguments))
        print(common.format_table(commands, ["cache", "wall_s", "cpu_s"]))
    common.write_json(out / "results.json", {"options": DIFFPG_OPTIONS, "programs": rows,
                                             "total": total, "command": commands})


if __name__ == "__main__":
    main()
