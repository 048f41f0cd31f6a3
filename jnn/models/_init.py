"""Initialisers that reproduce the reference frameworks' defaults.

A preset that claims to match a PyTorch or Keras reference must also start from the same
distribution, or its learning-rate recipe no longer transfers.

* PyTorch ``nn.Linear`` / ``nn.Conv2d``: ``kaiming_uniform_(a=sqrt(5))`` for the weight, which is
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias.
* Keras ``Dense`` / ``Conv2D``: Glorot uniform weight, zero bias.
* torchvision ResNet convolutions: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``.
* GPT-2 / nanoGPT: N(0, 0.02) weights, zero biases.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import flax.linen as nn

Scheme = Literal["torch", "keras", "flax"]
SCHEMES: tuple[str, ...] = ("torch", "keras", "flax")

# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1/(3 fan_in).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torchvision: He normal over fan_out (not truncated).
kaiming_fan_out_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
keras_kernel_init = nn.initializers.glorot_uniform()
flax_kernel_init = nn.initializers.lecun_normal()


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def layer_inits(scheme: str, fan_in: int) -> dict[str, Any]:
    """``kernel_init``/``bias_init`` keyword arguments for a Dense or Conv layer.

    Args:
      scheme: ``"torch"``, ``"keras"`` or ``"flax"``.
      fan_in: input features times the kernel's receptive field (only used by ``"torch"``).

    Raises:
      ValueError: unknown scheme.
    """
    if scheme == "torch":
        return {"kernel_init": torch_kernel_init, "bias_init": torch_bias_init(fan_in)}
    if scheme == "keras":
        return {"kernel_init": keras_kernel_init, "bias_init": nn.initializers.zeros}
    if scheme == "flax":
        return {"kernel_init": flax_kernel_init, "bias_init": nn.initializers.zeros}
    raise ValueError(f"init scheme must be one of {SCHEMES}, received {scheme!r}.")
