"""DCGAN generator and discriminator (Radford et al. 2016), as in the TensorFlow DCGAN tutorial.

Generator: Dense(S/4 * S/4 * 256, no bias) -> BN -> LeakyReLU -> ConvT 128@5x5/1 -> BN ->
LeakyReLU -> ConvT 64@5x5/2 -> BN -> LeakyReLU -> ConvT C@5x5/2 -> tanh, for S = 28 (MNIST) or
32 (CIFAR-10). Discriminator: Conv 64@5x5/2 -> LeakyReLU -> dropout -> Conv 128@5x5/2 ->
LeakyReLU -> dropout -> flatten -> Dense(1). Keras initialisation (Glorot uniform, zero biases)
and Keras BatchNorm defaults (momentum 0.99, epsilon 1e-3).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jnn.models._init import keras_kernel_init
from jnn.models._io import check_shape, output_dtype


class Generator(nn.Module):
    """DCGAN generator.

    Input: (B, latent_dim) floats (noise, e.g. standard normal). Output: (B, image_size,
    image_size, channels) images in [-1, 1] (tanh). BatchNorm updates ``batch_stats`` when
    ``train=True``.

    Attributes:
      image_size: output height and width; must be divisible by 4 (28 or 32).
      channels: output channels (1 for MNIST, 3 for CIFAR-10).
      latent_dim: noise width.
      features: channels of the three feature maps, coarsest first.
      negative_slope: LeakyReLU slope (Keras default 0.3).
      bn_axis_name: mapped axis to average batch statistics over (pmap/shard_map).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    image_size: int = 28
    channels: int = 1
    latent_dim: int = 100
    features: Sequence[int] = (256, 128, 64)
    negative_slope: float = 0.3
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        if self.image_size % 4:
            raise ValueError(f"Generator expected image_size divisible by 4, "
                             f"received {self.image_size}.")
        check_shape("Generator", z, ("B", self.latent_dim), "Pass noise of shape (batch, latent).")
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.99,  # noqa: E731
                                         epsilon=1e-3, axis_name=self.bn_axis_name,
                                         dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        act = lambda y: nn.leaky_relu(y, self.negative_slope)  # noqa: E731
        s, f0 = self.image_size // 4, self.features[0]
        x = nn.Dense(s * s * f0, use_bias=False, kernel_init=keras_kernel_init, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="project")(z.astype(self.dtype))
        x = act(norm("bn_0")(x))
        x = jnp.reshape(x, (z.shape[0], s, s, f0))  # (B, S/4, S/4, F0)
        strides = (1, 2, 2)
        widths = (*self.features[1:], self.channels)
        for i, (width, stride) in enumerate(zip(widths, strides)):
            x = nn.ConvTranspose(width, (5, 5), (stride, stride), padding="SAME", use_bias=False,
                                 kernel_init=keras_kernel_init, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"deconv_{i}")(x)
            if i < len(widths) - 1:
                x = act(norm(f"bn_{i + 1}")(x))
        return jnp.tanh(x).astype(output_dtype(self.dtype))  # (B, S, S, C)


class Discriminator(nn.Module):
    """DCGAN discriminator.

    Input: (B, image_size, image_size, channels) floats in [-1, 1], NHWC. Output: (B,) logits
    (real vs fake).

    Attributes:
      image_size: input height and width.
      channels: input channels.
      features: channels of the strided convolutions.
      dropout_rate: dropout after each convolution (training only, rng ``"dropout"``).
      negative_slope: LeakyReLU slope (Keras default 0.3).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    image_size: int = 28
    channels: int = 1
    features: Sequence[int] = (64, 128)
    dropout_rate: float = 0.3
    negative_slope: float = 0.3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_shape("Discriminator", x, ("B", self.image_size, self.image_size, self.channels),
                    "Images are NHWC.")
        x = x.astype(self.dtype)
        for i, width in enumerate(self.features):
            x = nn.Conv(width, (5, 5), (2, 2), padding="SAME", kernel_init=keras_kernel_init,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv_{i}")(x)
            x = nn.leaky_relu(x, self.negative_slope)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = jnp.reshape(x, (x.shape[0], -1))  # (B, H' * W' * C')
        x = nn.Dense(1, kernel_init=keras_kernel_init, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="head")(x)  # (B, 1)
        return x[:, 0].astype(output_dtype(self.dtype))  # (B,)
