"""Small differentiable environments written directly in JAX.

They follow the contract in ``diffpg.envs.core`` (single instance, Brax ``State``) and are cheap to
compile, so estimators can be tested and compared on them in seconds:

===================  ==========================  =====  ======  =======  ========================
class                task                        obs    action  length   reward uses
===================  ==========================  =====  ======  =======  ========================
``LinearQuadratic``  linear dynamics, quadratic  n (2)  m (1)   20       state *before* the step
                     cost; exact returns below
``PendulumSwingUp``  torque-limited pendulum     3      1       200      state *before* the step
``CartPoleSwingUp``  SHAC's cart-pole swing-up   5      1       240      state *after* the step
``WallContact``      point mass against a wall   2      1       100      state *after* the step
``DoublePendulum``   chaotic double pendulum     6      2       250      state *before* the step
``Curling``          push a stone (Suh et al.)   4      1       200      state *before* the step
===================  ==========================  =====  ======  =======  ========================

Common conventions:

* ``State.pipeline_state`` is the raw physical state vector, ``State.obs`` the observation.
* ``reward`` and ``done`` are scalars with the dtype of the state (float32 unless 64-bit mode is
  on); ``done`` is always 0: none of these tasks terminates, time limits come from the wrapper.
* ``metrics`` and ``info`` are empty dicts, so ``reset`` and ``step`` return identical pytree
  structures.
* Actions are **not clipped** inside the environments, so gradients always flow; policies are
  expected to squash (e.g. ``tanh``) their actions into ``[-1, 1]`` where a scale is documented.
* Every env has ``init_state(physical_state)``, which builds the ``State`` for a given raw
  state (handy for tests and for starting from a chosen state).

For ``LinearQuadratic`` under a linear-Gaussian policy the expected return, the value and the
action value are known in closed form: see ``lqr_expected_return``, ``lqr_value`` and
``lqr_q_value``. They are exact (no sampling) and differentiable with ``jax.grad``, which makes
them the reference for checking policy-gradient estimators.
"""

from diffpg.envs.analytic.cartpole import CartPoleSwingUp
from diffpg.envs.analytic.contact import WallContact
from diffpg.envs.analytic.curling import Curling
from diffpg.envs.analytic.double_pendulum import DoublePendulum
from diffpg.envs.analytic.lqr import LinearQuadratic, lqr_expected_return, lqr_q_value, lqr_value
from diffpg.envs.analytic.pendulum import PendulumSwingUp

__all__ = [
    "CartPoleSwingUp",
    "Curling",
    "DoublePendulum",
    "LinearQuadratic",
    "PendulumSwingUp",
    "WallContact",
    "lqr_expected_return",
    "lqr_q_value",
    "lqr_value",
]
