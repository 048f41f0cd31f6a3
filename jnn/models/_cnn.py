"""Small convolutional classifiers: a configurable CNN, LeNet-5 and the digits CNN."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jnn import layers
from jnn.models._init import layer_inits
from jnn.models._io import check_shape, output_dtype


class CNN(nn.Module):
    """Conv (-> ReLU -> max-pool 2) stack, flatten, ReLU dense layers, linear head.

    Input: (B, H, W, in_channels) floats, NHWC. Output: (B, num_classes) logits, or
    log-probabilities when ``log_softmax`` is set.

    Attributes:
      features: output channels of each convolution.
      kernel_size: square kernel size of every convolution.
      padding: ``"VALID"`` or ``"SAME"``.
      pools: per convolution, whether a 2x2 max-pool follows it (default: after every conv).
      hidden_sizes: widths of the dense layers between the flatten and the head.
      num_classes: output width.
      dropout_rate: dropout after each hidden dense layer (training only, rng ``"dropout"``).
      log_softmax: return log-probabilities instead of logits.
      in_channels: expected input channels (checked).
      image_size: expected (H, W), checked when set (the dense layer fixes it after init).
      init_scheme: ``"torch"``, ``"keras"`` or ``"flax"`` (see ``jnn.models._init``).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    features: Sequence[int] = (32, 64)
    kernel_size: int = 3
    padding: str = "VALID"
    pools: Sequence[bool] | None = None
    hidden_sizes: Sequence[int] = (128,)
    num_classes: int = 10
    dropout_rate: float = 0.0
    log_softmax: bool = False
    in_channels: int = 1
    image_size: tuple[int, int] | None = None
    init_scheme: str = "torch"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        name = type(self).__name__
        h, w = self.image_size if self.image_size is not None else ("H", "W")
        check_shape(name, x, ("B", h, w, self.in_channels), "Images are NHWC.")
        pools = self.pools if self.pools is not None else (True,) * len(self.features)
        if len(pools) != len(self.features):
            raise ValueError(
                f"{name} expected one pools entry per convolution ({len(self.features)}), "
                f"received {len(pools)}."
            )
        x = x.astype(self.dtype)
        k = self.kernel_size
        for i, (feat, pool) in enumerate(zip(self.features, pools)):
            x = layers.Conv(feat, (k, k), padding=self.padding, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"conv_{i}",
                        **layer_inits(self.init_scheme, k * k * x.shape[-1]))(x)
            x = nn.relu(x)
            if pool:
                x = layers.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))  # (B, H' * W' * C')
        for i, width in enumerate(self.hidden_sizes):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f"dense_{i}", **layer_inits(self.init_scheme, x.shape[-1]))(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="head", **layer_inits(self.init_scheme, x.shape[-1]))(x)  # (B, K)
        x = x.astype(output_dtype(self.dtype))
        return jax.nn.log_softmax(x) if self.log_softmax else x


class LeNet5(CNN):
    """LeNet-5 as in the PyTorch CIFAR-10 tutorial.

    conv 6@5x5 -> ReLU -> max-pool 2 -> conv 16@5x5 -> ReLU -> max-pool 2 -> 120 -> 84 -> classes,
    VALID padding, PyTorch default initialisation. Input: (B, 32, 32, 3) floats, NHWC.
    Output: (B, num_classes) logits.
    """

    features: Sequence[int] = (6, 16)
    kernel_size: int = 5
    hidden_sizes: Sequence[int] = (120, 84)
    in_channels: int = 3
    image_size: tuple[int, int] | None = (32, 32)


class DigitsCNN(CNN):
    """The default model of ``jnn train``: small but strong on scikit-learn's 8x8 digits.

    conv 32@3x3 SAME -> ReLU -> conv 64@3x3 SAME -> ReLU -> max-pool 2 -> dense 128 -> ReLU ->
    dropout -> classes. Input: (B, 8, 8, 1) floats, NHWC. Output: (B, num_classes) logits.
    """

    features: Sequence[int] = (32, 64)
    padding: str = "SAME"
    pools: Sequence[bool] | None = (False, True)
    hidden_sizes: Sequence[int] = (128,)
    dropout_rate: float = 0.25
    image_size: tuple[int, int] | None = (8, 8)
    init_scheme: str = "flax"
