"""diffpg: REINFORCE, critic backprop and backprop through physics (SHAC/BPTT) behind one policy
and one environment interface, so their gradients can be compared on the same states.

Importing ``diffpg`` changes nothing in the process. ``diffpg.setup()`` is the process-wide setup
the command line does first, and a script may do too: JAX's persistent compilation cache, XLA's
C++ log lines silenced, MuJoCo's warnings routed to the ``mujoco`` logger.
"""

import logging

__version__ = "0.1.0"


def setup(cache_dir: str | None = "default") -> None:
    """Process-wide setup for diffpg's commands (idempotent; call it before importing jax to
    silence XLA's log lines from the start):

    * XLA's C++ log lines silenced unless ``TF_CPP_MIN_LOG_LEVEL`` is set
      (``diffpg.compilation_cache.quiet_xla_logs``);
    * JAX's persistent compilation cache in ``cache_dir`` (``"default"``: ``$DIFFPG_CACHE_DIR``
      or ``~/.cache/diffpg/jax``; ``None`` or ``DIFFPG_CACHE_DIR=off``: no cache);
    * MuJoCo's warnings to the ``mujoco`` logger instead of the console and a ``MUJOCO_LOG.TXT``
      in the working directory (``diffpg.envs.route_mujoco_warnings``);
    * tensorboardX's warning for each non-finite metric silenced (such values are counted in
      the metrics themselves).
    """
    from diffpg.compilation_cache import enable_compilation_cache, quiet_xla_logs

    quiet_xla_logs()
    enable_compilation_cache(cache_dir)
    # A non-finite metric is recorded as it is (and counted); tensorboardX's warning about it,
    # once per value, would bury the command's own line.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    # A config folder matplotlib cannot make (HOME a file, read-only) makes it use a temporary
    # one, with two warnings per command: the plots are the same.
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    from diffpg import envs

    envs.route_mujoco_warnings()
