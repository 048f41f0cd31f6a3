"""DCGAN generator and discriminator: sizes, shapes, BatchNorm, gradients, training."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _zoo_helpers as zh
from tests import tolerances as tol
from jnn import models

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

# TensorFlow's DCGAN tutorial model.summary(): generator 2,330,944 total of which 25,472 are
# BatchNorm moving statistics; discriminator 212,865.
PARAMS = {"dcgan_mnist_generator": 2_305_472, "dcgan_mnist_discriminator": 212_865,
          "dcgan_cifar_generator": 100 * 8 * 8 * 256 + 2 * 8 * 8 * 256 + 819_200 + 256
          + 204_800 + 128 + 5 * 5 * 64 * 3,
          "dcgan_cifar_discriminator": 5 * 5 * 3 * 64 + 64 + 204_928 + 8 * 8 * 128 + 1}
OUT = {"dcgan_mnist_generator": (2, 28, 28, 1), "dcgan_cifar_generator": (2, 32, 32, 3),
       "dcgan_mnist_discriminator": (2,), "dcgan_cifar_discriminator": (2,)}
SMALL_G = dict(image_size=8, channels=1, latent_dim=4, features=(8, 4, 4))
SMALL_D = dict(image_size=8, channels=1, features=(4, 8))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_preset_sizes_and_shapes(name):
    out, variables = zh.abstract_init(models.get(name), models.input_spec(name, batch_size=2))
    assert zh.count(variables["params"]) == PARAMS[name]
    chex.assert_shape(out, OUT[name])


def test_generator_batchnorm_and_range():
    model = models.Generator(**SMALL_G)
    z = jax.random.normal(jax.random.key(0), (4, 4))
    variables = zh.init(model, z)
    images = zh.assert_jit_matches(model, variables, z)
    chex.assert_shape(images, (4, 8, 8, 1))
    assert float(jnp.abs(images).max()) <= 1.0
    _, updates = zh.apply(model, variables, z, train=True, mutable=["batch_stats"])
    assert not np.allclose(updates["batch_stats"]["bn_0"]["mean"],
                           variables["batch_stats"]["bn_0"]["mean"])


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"Generator expected input of shape \(B, 100\), "
                                         r"received \(2, 64\)"):
        jax.eval_shape(models.get("dcgan_mnist_generator").init, zh.key(), jnp.zeros((2, 64)))
    with pytest.raises(ValueError, match=r"Discriminator expected .*\(B, 32, 32, 3\)"):
        jax.eval_shape(models.get("dcgan_cifar_discriminator").init, zh.key(),
                       jnp.zeros((2, 28, 28, 1)))


def test_gradients_float64():
    with jax.enable_x64(True):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        gen = models.Generator(image_size=4, channels=1, latent_dim=2, features=(2, 2, 2), **f64)
        z = jax.random.normal(jax.random.key(0), (3, 2), jnp.float64)
        variables = zh.init(gen, z)
        zh.check_vjp(lambda p: gen.apply({**variables, "params": p}, z, train=True,
                                         mutable=["batch_stats"])[0], variables["params"])
        disc = models.Discriminator(image_size=4, channels=1, features=(2, 2), **f64)
        x = jax.random.normal(jax.random.key(1), (3, 4, 4, 1), jnp.float64)
        params = zh.init(disc, x)["params"]
        zh.check_vjp(lambda p: disc.apply({"params": p}, x), params)


def test_adversarial_training_steps():
    # The discriminator learns to tell digits from a fixed generator's samples; then the
    # generator learns to fool the trained discriminator. Both need working gradients.
    real, _ = zh.digits(64)
    real = 2 * real - 1  # [-1, 1] like the generator's tanh
    gen, disc = models.Generator(**SMALL_G), models.Discriminator(**SMALL_D)
    z = jax.random.normal(jax.random.key(0), (64, 4))
    g_vars = zh.init(gen, z)
    fake = zh.apply(gen, g_vars, z)
    d_params = zh.init(disc, real)["params"]
    x = jnp.concatenate([real, fake])
    labels = jnp.concatenate([jnp.ones(64), jnp.zeros(64)])

    def d_loss(p, rng):
        logits = disc.apply({"params": p}, x, train=True, rngs={"dropout": rng})
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    first, last = zh.train(d_loss, d_params, steps=40, learning_rate=1e-2)
    assert last < tol.TRAIN_LOSS_RATIO * first, (first, last)
