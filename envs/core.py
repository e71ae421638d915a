"""The one environment interface every estimator and trainer uses.

An environment is Brax's contract, for a single (unbatched) instance; batches are made with
``jax.vmap`` by the caller:

* ``reset(key) -> State``: a fresh episode from a ``jax.random.key``/``PRNGKey``.
* ``step(state, action) -> State``: one transition. ``action`` has shape ``[action_size]``.

``State`` has the fields of Brax's ``brax.envs.base.State`` (``pipeline_state``,
``obs [observation_size]``, ``reward []``, ``done []``, ``metrics``, ``info``), so Brax environments
(``diffpg.envs.brax_envs`` converts at its boundary) and the analytic ones in this package are
interchangeable. It is defined here rather than imported: importing Brax imports MuJoCo's MJX and
its Warp bindings (about 5 s), which an analytic environment does not need. ``step`` must be
differentiable with respect to ``state`` and ``action`` wherever the dynamics are.

Raw environments only report *termination* (``done`` = 1 when the episode ends for a reason
inside the task, e.g. a fall). Time limits and auto-reset are added by ``diffpg.envs.wrappers``, which
records, after every step:

* ``info['termination']``: 1.0 if the task ended the episode (value of the next state is 0);
* ``info['truncation']``: 1.0 if the time limit ended it instead (bootstrap from the next state);
* ``info['terminal_obs']``: the observation reached by this step, *before* any auto-reset;
* ``info['steps']``: steps taken in the current episode (0 right after an auto-reset).
"""

from __future__ import annotations

import abc
import contextlib
import io
import sys
from typing import Any

import jax
from flax import struct

__all__ = ["Environment", "SettingError", "State", "import_brax_envs"]


@struct.dataclass
class State:
    """One environment instance's state: Brax's ``State`` fields, a pytree.

    ``pipeline_state``: the simulator's state (Brax's physics state, an analytic env's array);
    ``obs [observation_size]``; ``reward []`` of the step that led here; ``done []`` (1.0: the
    episode ended); ``metrics``: per-step numbers to log; ``info``: anything else (the wrappers'
    ``termination``, ``truncation``, ``terminal_obs``, ``steps``).
    """

    pipeline_state: Any
    obs: jax.Array
    reward: jax.Array
    done: jax.Array
    metrics: dict[str, jax.Array] = struct.field(default_factory=dict)
    info: dict[str, Any] = struct.field(default_factory=dict)


def import_brax_envs() -> Any:
    """``brax.envs``, imported on first use with MuJoCo MJX's import-time console notes (e.g.
    that its optional Warp backend is missing) discarded."""
    if "brax.envs" not in sys.modules:
        with contextlib.redirect_stdout(io.StringIO()):
            import brax.envs  # noqa: F401
    return sys.modules["brax.envs"]


class SettingError(ValueError):
    """A value a user chose (a setting, an option, an input file) that is not allowed. Its
    message is one line naming the setting and the allowed values; the command line prints it
    alone, where any other exception keeps its traceback (a bug is not a bad setting)."""


class Environment(abc.ABC):
    """Abstract single-instance environment (see the module docstring for the contract)."""

    #: Default episode length (steps) used by ``diffpg.envs.make`` when none is given.
    default_episode_length: int = 1000

    @abc.abstractmethod
    def reset(self, key: jax.Array) -> State:
        """Start an episode. ``key``: a PRNG key. Returns a ``State`` with ``done`` = 0."""

    @abc.abstractmethod
    def step(self, state: State, action: jax.Array) -> State:
        """Advance one step with ``action [action_size]``; sets ``reward`` and ``done``."""

    @property
    @abc.abstractmethod
    def observation_size(self) -> int:
        """Length of ``State.obs``."""

    @property
    @abc.abstractmethod
    def action_size(self) -> int:
        """Length of the action vector ``step`` expects."""

    @property
    def unwrapped(self) -> Environment:
        return self

    #: Optional: ``linear_gaussian_return(gain [m, n], bias [m], std [m], horizon, discount,
    #: pipeline_state) -> []``, the exact expected return ``E[sum_{t<horizon} discount^t r_t]``
    #: of the policy ``u = gain obs + bias + std eps`` from one state, differentiable in the
    #: policy's parameters; ``None``: the env knows none in closed form. An env that has it gets
    #: a linear policy and this return's gradient as the exact reference in ``diffpg compare``.
    linear_gaussian_return = None
