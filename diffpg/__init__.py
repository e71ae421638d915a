"""diffpg: REINFORCE, critic backprop and backprop through physics (SHAC/BPTT) behind one policy
and one environment interface, so their gradients can be compared on the same states.

Importing ``diffpg`` turns on JAX's persistent compilation cache (``diffpg.compilation_cache``).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA C++ warnings (cache loads) are noise

from diffpg.compilation_cache import enable_compilation_cache  # noqa: E402

__version__ = "0.1.0"

enable_compilation_cache()
