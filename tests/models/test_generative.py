"""VAE and elbo_loss: shapes, size, latent rng, loss value, gradients, training."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _zoo_helpers as zh
from tests import tolerances as tol
from jnn import models

SMALL = dict(image_shape=(8, 8, 1), hidden_sizes=(16,), latent_dim=3)


def test_vae_mnist_size_and_shapes():
    # PyTorch examples/vae: 784*400+400 + 2*(400*20+20) + 20*400+400 + 400*784+784
    model = models.get("vae_mnist")
    (logits, mean, logvar), variables = zh.abstract_init(model, models.input_spec("vae_mnist"))
    assert zh.count(variables["params"]) == 652_824
    chex.assert_shape([logits, mean, logvar], [(2, 28, 28, 1), (2, 20), (2, 20)])


def test_latent_rng_sampling_only_in_training():
    model = models.get("vae_mnist", **SMALL)
    x = jnp.asarray(models.example_input("vae_mnist", batch_size=2, **SMALL))
    variables = zh.init(model, x)
    evaluated = zh.assert_jit_matches(model, variables, x)  # no rng needed: z = mean
    decoded = zh.apply(model, variables, evaluated[1], method=models.VAE.decode)
    chex.assert_trees_all_close(decoded, evaluated[0], rtol=tol.F32_RTOL, atol=tol.F32_ATOL)
    a = zh.apply(model, variables, x, train=True, rngs={models.LATENT_RNG: zh.key(1)})
    b = zh.apply(model, variables, x, train=True, rngs={"latent": zh.key(2)})
    chex.assert_trees_all_equal(a[1:], b[1:])  # the posterior does not depend on the sample
    assert not np.allclose(a[0], b[0]) and not np.allclose(a[0], evaluated[0])
    with pytest.raises(Exception, match="latent"):
        model.apply(variables, x, train=True)


def test_elbo_loss_value():
    logits = jnp.array([[[[0.0], [2.0]]]])  # (1, 1, 2, 1)
    images = jnp.array([[[[1.0], [0.0]]]])
    mean, logvar = jnp.array([[0.5, -1.0]]), jnp.array([[0.0, np.log(2.0)]])
    recon = np.log(2.0) + np.log1p(np.exp(2.0))  # -log sigmoid(0) - log(1 - sigmoid(2))
    kl = 0.5 * (0.25 + 0.0) + 0.5 * (2.0 + 1.0 - 1.0 - np.log(2.0))
    loss = models.elbo_loss((logits, mean, logvar), images)
    chex.assert_shape(loss, (1,))
    chex.assert_trees_all_close(loss, jnp.array([recon + kl]), rtol=tol.F32_RTOL,
                                atol=tol.F32_ATOL)
    with pytest.raises(ValueError, match=r"elbo_loss expected labels of shape \(1, 1, 2, 1\)"):
        models.elbo_loss((logits, mean, logvar), images[..., 0])


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"VAE expected input of shape \(B, 28, 28, 1\), "
                                         r"received \(2, 784\)"):
        jax.eval_shape(models.get("vae_mnist").init, zh.key(), jnp.zeros((2, 784)))


def test_gradients_float64():
    with jax.enable_x64(True):
        model = models.VAE(image_shape=(2, 2, 1), hidden_sizes=(3,), latent_dim=2,
                           dtype=jnp.float64, param_dtype=jnp.float64)
        x = jax.random.uniform(jax.random.key(0), (2, 2, 2, 1), jnp.float64)
        params = zh.init(model, x)["params"]
        rngs = {"latent": jax.random.key(1)}
        zh.check_vjp(lambda p: models.elbo_loss(
            model.apply({"params": p}, x, train=True, rngs=rngs), x), params)


def test_bf16_and_training_lowers_the_elbo():
    x, _ = zh.digits(128)
    x = (x > 0.5).astype(np.float32)  # binarised digits, (128, 8, 8, 1)
    model = models.VAE(**SMALL)
    params = zh.init(model, x)["params"]
    bf16 = zh.apply(models.VAE(dtype=jnp.bfloat16, **SMALL), {"params": params}, x)
    chex.assert_trees_all_close(bf16, zh.apply(model, {"params": params}, x),
                                rtol=tol.BF16_RTOL, atol=tol.BF16_ATOL)

    def loss(p, rng):
        out = model.apply({"params": p}, x, train=True, rngs={"latent": rng})
        return models.elbo_loss(out, x).mean()

    first, last = zh.train(loss, params, steps=100, learning_rate=1e-2)
    assert last < 0.7 * first, (first, last)  # 64 pixels x log 2 nats at the start
