"""jnn.testing: the harness passes on correct models and fails on a broken gradient."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnn
from tests._tiny import TinyBNDropout, TinyMLP


def _batch(n=8, features=5, classes=3):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, classes, n).astype(np.int32)


def test_harness_passes_on_correct_models():
    x, y = _batch()
    jnn.testing.check_model(TinyBNDropout(), x, y)
    jnn.testing.check_gradients_float64(lambda dtype: TinyMLP(width=4, dtype=dtype), x, y)


def test_gradient_check_covers_dropout_and_batchnorm_in_training_mode():
    x, y = _batch()

    class Net(nn.Module):
        dtype: jnp.dtype = jnp.float32

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(4, dtype=self.dtype, param_dtype=self.dtype, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, param_dtype=self.dtype)(x)
            x = nn.Dropout(0.5, deterministic=not train)(nn.tanh(x))
            return nn.Dense(3, dtype=self.dtype, param_dtype=self.dtype)(x)

    jnn.testing.check_gradients_float64(lambda dtype: Net(dtype=dtype), x, y)


def test_gradient_check_catches_a_wrong_gradient():
    x, y = _batch()

    @jax.custom_vjp
    def bad_tanh(z):
        return jnp.tanh(z)

    bad_tanh.defvjp(lambda z: (jnp.tanh(z), z), lambda z, g: (g * 0.5 * (1 - jnp.tanh(z) ** 2),))  # half the truth

    class Broken(nn.Module):
        dtype: jnp.dtype = jnp.float32

        @nn.compact
        def __call__(self, x):
            h = bad_tanh(nn.Dense(4, dtype=self.dtype, param_dtype=self.dtype)(x))
            return nn.Dense(3, dtype=self.dtype, param_dtype=self.dtype)(h)

    with pytest.raises(AssertionError, match="central differences"):
        jnn.testing.check_gradients_float64(lambda dtype: Broken(dtype=dtype), x, y)


def test_gradient_check_refuses_big_models():
    x, y = _batch()
    with pytest.raises(ValueError, match="expected at most 10"):
        jnn.testing.check_gradients_float64(lambda dtype: TinyMLP(dtype=dtype), x, y, max_params=10)
