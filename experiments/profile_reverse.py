"""Where a gradient through the physics goes: the reverse pass against the forward, from the
compiled programs.

For one env, ``--num-envs`` B and ``--horizon`` T, in one process (CPU seconds of the best of
``--repeats`` calls, after a compiling call; ``time.process_time``, so another job on the
machine moves the numbers less than wall-clock):

* **rollout**: the forward ``unroll`` of T steps with the policy's sampled actions, and the
  BPTT gradient of its mean return, plain and rematerialised every ``S`` steps
  (``remat_segment``: the reverse pass recomputes the forward instead of reading saved
  residuals; ``S = 1``: every step);
* **one step**: one batched physics step, forward and its reverse (the gradient of a scalar of
  the next state w.r.t. the state and the action), and the operations of each compiled program
  by kind (XLA's optimised HLO: fusions, copies, transposes, gathers, scatters, loops...), so
  that what the reverse pass adds is named from the program, not guessed, with XLA's cost
  analysis of each (millions of flops and of bytes its operations read and write).

* **levers** (``--levers``): the BPTT gradient compiled with each of ``LEVERS`` in the same
  process (an XLA:CPU option of that one program, or a change of how it is traced), its wall
  and CPU seconds against today's program and its gradient against today's (the largest
  difference, relative to the largest entry).

Prints two tables (three with ``--levers``) and writes ``results.json``::

    python experiments/profile_reverse.py --env hopper
    python experiments/profile_reverse.py --env ant --out runs/profile_reverse_ant
    python experiments/profile_reverse.py --env hopper --segments 0 --levers
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import sys
import time
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from diffpg import envs  # noqa: E402
from diffpg.acting import unroll  # noqa: E402
from diffpg.normalization import init_statistics  # noqa: E402
from diffpg.policy import make_gaussian_mlp_policy  # noqa: E402

OPERATION = re.compile(r"= \S+ ([a-z][\w-]*)\(")
"""An instruction's opcode in XLA's HLO text."""

FREE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}
"""Opcodes that move no data (left out of the counts)."""


LEVERS = {
    "copy insertion with region analysis": {"xla_cpu_copy_insertion_use_region_analysis": True},
    "XLA's loop emitters, not its fusion emitters": {"xla_cpu_use_fusion_emitters": False},
    "no Eigen thread pool inside operations": {"xla_cpu_multi_thread_eigen": False},
    "the concurrency-optimised scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
    "512-bit vectors preferred": {"xla_cpu_prefer_vector_width": 512},
    "LLVM -O3": {"xla_backend_optimization_level": 3},
    "every scan's transpose split in two (lax.scan _split_transpose)": "split_transpose",
}
"""Changes of the BPTT gradient's program measured by ``--levers``: XLA:CPU options of that one
program, or ``"split_transpose"``: every ``lax.scan`` traced with ``_split_transpose=True``
(JAX's experimental split of a scan's reverse into a scan of the carries' cotangents and a map
of the rest)."""


@contextlib.contextmanager
def scans_traced_with_split_transpose():
    """Every ``jax.lax.scan`` traced inside the block (diffpg's and Brax's) splits its
    transpose."""
    plain = jax.lax.scan
    jax.lax.scan = functools.partial(plain, _split_transpose=True)
    try:
        yield
    finally:
        jax.lax.scan = plain


def best_seconds(function, *args, repeats: int) -> tuple[float, float]:
    """(best CPU seconds, best wall-clock seconds) of ``repeats`` calls."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        wall_started, cpu_started = time.perf_counter(), time.process_time()
        jax.block_until_ready(function(*args))
        cpu = min(cpu, time.process_time() - cpu_started)
        wall = min(wall, time.perf_counter() - wall_started)
    return cpu, wall


def cpu_seconds(function, *args, repeats: int) -> tuple[float, float]:
    """(wall-clock of the compiling call, best CPU seconds of ``repeats`` later calls)."""
    started = time.perf_counter()
    jax.block_until_ready(function(*args))
    compiling = time.perf_counter() - started
    return compiling, best_seconds(function, *args, repeats=repeats)[0]


def operations(function, *args) -> tuple[collections.Counter, dict]:
    """The compiled program's instructions by opcode (those that move data), and XLA's cost
    analysis of it: ``flops`` and ``bytes accessed`` (every operation's operands and results)."""
    compiled = jax.jit(function).lower(*args).compile()
    counts = collections.Counter(op for op in OPERATION.findall(compiled.as_text())
                                 if op not in FREE)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
    return counts, {"flops": cost.get("flops", float("nan")),
                    "bytes": cost.get("bytes accessed", float("nan"))}


def mean_return_of(env, num_envs: int, horizon: int, key):
    """A policy's parameters and ``mean_return(params, remat_segment=0)``: the mean return of
    ``num_envs`` rollouts of ``horizon`` steps (SHAC's 128-64-32 network)."""
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size,
                                      hidden_sizes=(128, 64, 32))
    stats = init_statistics(env.observation_size)
    states = jax.vmap(env.reset)(jax.random.split(key, num_envs))

    def mean_return(p, remat_segment=0):
        _, tr = unroll(env, policy, p, stats, states, key, horizon, remat_segment=remat_segment)
        return jnp.mean(jnp.sum(tr.reward, axis=0))

    return policy.init(key), mean_return


def rollout_rows(env, num_envs: int, horizon: int, segments: list[int], repeats: int, key):
    params, mean_return = mean_return_of(env, num_envs, horizon, key)
    programs = {"forward rollout": jax.jit(functools.partial(mean_return, remat_segment=0))}
    for segment in segments:
        name = "BPTT gradient" + (f", remat every {segment}" if segment else "")
        programs[name] = jax.jit(jax.grad(functools.partial(mean_return, remat_segment=segment)))
    rows = []
    for name, program in programs.items():
        compiling, seconds = cpu_seconds(program, params, repeats=repeats)
        rows.append({"program": name, "cpu_s": seconds, "compile_s": compiling})
    for row in rows:
        row["x_forward"] = row["cpu_s"] / rows[0]["cpu_s"]
    return rows


def step_rows(env, num_envs: int, repeats: int, key):
    states = jax.vmap(env.reset)(jax.random.split(key, num_envs))
    actions = jnp.zeros((num_envs, env.action_size))
    step = jax.vmap(env.step)

    def after(physics, action):
        reached = step(states.replace(pipeline_state=physics), action)
        return jnp.sum(reached.reward) + jnp.sum(reached.obs**2)

    reverse = jax.grad(after, argnums=(0, 1))
    rows = []
    for name, function in (("one step, forward", after), ("one step, reverse", reverse)):
        _, seconds = cpu_seconds(jax.jit(function), states.pipeline_state, actions,
                                 repeats=repeats)
        counts, cost = operations(function, states.pipeline_state, actions)
        rows.append({"program": name, "cpu_ms": 1e3 * seconds, "operations": sum(counts.values()),
                     "mflop": cost["flops"] / 1e6, "mbyte": cost["bytes"] / 1e6,
                     "most": ", ".join(f"{op} {n}" for op, n in counts.most_common(8))})
    return rows


def lever_rows(env, num_envs: int, horizon: int, repeats: int, key) -> list[dict]:
    """The BPTT gradient with each of ``LEVERS`` against today's program (``"today"``, timed
    first and last)."""
    params, mean_return = mean_return_of(env, num_envs, horizon, key)
    rows, today = [], None
    # Today's program again at the end: how far the measurement drifts over the run.
    for name, lever in ({"today": {}} | LEVERS | {"today, again": {}}).items():
        started = time.perf_counter()
        with (scans_traced_with_split_transpose() if lever == "split_transpose"
              else contextlib.nullcontext()):
            lowered = jax.jit(jax.grad(mean_return)).lower(params)
        try:
            compiled = lowered.compile(compiler_options=lever if isinstance(lever, dict) else {})
        except Exception as error:  # (an option this jaxlib does not know)
            rows.append({"lever": name, "error": f"{type(error).__name__}: {error}"[:120]})
            continue
        gradient = jax.block_until_ready(compiled(params))
        compiling = time.perf_counter() - started
        cpu, wall = best_seconds(compiled, params, repeats=repeats)
        flat = jax.flatten_util.ravel_pytree(gradient)[0]
        today = flat if today is None else today
        rows.append({"lever": name, "wall_s": wall, "cpu_s": cpu, "compile_s": compiling,
                     "x_today_wall": wall / rows[0]["wall_s"] if rows else 1.0,
                     "x_today_cpu": cpu / rows[0]["cpu_s"] if rows else 1.0,
                     "error": "", "gradient_difference": float(jnp.max(jnp.abs(flat - today))
                                                  / jnp.max(jnp.abs(today)))})
    return rows


def main() -> None:
    parser = common.parser("profile_reverse", __doc__.split("\n\n")[0])
    parser.add_argument("--env", default="hopper")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--horizon", type=int, default=32)
    parser.add_argument("--segments", type=int, nargs="*", default=[0, 1, 8],
                        help="remat_segment values of the BPTT gradient (0: none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--levers", action="store_true",
                        help="also the BPTT gradient with each of LEVERS against today's")
    arguments = parser.parse_args()
    out = common.prepare_output(arguments.out, arguments.overwrite)
    env, key = envs.make(arguments.env), jax.random.PRNGKey(arguments.seed)
    rollout = rollout_rows(env, arguments.num_envs, arguments.horizon, arguments.segments,
                           arguments.repeats, key)
    print(common.format_table(rollout, ["program", "cpu_s", "x_forward", "compile_s"]))
    steps = step_rows(env, arguments.num_envs, arguments.repeats, key)
    print(common.format_table(steps, ["program", "cpu_ms", "operations", "mflop", "mbyte",
                                      "most"]))
    levers = []
    if arguments.levers:
        levers = lever_rows(env, arguments.num_envs, arguments.horizon, arguments.repeats, key)
        print(common.format_table(levers, ["lever", "wall_s", "cpu_s", "x_today_wall",
                                           "x_today_cpu", "compile_s", "gradient_difference",
                                           "error"]))
    common.write_json(out / "results.json", {"settings": vars(arguments) | {"out": str(out)},
                                             "rollout": rollout, "step": steps,
                                             "levers": levers})
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
