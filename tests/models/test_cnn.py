"""CNN, LeNet-5 and the digits CNN: preset shapes and sizes, errors, gradients, training."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _zoo_helpers as zh
from tests import tolerances as tol
from jnn import models

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

# Trainable parameters, counted by hand from the reference architectures.
PARAMS = {
    "lenet5": 62_006,  # the PyTorch CIFAR-10 tutorial prints the same
    "cnn_keras_mnist": 843_658,  # 320 + 18,496 + 1600*512+512 + 5,130
    "cnn_cifar": 315_722,  # 896 + 18,496 + 2304*128+128 + 1,290
    "digits_cnn": 151_306,  # 320 + 18,496 + 1024*128+128 + 1,290
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_preset_shape_size_and_jit(name):
    model = models.get(name)
    x = models.example_input(name, batch_size=2)
    assert zh.param_count(model, x) == PARAMS[name]
    out = zh.assert_jit_matches(model, zh.init(model, x), x)
    chex.assert_shape(out, (2, 10))


def test_cnn_cifar_returns_log_probs():
    model = models.get("cnn_cifar")
    x = models.example_input("cnn_cifar", batch_size=3)
    log_probs = zh.apply(model, zh.init(model, x), x)
    chex.assert_trees_all_close(jnp.exp(log_probs).sum(-1), jnp.ones(3), rtol=tol.F32_RTOL,
                                atol=tol.F32_ATOL)


def test_digits_cnn_overrides_and_dropout():
    model = models.get("digits_cnn", num_classes=4, dropout_rate=0.5)
    x = models.example_input("digits_cnn", batch_size=2)
    variables = zh.init(model, x)
    chex.assert_shape(zh.apply(model, variables, x), (2, 4))
    eval_out = zh.apply(model, variables, x, train=False, rngs={"dropout": zh.key(1)})
    chex.assert_trees_all_equal(eval_out, zh.apply(model, variables, x))
    train_out = zh.apply(model, variables, x, train=True, rngs={"dropout": zh.key(1)})
    assert not np.allclose(train_out, eval_out)


@pytest.mark.parametrize("name,shape,match", [
    ("lenet5", (2, 32, 32, 1), r"LeNet5 expected input of shape \(B, 32, 32, 3\), "
                               r"received \(2, 32, 32, 1\)"),
    ("lenet5", (2, 28, 28, 3), r"received \(2, 28, 28, 3\)"),
    ("digits_cnn", (2, 8, 8), r"DigitsCNN expected input of shape \(B, 8, 8, 1\)"),
    ("cnn_keras_mnist", (2, 1, 28, 28), r"CNN expected .*NHWC"),
])
def test_bad_input_raises(name, shape, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(models.get(name).init, zh.key(), jnp.zeros(shape))


def test_gradients_float64():
    with jax.enable_x64(True):
        model = models.CNN(features=(3, 4), pools=(True, False), hidden_sizes=(5,),
                           num_classes=3, padding="SAME", in_channels=2,
                           dtype=jnp.float64, param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2), jnp.float64)
        params = zh.init(model, x)["params"]
        zh.check_vjp(lambda p: model.apply({"params": p}, x), params)


def test_bf16_close_to_f32():
    x = models.example_input("lenet5", batch_size=4)
    f32 = models.get("lenet5")
    variables = zh.init(f32, x)
    out = zh.apply(models.get("lenet5", dtype=jnp.bfloat16), variables, x)
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(out, zh.apply(f32, variables, x), rtol=tol.BF16_RTOL,
                                atol=tol.BF16_ATOL)


def test_digits_cnn_trains():
    x, y = zh.digits(128)
    model = models.get("digits_cnn")
    params = zh.init(model, x)["params"]

    def loss(p, rng):
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
        return zh.cross_entropy(logits, y)

    first, last = zh.train(loss, params, steps=40, learning_rate=3e-3)
    assert last < tol.TRAIN_LOSS_RATIO * first and last < 0.3, (first, last)
