"""Multi-layer perceptrons shared by policies and critics.

SHAC (Xu et al. 2022) uses ELU activations with LayerNorm after every hidden layer; SAPO uses SiLU.
Both are available by name so a setting can choose them without code.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffpg.envs.core import SettingError

ACTIVATIONS = {
    "elu": nn.elu,
    "relu": nn.relu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
}


def check_activation(name: str) -> None:
    """Raise a SettingError naming the allowed activations if ``name`` is not one."""
    if name not in ACTIVATIONS:
        raise SettingError(f"activation={name!r} is not known; allowed: {sorted(ACTIVATIONS)}")


class MLP(nn.Module):
    """``x [..., in] -> y [..., output_size]`` through ``hidden_sizes`` hidden layers.

    Each hidden layer is ``activation(LayerNorm(Dense(x)))`` when ``layer_norm`` is set (SHAC's
    networks), else ``activation(Dense(x))``. The output layer is linear; ``output_scale`` multiplies
    its initial weights so policies can start near zero mean.
    """

    hidden_sizes: Sequence[int]
    output_size: int
    activation: str = "elu"
    layer_norm: bool = True
    output_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for width in self.hidden_sizes:
            x = nn.Dense(width)(x)
            if self.layer_norm:
                x = nn.LayerNorm()(x)
            x = act(x)
        init = nn.initializers.variance_scaling(self.output_scale**2, "fan_avg", "uniform")
        return nn.Dense(self.output_size, kernel_init=init)(x)
