"""Shared fixtures: the linear-quadratic regulator, whose policy gradient is known exactly."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before jax: no XLA log lines in reports

from diffpg.program_cache import CPU_COMPILER_OPTIONS  # noqa: E402 (no backend starts on import)

FAST_COMPILE_XLA_FLAGS = " ".join(f"--{name}={str(value).lower()}"
                                  for name, value in CPU_COMPILER_OPTIONS.items())
"""The comparison's XLA:CPU options as flags for every program the tests compile (set before
any backend starts, and inherited by the tests' subprocesses): XLA's loop emitters for fusions,
LLVM's -O1 and one LLVM module per program. The suite compiles hundreds of small programs and
runs most of them briefly, so these halve its CPU time; results differ from the default flags'
in rounding only."""
USER_XLA_FLAGS = os.environ.setdefault("DIFFPG_TESTS_USER_XLA_FLAGS",
                                      os.environ.get("XLA_FLAGS", "")) or None
"""XLA_FLAGS as the tests found them (kept for pytest-xdist's workers, which inherit the flags
set below): what a test of the user's own output runs with."""
ONE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"
"""Under pytest-xdist (one worker per core): each worker's XLA runs its programs on one thread,
so that the workers' thread pools do not contend for the same cores."""
os.environ["XLA_FLAGS"] = " ".join(
    flags for flags in (USER_XLA_FLAGS, FAST_COMPILE_XLA_FLAGS,
                        ONE_THREAD_XLA_FLAGS if os.environ.get("PYTEST_XDIST_WORKER") else None)
    if flags)

import diffpg  # noqa: E402

diffpg.setup()  # the command line's process-wide setup: the compilation cache above all

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from diffpg.envs.analytic import lqr_expected_return, lqr_q_value, lqr_value  # noqa: E402

from diffpg import envs  # noqa: E402
from diffpg.critics import QFunction, ValueFunction  # noqa: E402
from diffpg.normalization import init_statistics  # noqa: E402
from diffpg.policy import make_linear_gaussian_policy  # noqa: E402

HANG_LIMIT_S = 1800
"""How long a test's subprocess may run before it counts as hung. Each does seconds to a few
minutes of work; the limit is for hangs only, so that no verdict depends on the machine's load
(the suite once took 60 minutes of wall-clock on a loaded machine, 11 on an idle one)."""

LQR_HORIZON = 10
LQR_DISCOUNT = 0.95


class LinearQuadraticProblem:
    """An LQR env, a linear-Gaussian policy, fixed start states and the exact gradient there.

    ``episode_length`` shorter than ``horizon`` makes the objective cross episode ends (time-limit
    truncations and auto-resets to each env's stored first state); ``start_step = s`` starts every
    env ``s`` steps into its episode, from a state other than the one it resets to.
    """

    def __init__(self, num_states: int = 16, horizon: int = LQR_HORIZON,
                 discount: float = LQR_DISCOUNT, episode_length: int | None = None,
                 start_step: int = 0):
        self.horizon = horizon
        self.discount = discount
        self.env = envs.make("lqr", episode_length=episode_length)
        self.raw_env = self.env.unwrapped
        self.episode_length = self.env.episode_length
        self.start_step = start_step
        self.policy = make_linear_gaussian_policy(
            self.env.observation_size, self.env.action_size, init_gain_scale=0.5
        )
        self.params = self.policy.init(jax.random.PRNGKey(0))
        self.start_states = jax.vmap(self.env.reset)(
            jax.random.split(jax.random.PRNGKey(1), num_states)
        )
        if start_step:  # mid-episode: elsewhere now, reset later to the stored first state
            elsewhere = jax.vmap(self.env.reset)(jax.random.split(jax.random.PRNGKey(7), num_states))
            self.start_states = self.start_states.replace(
                pipeline_state=elsewhere.pipeline_state, obs=elsewhere.obs,
                info=self.start_states.info | {"steps": jnp.full(num_states, start_step,
                                                                 jnp.int32)})
        self.obs_stats = init_statistics(self.env.observation_size)  # raw observations

    def policy_arrays(self, params):
        return params["gain"], params["bias"], jnp.exp(params["log_std"])

    def segments(self, horizon: int) -> list[int]:
        """Lengths of the episode pieces the horizon covers: the rest of the current episode,
        then whole episodes from the reset state, the last one cut by the horizon."""
        lengths, left = [min(self.episode_length - self.start_step, horizon)], horizon
        left -= lengths[0]
        while left > 0:
            lengths.append(min(self.episode_length, left))
            left -= lengths[-1]
        return lengths

    def objective(self, params, horizon=None):
        """Exact ``J = mean over start states of E[sum_t w_t r_t]`` over ``horizon`` steps, each
        episode piece discounted from its own start (the estimators' objective)."""
        horizon = self.horizon if horizon is None else horizon
        zero_cov = jnp.zeros((self.env.observation_size,) * 2)
        first, *later = self.segments(horizon)

        def expected(x, steps):
            return lqr_expected_return(self.raw_env, *self.policy_arrays(params), steps,
                                       self.discount, x, zero_cov)

        def from_state(x, reset_state):
            return expected(x, first) + sum(expected(reset_state, steps) for steps in later)

        return jnp.mean(jax.vmap(from_state)(self.start_states.pipeline_state,
                                             self.start_states.info["first_pipeline_state"]))

    def exact_gradient(self, params=None):
        return jax.grad(self.objective)(self.params if params is None else params)

    def exact_value_function(self, boundary: str = "terminal") -> ValueFunction:
        """The true value of the rest of the current episode within the horizon, as a
        parameter-free critic ``V(obs, steps_left)`` (``steps_left``: horizon steps after the
        state, so the state's episode phase is known). A state at an episode boundary is the
        terminal state of the episode that ended (``boundary="terminal"``, what SHAC queries at
        truncations: nothing is left) or the first state of the next (``"start"``, what a value
        baseline queries)."""
        arrays = self.policy_arrays(self.params)
        length, start = self.episode_length, self.start_step

        def single(obs, steps_left):
            phase = (start + self.horizon - steps_left) % length
            rest = jnp.minimum(length - phase, steps_left)
            if boundary == "terminal":
                rest = jnp.where(phase == 0, 0, rest)
            return lqr_value(self.raw_env, *arrays, obs, rest, self.discount,
                             max_steps=self.horizon)

        vectorized = jnp.vectorize(single, signature="(n),()->()")
        return ValueFunction(lambda key: {}, lambda params, obs, steps: vectorized(obs, steps))

    def exact_q_function(self) -> QFunction:
        """The true Q of the rest of the current episode within the horizon, as a parameter-free
        critic ``Q(obs, action, steps_left)`` (``steps_left``: horizon steps from the state on,
        the action's step included)."""
        arrays = self.policy_arrays(self.params)
        length, start = self.episode_length, self.start_step

        def single(obs, action, steps_left):
            phase = (start + self.horizon - steps_left) % length
            return lqr_q_value(self.raw_env, *arrays, obs, action,
                               jnp.minimum(length - phase, steps_left), self.discount,
                               max_steps=self.horizon)

        vectorized = jnp.vectorize(single, signature="(n),(m),()->()")
        return QFunction(lambda key: {}, lambda params, o, a, s: vectorized(o, a, s))

def pytest_collection_modifyitems(config, items):
    """The slow tests first (each file's in its order): under pytest-xdist, the minutes-long
    ones then start while the quick ones fill the other workers, and the run ends on quick
    tests rather than on one long test running alone on a core."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def lqr() -> LinearQuadraticProblem:
    return LinearQuadraticProblem()


def independent_estimates(estimator, problem, num_estimates, seed=3, state=None, params=None):
    """``num_estimates`` independent gradient estimates on the problem's start states, stacked."""
    params = problem.params if params is None else params
    if state is None:
        state = estimator.init(jax.random.PRNGKey(2), params)
    keys = jax.random.split(jax.random.PRNGKey(seed), num_estimates)
    batched = jax.jit(jax.vmap(estimator.estimate, in_axes=(None, None, None, None, 0)))
    return batched(params, problem.obs_stats, state, problem.start_states, keys).grad


def learn(estimator, problem, state, steps, seed=100):
    """``steps`` rounds of ``estimate`` then ``update`` on the problem's fixed policy and starts
    (what a comparison's warm-up does); returns the learned state."""
    def one_round(state, key):
        key_estimate, key_update = jax.random.split(key)
        batch = estimator.estimate(problem.params, problem.obs_stats, state,
                                   problem.start_states, key_estimate).batch
        return estimator.update(problem.params, problem.obs_stats, state, batch, key_update)[0], None

    keys = jax.random.split(jax.random.PRNGKey(seed), steps)
    return jax.jit(lambda s: jax.lax.scan(one_round, s, keys)[0])(state)


def flatten_samples(tree) -> np.ndarray:
    """A tree whose leaves have a leading sample axis ``[K, ...]`` -> ``[K, P]`` float64."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], 1)


def flatten(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def assert_unbiased(samples, expected, num_se: float = 4.0, resolvable_error: float = 0.25
                    ) -> float:
    """The sample mean matches ``expected`` within ``num_se`` standard errors, coordinate-wise.

    ``samples``: tree with leading axis ``[K]`` of independent estimates; ``expected``: a tree of
    the same structure without it. Also asserts the test has power: ``(num_se + 2)`` standard
    errors of the norm of the mean fit within ``resolvable_error * |expected|``, so an estimator
    biased by that much lies 2 standard errors beyond the rejection bound and fails with high
    probability (about 98% for a bias along one coordinate); and the norm of the error is within
    ``num_se`` standard errors. Returns the smallest relative error the test detects this way.
    """
    flat = flatten_samples(samples)
    target = flatten(expected)
    mean = flat.mean(axis=0)
    standard_error = flat.std(axis=0, ddof=1) / np.sqrt(flat.shape[0])
    norm_se = np.sqrt(np.sum(standard_error**2))
    detectable = (num_se + 2) * norm_se / np.linalg.norm(target)
    assert detectable <= resolvable_error, (
        f"too few samples to resolve a {resolvable_error:.0%} error with margin: "
        f"{num_se + 2} SE of the norm = {(num_se + 2) * norm_se:.4g}, "
        f"|expected| = {np.linalg.norm(target):.4g}"
    )
    z_scores = (mean - target) / np.maximum(standard_error, 1e-7 * np.abs(target) + 1e-12)
    assert np.all(np.abs(z_scores) <= num_se), (
        f"biased: z-scores {np.round(z_scores, 2)}\n mean {mean}\n expected {target}\n"
        f" standard error {standard_error}"
    )
    assert np.linalg.norm(mean - target) <= num_se * norm_se, "biased: the error's norm"
    return float(detectable)


@contextlib.contextmanager
def compiles():
    """Every XLA compilation inside the ``with`` block, as a list (a spy on jax's compile step)."""
    import jax._src.interpreters.pxla as pxla

    compiled = []
    original = pxla.MeshComputation.compile

    def spy(self, *args, **kwargs):
        compiled.append(self)
        return original(self, *args, **kwargs)

    pxla.MeshComputation.compile = spy
    try:
        yield compiled
    finally:
        pxla.MeshComputation.compile = original


@contextlib.contextmanager
def small_disk(folder, size: str, read_only: bool = False, inodes: int | None = None):
    """A tmpfs of ``size`` (``"2m"``) mounted at the new folder ``folder`` (read-only if asked;
    with at most ``inodes`` files and folders if given): a disk that fills up. Skips the test
    where mounting is not allowed."""
    import subprocess

    folder.mkdir()
    options = (f"size={size}" + (",ro" if read_only else "")
               + (f",nr_inodes={inodes}" if inodes else ""))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def under_ulimit(option: str, value: int, command: list[str]) -> list[str]:
    """``command`` run under the shell's ``ulimit option value`` (``-f``: file size in KiB,
    ``-v``: address space in KiB): a limit set without forking the multithreaded test process
    into Python code (``preexec_fn``)."""
    return ["bash", "-c", f'ulimit {option} {value} && exec "$@"', "ulimit", *command]
