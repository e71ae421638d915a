"""diffpg: REINFORCE, critic backprop and backprop through physics (SHAC/BPTT) behind one policy
and one environment interface, so their gradients can be compared on the same states.

Importing ``diffpg`` turns on JAX's persistent compilation cache (``diffpg.compilation_cache``).
"""

import os

# XLA C++ log lines (e.g. CPU feature notes when loading cached executables) are noise to users;
# set TF_CPP_MIN_LOG_LEVEL yourself to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from diffpg.compilation_cache import enable_compilation_cache  # noqa: E402

__version__ = "0.1.0"

enable_compilation_cache()
