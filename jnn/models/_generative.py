"""Variational autoencoder (Kingma & Welling 2014) and its ELBO loss.

Sized as the PyTorch ``examples/vae`` model: 784 -> 400 -> (20, 20) -> 400 -> 784, PyTorch
default initialisation, Bernoulli likelihood on pixels in [0, 1].
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn

from jnn.models._init import layer_inits
from jnn.models._io import check_shape, output_dtype

# The rng stream the reparameterisation draws from: apply(..., rngs={"latent": key}).
LATENT_RNG = "latent"


class VAE(nn.Module):
    """MLP variational autoencoder with a diagonal Gaussian posterior.

    Input: ``(B, *image_shape)`` floats in [0, 1], NHWC. Output: a tuple
    ``(reconstruction_logits (B, *image_shape), mean (B, latent_dim), logvar (B, latent_dim))``.

    With ``train=True`` the latent is sampled by reparameterisation,
    ``z = mean + exp(logvar / 2) * eps``, with ``eps`` drawn from the rng stream ``"latent"``: pass
    ``rngs={"latent": key}`` to ``apply``. With ``train=False`` the decoder reads ``z = mean``, so
    evaluation is deterministic and needs no rng. ``decode`` maps latents to image logits (apply
    it with ``method=VAE.decode`` to generate from the prior).

    Attributes:
      image_shape: (H, W, C) of the images.
      hidden_sizes: encoder widths; the decoder mirrors them.
      latent_dim: size of the latent code.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    image_shape: tuple[int, int, int] = (28, 28, 1)
    hidden_sizes: Sequence[int] = (400,)
    latent_dim: int = 20
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dense(self, features: int, fan_in: int, name: str) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                        **layer_inits("torch", fan_in))

    def setup(self) -> None:
        pixels = math.prod(self.image_shape)
        widths = (pixels, *self.hidden_sizes)
        self.encoder = [self._dense(w, fan_in, f"enc_{i}")
                        for i, (fan_in, w) in enumerate(zip(widths[:-1], widths[1:]))]
        self.to_mean = self._dense(self.latent_dim, widths[-1], "mean")
        self.to_logvar = self._dense(self.latent_dim, widths[-1], "logvar")
        back = (self.latent_dim, *reversed(self.hidden_sizes), pixels)
        self.decoder = [self._dense(w, fan_in, f"dec_{i}")
                        for i, (fan_in, w) in enumerate(zip(back[:-1], back[1:]))]

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, C) images -> posterior (mean, logvar), each (B, latent_dim)."""
        h = jnp.reshape(x, (x.shape[0], -1)).astype(self.dtype)  # (B, H * W * C)
        for layer in self.encoder:
            h = nn.relu(layer(h))
        return self.to_mean(h), self.to_logvar(h)

    def decode(self, z: jax.Array) -> jax.Array:
        """(B, latent_dim) latents -> (B, H, W, C) Bernoulli logits."""
        h = z.astype(self.dtype)
        for layer in self.decoder[:-1]:
            h = nn.relu(layer(h))
        h = self.decoder[-1](h)  # (B, H * W * C)
        return jnp.reshape(h, (z.shape[0], *self.image_shape)).astype(output_dtype(self.dtype))

    def __call__(self, x: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        check_shape("VAE", x, ("B", *self.image_shape), "Images are NHWC floats in [0, 1].")
        mean, logvar = self.encode(x)  # (B, Z) each
        if train:
            eps = jax.random.normal(self.make_rng(LATENT_RNG), mean.shape, mean.dtype)
            z = mean + jnp.exp(0.5 * logvar) * eps
        else:
            z = mean
        out = output_dtype(self.dtype)
        return self.decode(z), mean.astype(out), logvar.astype(out)


def elbo_loss(outputs: tuple[jax.Array, jax.Array, jax.Array], labels: jax.Array) -> jax.Array:
    """Negative ELBO per example: Bernoulli reconstruction + KL(q(z|x) || N(0, I)).

    Args:
      outputs: ``(reconstruction_logits, mean, logvar)`` as returned by ``VAE``;
        logits (B, ...) and mean/logvar (B, Z).
      labels: the target images, (B, ...) like the logits, values in [0, 1].

    Returns:
      (B,) loss in nats: summed binary cross-entropy over pixels plus the analytic KL term.

    Raises:
      ValueError: targets and logits differ in shape.
    """
    logits, mean, logvar = outputs
    if labels.shape != logits.shape:
        raise ValueError(f"elbo_loss expected labels of shape {tuple(logits.shape)} (the target "
                         f"images), received {tuple(labels.shape)}.")
    b = logits.shape[0]
    bce = optax.losses.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
    recon = jnp.sum(jnp.reshape(bce, (b, -1)), axis=-1)  # (B,)
    kl = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=-1)  # (B,)
    return recon + kl
