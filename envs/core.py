"""The one environment interface every estimator and trainer uses.

An environment is Brax's contract, for a single (unbatched) instance; batches are made with
``jax.vmap`` by the caller:

* ``reset(key) -> State``: a fresh episode from a ``jax.random.key``/``PRNGKey``.
* ``step(state, action) -> State``: one transition. ``action`` has shape ``[action_size]``.

``State`` is Brax's own ``brax.envs.base.State`` (``pipeline_state``, ``obs [observation_size]``,
``reward []``, ``done []``, ``metrics``, ``info``), so Brax environments and the analytic ones in
this package are interchangeable. ``step`` must be differentiable with respect to ``state`` and
``action`` wherever the dynamics are.

Raw environments only report *termination* (``done`` = 1 when the episode ends for a reason
inside the task, e.g. a fall). Time limits and auto-reset are added by ``envs.wrappers``, which
records, after every step:

* ``info['termination']``: 1.0 if the task ended the episode (value of the next state is 0);
* ``info['truncation']``: 1.0 if the time limit ended it instead (bootstrap from the next state);
* ``info['terminal_obs']``: the observation reached by this step, *before* any auto-reset;
* ``info['steps']``: steps taken in the current episode (0 right after an auto-reset).
"""

from __future__ import annotations

import abc

import jax
from brax.envs.base import State

__all__ = ["Environment", "SettingError", "State"]


class SettingError(ValueError):
    """A value a user chose (a setting, an option, an input file) that is not allowed. Its
    message is one line naming the setting and the allowed values; the command line prints it
    alone, where any other exception keeps its traceback (a bug is not a bad setting)."""


class Environment(abc.ABC):
    """Abstract single-instance environment (see the module docstring for the contract)."""

    #: Default episode length (steps) used by ``envs.make`` when none is given.
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
