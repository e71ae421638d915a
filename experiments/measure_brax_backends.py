"""Measure which Brax backend each environment should default to.

For every (environment, backend) pair, with a batch of ``--batch`` envs, a linear tanh policy
``action = tanh(W obs + b)`` with small random weights and a ``--horizon``-step rollout from
reset (raw env: no time limit, no auto-reset, rewards summed regardless of ``done``):

* ``grad_finite_fraction``: fraction of ``--seeds`` seeds whose gradient of the objective
  (sum of rewards over the horizon, averaged over the batch) w.r.t. ``(W, b)`` is all finite;
* ``grad_norm_median`` (and per-seed ``grad_norms``): global L2 norm of that gradient;
* ``obs_grad_norm_median``: the same for the sum over the horizon of ``|obs|^2`` (batch mean),
  a reward-independent check that gradients flow through the dynamics;
* ``steps_per_s``: forward-only env steps per second (batch * horizon / time of a jitted rollout);
* ``grad_compile_s`` / ``forward_compile_s``: XLA compile times (persistent cache disabled for
  the measured pair's timings only if ``--no-cache``; by default a cache hit makes them small);
* ``error``: the exception (e.g. MJX's reverse-mode ``while_loop`` error) if a stage failed.

Each pair runs in its own subprocess with a timeout, so a crash or a slow compile is recorded
and the sweep goes on. Results are rewritten to ``--out`` after every pair (partial results
survive an interrupted sweep).

Usage::

    python experiments/measure_brax_backends.py --out runs/brax_backends.json \
        [--envs inverted_pendulum,reacher] [--backends spring,positional] [--timeout 300]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Cheapest first, so an interrupted sweep still covers the most environments.
ENV_ORDER = (
    "inverted_pendulum",
    "inverted_double_pendulum",
    "reacher",
    "swimmer",
    "hopper",
    "halfcheetah",
    "walker2d",
    "pusher",
    "ant",
    "humanoidstandup",
    "humanoid",
)
BACKEND_ORDER = ("spring", "positional", "generalized", "mjx")


def _configure_jax(use_cache: bool) -> None:
    from diffpg.compilation_cache import enable_compilation_cache

    if use_cache:
        enable_compilation_cache()  # diffpg's persistent cache directory


def measure_pair(
    env_name: str, backend: str, batch: int, horizon: int, seeds: int, forward_reps: int
) -> dict:
    """Measure one (env, backend) pair in this process; returns a JSON-able dict."""
    import jax
    from diffpg.envs.brax_envs import SUPPORTED_BACKENDS

    from diffpg import envs

    result: dict = {"env": env_name, "backend": backend, "batch": batch, "horizon": horizon}
    playground = env_name.startswith(envs.playground.PREFIX)
    if not playground and backend not in SUPPORTED_BACKENDS[env_name]:
        result["error"] = f"unsupported: Brax has no {backend} model of {env_name}"
        return result

    def make(**settings):
        return envs.make_raw(env_name, backend=None if playground else backend, **settings)

    env = make()
    result.update(observation_size=env.observation_size, action_size=env.action_size)

    def objectives(params: dict, reset_keys: jax.Array) -> jax.Array:
        return linear_policy_objectives(env, params, reset_keys, horizon)

    params, keys = linear_policy_inputs(env, batch, 0)
    try:
        measure_forward(result, objectives, params, keys, horizon, forward_reps)
    except Exception as error:  # noqa: BLE001 - recorded, not raised
        result["error"] = f"forward: {type(error).__name__}: {str(error)[:400]}"
        return result
    try:
        start = time.perf_counter()
        grad_fn = jax.jit(jax.jacrev(objectives)).lower(params, keys).compile()
        result["grad_compile_s"] = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001
        result["error"] = f"grad: {type(error).__name__}: {str(error)[:400]}"
        return result
    result.update(gradient_measurements(
        grad_fn, lambda seed: linear_policy_inputs(env, batch, seed), seeds, horizon))
    if backend == "mjx":
        result.update(solver_iteration_effect(env, make, params, keys, DIVERGENCE_STEPS))
    return result


def linear_policy_objectives(env, params: dict, reset_keys, horizon: int):
    """``[2]``: batch-means of the summed reward and of the summed squared observation over
    ``horizon`` steps of the linear tanh policy from ``reset(reset_keys [batch])``.

    params: W [action, obs], b [action]. The second objective tests that the dynamics are
    differentiable where the reward is constant (inverted_pendulum's reward is 1 per step
    whatever happens, so its reward gradient is exactly 0).
    """
    import jax.numpy as jnp

    rewards, observations = linear_rollout(env, params, reset_keys, horizon)
    obs_squares = jnp.sum(observations**2, axis=-1)  # [horizon, batch]
    return jnp.stack([jnp.mean(jnp.sum(rewards, 0)), jnp.mean(jnp.sum(obs_squares, 0))])


def linear_policy_inputs(env, batch: int, seed: int) -> tuple[dict, object]:
    """Seed ``seed``'s small random linear policy (``W ~ 0.1 N(0, 1) / sqrt(obs size)``,
    ``b = 0``) and ``batch`` reset keys."""
    import jax
    import jax.numpy as jnp

    obs_size, action_size = env.observation_size, env.action_size
    weight_key, reset_key = jax.random.split(jax.random.PRNGKey(seed))
    params = {
        "W": 0.1 * jax.random.normal(weight_key, (action_size, obs_size)) / math.sqrt(obs_size),
        "b": jnp.zeros((action_size,)),
    }
    return params, jax.random.split(reset_key, batch)


def measure_forward(result: dict, objectives, params: dict, keys, horizon: int,
                    forward_reps: int) -> None:
    """Compiles the forward objectives (``forward_compile_s``), then times ``forward_reps``
    calls on fresh reset keys: ``steps_per_s`` (batch x horizon steps per call) and the last
    call's ``return``. Writes into ``result`` as it goes, so that a failure keeps what came
    before it."""
    import jax

    batch = keys.shape[0]
    start = time.perf_counter()
    forward = jax.jit(objectives).lower(params, keys).compile()
    result["forward_compile_s"] = time.perf_counter() - start
    value = forward(params, keys)
    value.block_until_ready()
    start = time.perf_counter()
    for rep in range(forward_reps):
        value = forward(params, jax.random.split(jax.random.PRNGKey(100 + rep), batch))
    value.block_until_ready()
    elapsed = time.perf_counter() - start
    result["steps_per_s"] = batch * horizon * forward_reps / elapsed
    result["return"] = float(value[0])


def gradient_measurements(grad_fn, inputs_of_seed, seeds: int, horizon: int) -> dict:
    """The compiled Jacobian ``grad_fn`` (``[2, *param_shape]`` per leaf) on the inputs
    ``inputs_of_seed(seed) -> (params, reset keys)`` of seeds ``0..seeds-1`` (one warm-up call
    first): ``grad_steps_per_s``, the fraction of seeds whose Jacobian is finite, and per
    objective (``grad``: reward, ``obs_grad``: squared observation) each seed's global L2 norm
    and the median of the finite ones (None if none is)."""
    import jax
    import jax.numpy as jnp

    params, keys = inputs_of_seed(0)
    batch = keys.shape[0]
    norms: dict[str, list[float]] = {"grad": [], "obs_grad": []}
    finite = []
    jax.block_until_ready(grad_fn(params, keys))
    start = time.perf_counter()
    for seed in range(seeds):
        seed_params, seed_keys = inputs_of_seed(seed)
        jacobian = jax.block_until_ready(grad_fn(seed_params, seed_keys))  # [2, *param_shape]
        leaves = jax.tree_util.tree_leaves(jacobian)
        finite.append(bool(all(jnp.all(jnp.isfinite(leaf)) for leaf in leaves)))
        for row, key in enumerate(("grad", "obs_grad")):
            norms[key].append(float(jnp.sqrt(sum(jnp.sum(leaf[row] ** 2) for leaf in leaves))))
    result = {"grad_steps_per_s": batch * horizon * seeds / (time.perf_counter() - start),
              "grad_finite_fraction": sum(finite) / seeds}
    for key, values in norms.items():
        result[f"{key}_norms"] = values
        finite_norms = sorted(n for n in values if math.isfinite(n))
        median = finite_norms[len(finite_norms) // 2] if finite_norms else None
        result[f"{key}_norm_median"] = median
    return result


def linear_rollout(env, params: dict, reset_keys, steps: int):
    """``steps`` steps of the linear tanh policy ``action = tanh(W obs + b)`` from
    ``reset(reset_keys [batch])``: rewards ``[steps, batch]`` and observations reached
    ``[steps, batch, obs]``."""
    import jax
    import jax.numpy as jnp

    def one_step(states, _):
        actions = jnp.tanh(states.obs @ params["W"].T + params["b"])  # [batch, action]
        states = jax.vmap(env.step)(states, actions)
        return states, (states.reward, states.obs)

    states = jax.vmap(env.reset)(reset_keys)
    return jax.lax.scan(one_step, states, None, length=steps)[1]


DIVERGENCE_STEPS = 100
"""Steps over which the one-iteration MJX model is compared with the model's own solver."""


def solver_iteration_effect(env, make, params: dict, keys, steps: int) -> dict:
    """How much MJX's single solver iteration (the differentiable setting) changes the dynamics.

    The same linear policy runs ``steps`` steps from the same resets on ``env`` (one iteration)
    and on the model with its own ``native_solver_iterations``. Returns the model's iterations,
    each model's mean return per env, the relative difference of the observations after one step
    (median over the batch of |obs_1 - obs_native| / |obs_native|) and after ``steps`` steps.
    """
    import jax
    import jax.numpy as jnp

    native = env.native_solver_iterations
    result = {"native_solver_iterations": native}
    if native == 1:
        return result
    native_env = make(solver_iterations=native)

    def rollout(model_env):
        return jax.jit(lambda p, k: linear_rollout(model_env, p, k, steps))(params, keys)

    (rewards_one, obs_one), (rewards_native, obs_native) = rollout(env), rollout(native_env)
    returns_one, returns_native = rewards_one.sum(0), rewards_native.sum(0)  # [batch]

    def relative(step):
        gap = jnp.linalg.norm(obs_one[step] - obs_native[step], axis=-1)
        return float(jnp.median(gap / jnp.linalg.norm(obs_native[step], axis=-1)))

    return result | {"return_one_iteration": float(returns_one.mean()),
                     "return_native_iterations": float(returns_native.mean()),
                     "obs_rel_diff_step1": relative(0), f"obs_rel_diff_step{steps}": relative(-1)}


def _run_worker_subprocess(args: argparse.Namespace, env_name: str, backend: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"{env_name}:{backend}",
        f"--batch={args.batch}",
        f"--horizon={args.horizon}",
        f"--seeds={args.seeds}",
        f"--forward-reps={args.forward_reps}",
    ] + (["--no-cache"] if args.no_cache else [])
    start = time.perf_counter()
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired:
        return {
            "env": env_name,
            "backend": backend,
            "error": f"timeout: not finished within {args.timeout} s",
            "wall_s": time.perf_counter() - start,
        }
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        result = json.loads(lines[-1][len("RESULT ") :])
    else:
        result = {
            "env": env_name,
            "backend": backend,
            "error": f"crash (rc={completed.returncode}): {completed.stderr[-400:]}",
        }
    result["wall_s"] = time.perf_counter() - start
    return result


def _format(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[dict]) -> str:
    """A Markdown table of the results."""
    header = (
        "| env | backend | grad finite | reward-grad norm | obs-grad norm | fwd steps/s "
        "| fwd compile s | grad compile s | grad steps/s | error |"
    )
    rows = [header, "|" + "---|" * 10]
    for r in results:
        rows.append(
            f"| {r['env']} | {r['backend']} | {_format(r.get('grad_finite_fraction'), '.2f')} "
            f"| {_format(r.get('grad_norm_median'), '.3g')} "
            f"| {_format(r.get('obs_grad_norm_median'), '.3g')} "
            f"| {_format(r.get('steps_per_s'), '.0f')} "
            f"| {_format(r.get('forward_compile_s'), '.1f')} "
            f"| {_format(r.get('grad_compile_s'), '.1f')} "
            f"| {_format(r.get('grad_steps_per_s'), '.0f')} "
            f"| {(r.get('error') or '').splitlines()[0][:90] if r.get('error') else ''} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/brax_backends.json")
    parser.add_argument("--envs", default=",".join(ENV_ORDER))
    parser.add_argument("--backends", default=",".join(BACKEND_ORDER))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--forward-reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pair")
    parser.add_argument("--jobs", type=int, default=1, help="pairs measured in parallel")
    parser.add_argument("--no-cache", action="store_true", help="no persistent XLA cache")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        _configure_jax(use_cache=not args.no_cache)
        env_name, backend = args.worker.rsplit(":", 1)
        result = measure_pair(
            env_name, backend, args.batch, args.horizon, args.seeds, args.forward_reps
        )
        print("RESULT " + json.dumps(result), flush=True)
        return

    from diffpg.envs.brax_envs import BACKENDS, BRAX_ENV_NAMES
    from diffpg.envs.playground import PREFIX

    env_names = [name for name in args.envs.split(",") if name]
    backends = [name for name in args.backends.split(",") if name]
    for name in env_names:
        if name not in BRAX_ENV_NAMES and not name.startswith(PREFIX):
            parser.error(f"--envs: {name!r} is neither in {BRAX_ENV_NAMES} nor {PREFIX}TASK")
    for name in backends:
        if name not in BACKENDS:
            parser.error(f"--backends: {name!r} not in {BACKENDS}")

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pairs = [(env_name, backend) for env_name in env_names for backend in backends
             if not env_name.startswith(PREFIX) or backend == "mjx"]  # Playground runs on MJX
    results: list[dict] = []
    order = {pair: index for index, pair in enumerate(pairs)}
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_run_worker_subprocess, args, *pair): pair for pair in pairs}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results.append(result)
            results.sort(key=lambda r: order[(r["env"], r["backend"])])
            summary = {
                k: result.get(k)
                for k in ("grad_finite_fraction", "grad_norm_median", "obs_grad_norm_median")
            }
            print(
                f"[{len(results)}/{len(pairs)}] {result['env']}/{result['backend']} "
                f"{summary} steps/s={_format(result.get('steps_per_s'), '.0f')} "
                f"wall={result.get('wall_s', 0):.0f}s {result.get('error', '')[:120]}",
                flush=True,
            )
            payload = {
                "settings": {
                    k: getattr(args, k) for k in ("batch", "horizon", "seeds", "forward_reps")
                },
                "results": results,
            }
            out_path.write_text(json.dumps(payload, indent=2))
    print(format_table(results))


if __name__ == "__main__":
    main()
