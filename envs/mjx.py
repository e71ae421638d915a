"""MuJoCo XLA (MJX) models made differentiable: one setting, its check, and a clear error.

Brax's ``backend="mjx"`` envs and MuJoCo Playground's envs step an ``mujoco.mjx.Model``. MJX's
constraint solver (``mujoco/mjx/_src/solver.py``, ``solve``) runs its Newton/CG iterations in a
``jax.lax.while_loop`` (stopping at ``opt.iterations`` or at ``opt.tolerance``), which JAX cannot
differentiate in reverse mode, *unless* ``opt.iterations == 1``: then it calls the loop body
once. The line search inside the body is already a bounded ``lax.scan`` over
``opt.ls_iterations``. So a model with one solver iteration is differentiable end to end.

What one iteration changes: the contact and joint-limit forces of a step come from a single
Newton (or CG) step from the warm start (last step's accelerations) instead of an iterated solve,
so constraints are met less exactly per step; Brax's own Ant and Humanoid mjx models already run
with one iteration. The measured effect on each model's trajectories and returns is in
``docs/mjx_playground.md``.

A model that keeps more iterations still simulates (for the score-function estimators, which do
not differentiate the physics); ``guard_gradient`` makes differentiating it fail with one line
naming ``solver_iterations`` instead of JAX's ``while_loop`` error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from diffpg.envs.core import SettingError

__all__ = [
    "DIFFERENTIABLE_SOLVER_ITERATIONS",
    "check_solver_iterations",
    "guard_gradient",
    "solver_iterations",
    "with_solver_iterations",
]

#: The solver iterations with which MJX's step is differentiable (the loop becomes one call).
DIFFERENTIABLE_SOLVER_ITERATIONS = 1


def check_solver_iterations(value: Any) -> int:
    """``value`` as an int >= 1, or ``SettingError`` naming ``solver_iterations``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(f"solver_iterations={value!r} must be an int >= 1 "
                           f"({DIFFERENTIABLE_SOLVER_ITERATIONS}: differentiable)")
    return value


def solver_iterations(model: Any) -> int:
    """The constraint-solver iterations of an ``mjx.Model`` (or Brax ``System``)."""
    return int(model.opt.iterations)


def with_solver_iterations(model: Any, iterations: int) -> Any:
    """``model`` with ``opt.iterations = iterations`` (every other setting kept)."""
    return model.tree_replace({"opt.iterations": check_solver_iterations(iterations)})


def guard_gradient(step: Callable, env_description: str, iterations: int) -> Callable:
    """``step(state, action)`` unchanged forward; differentiating it (either mode) raises a
    one-line error.

    For a model with ``iterations`` > 1 solver iterations, whose step JAX cannot differentiate
    in reverse mode. The error names the setting and what works instead.
    """
    message = (f"{env_description} cannot be differentiated with solver_iterations={iterations} "
               f"(MJX loops its constraint solver in lax.while_loop); use solver_iterations="
               f"{DIFFERENTIABLE_SOLVER_ITERATIONS}, or an estimator that does not differentiate "
               f"the physics (reinforce, ppo, critic_backprop)")

    # A custom JVP: reverse mode linearises through it, and forward mode (AHAC's stiffness
    # probe) reaches it directly, so both stop here with the message.
    @jax.custom_jvp
    def guarded(state, action):
        return step(state, action)

    @guarded.defjvp
    def differentiated(primals, tangents):
        raise SettingError(message)

    return guarded
