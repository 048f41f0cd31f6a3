"""Tiny flax.linen models for the core tests: a research user's own modules, not jnn's zoo."""
import flax.linen as nn
import jax.numpy as jnp


class TinyMLP(nn.Module):
    """(B, F) -> (B, classes); no train flag, no model state: the plainest user model."""

    classes: int = 3
    width: int = 16
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.width, dtype=self.dtype, param_dtype=self.dtype)(x))
        return nn.Dense(self.classes, dtype=self.dtype, param_dtype=self.dtype)(x)


class TinyBNDropout(nn.Module):
    """(B, F) -> (B, classes) with BatchNorm (model state) and dropout (rng) behind `train`."""

    classes: int = 3
    width: int = 16
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.width)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(self.classes)(x)


class TinyNnxLinear:  # built lazily: a flax.nnx module class (one Linear on flattened inputs)
    def __new__(cls, features_in: int = 64, classes: int = 10, seed: int = 0):
        from flax import nnx

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.dense = nnx.Linear(features_in, classes, rngs=rngs)

            def __call__(self, x):
                return self.dense(x.reshape(len(x), -1))

        return Net(nnx.Rngs(seed))
