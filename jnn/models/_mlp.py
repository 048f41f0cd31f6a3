"""Multi-layer perceptron on flattened inputs."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jnn.models._init import layer_inits
from jnn.models._io import output_dtype

ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "silu", "tanh", "sigmoid", "elu", "leaky_relu")


def resolve_activation(activation: str | Callable[[jax.Array], jax.Array]) -> Callable:
    """Maps an activation name (as typed on the command line) to the ``jax.nn`` function.

    Raises:
      ValueError: unknown name.
    """
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {ACTIVATIONS} or a callable, received {activation!r}."
        )
    return getattr(jax.nn, activation)


class MLP(nn.Module):
    """Fully connected classifier: Dense -> activation (-> dropout) per hidden layer -> Dense.

    Input: (B, ...) floats; every axis after the batch is flattened, so (B, 784) and
    (B, 28, 28, 1) images both work. Output: (B, num_classes) logits.

    Attributes:
      hidden_sizes: widths of the hidden layers.
      num_classes: output width.
      activation: ``jax.nn`` activation name or callable.
      dropout_rate: dropout after each hidden activation (training only, rng ``"dropout"``).
      in_features: if set, the flattened input width is checked against it.
      init_scheme: ``"torch"`` (PyTorch nn.Linear default), ``"keras"`` or ``"flax"``.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    hidden_sizes: Sequence[int] = (128, 64)
    num_classes: int = 10
    activation: str | Callable[[jax.Array], jax.Array] = "relu"
    dropout_rate: float = 0.0
    in_features: int | None = None
    init_scheme: str = "torch"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim < 2:
            raise ValueError(
                f"MLP expected input of shape (B, F) or (B, ...), received {tuple(x.shape)}. "
                "Add a batch axis, e.g. x[None]."
            )
        features = math.prod(x.shape[1:])
        if self.in_features is not None and features != self.in_features:
            raise ValueError(
                f"MLP expected input of shape (B, {self.in_features}) (or any (B, ...) with "
                f"{self.in_features} values per example), received {tuple(x.shape)} "
                f"({features} values per example). Resize the input or set in_features."
            )
        act = resolve_activation(self.activation)
        x = jnp.reshape(x, (x.shape[0], features)).astype(self.dtype)  # (B, F)
        for i, width in enumerate(self.hidden_sizes):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f"dense_{i}", **layer_inits(self.init_scheme, x.shape[-1]))(x)
            x = act(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="head", **layer_inits(self.init_scheme, x.shape[-1]))(x)  # (B, K)
        return x.astype(output_dtype(self.dtype))
