"""diffpg: REINFORCE, critic backprop and backprop through physics (SHAC/BPTT) behind one policy
and one environment interface, so their gradients can be compared on the same states.

Importing ``diffpg`` turns on JAX's persistent compilation cache (``diffpg.compilation_cache``)
and silences XLA's C++ log lines (``diffpg.compilation_cache.quiet_xla_logs``).
"""

from diffpg.compilation_cache import enable_compilation_cache, quiet_xla_logs

__version__ = "0.1.0"

quiet_xla_logs()
enable_compilation_cache()
