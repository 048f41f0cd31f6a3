"""MLP: preset shape and size, dropout, errors, gradients, precision, training."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _zoo_helpers as zh
from tests import tolerances as tol
from jnn import models


def test_mlp_mnist_shape_and_jit():
    model = models.get("mlp_mnist")
    x = models.example_input("mlp_mnist", batch_size=3)  # (3, 28, 28, 1)
    variables = zh.init(model, x)
    logits = zh.assert_jit_matches(model, variables, x)
    chex.assert_shape(logits, (3, 10))
    # A flat (B, 784) input gives the same logits as the (B, 28, 28, 1) image.
    flat = zh.apply(model, variables, x.reshape(3, 784))
    chex.assert_trees_all_close(flat, logits, rtol=tol.JIT_RTOL, atol=tol.JIT_ATOL)


def test_mlp_mnist_param_count():
    # 784*128+128 + 128*64+64 + 64*10+10
    assert zh.param_count(models.get("mlp_mnist"), jnp.zeros((1, 784))) == 109_386


def test_torch_init_bounds():
    variables = zh.init_compiled(models.get("mlp_mnist"), jnp.zeros((1, 784)))
    kernel = variables["params"]["dense_0"]["kernel"]
    bias = variables["params"]["dense_0"]["bias"]
    bound = 1 / np.sqrt(784)  # PyTorch nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(jnp.abs(kernel).max()) <= bound and float(jnp.abs(bias).max()) <= bound
    assert float(jnp.abs(kernel).max()) > 0.9 * bound


def test_dropout_only_in_training():
    model = models.MLP(hidden_sizes=(32,), dropout_rate=0.5)
    x = jnp.ones((4, 16))
    variables = zh.init(model, x)
    eval_a = zh.apply(model, variables, x)
    eval_b = zh.apply(model, variables, x, train=False, rngs={"dropout": zh.key(1)})
    chex.assert_trees_all_equal(eval_a, eval_b)
    train_a = zh.apply(model, variables, x, train=True, rngs={"dropout": zh.key(1)})
    train_b = zh.apply(model, variables, x, train=True, rngs={"dropout": zh.key(2)})
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)


def test_bad_input_raises():
    model = models.get("mlp_mnist")
    with pytest.raises(ValueError, match=r"MLP expected input of shape \(B, 784\).*\(2, 100\)"):
        model.init(zh.key(0), jnp.zeros((2, 100)))
    with pytest.raises(ValueError, match=r"MLP expected .*received \(784,\)"):
        model.init(zh.key(0), jnp.zeros((784,)))
    with pytest.raises(ValueError, match="activation must be one of"):
        models.MLP(activation="swishy").init(zh.key(0), jnp.zeros((2, 4)))


def test_gradients_float64():
    with jax.enable_x64(True):
        model = models.MLP(hidden_sizes=(5, 4), num_classes=3, activation="tanh",
                           dtype=jnp.float64, param_dtype=jnp.float64)
        x = jax.random.normal(zh.key(0), (3, 2, 3), jnp.float64)
        params = zh.init(model, x)["params"]
        zh.check_vjp(lambda p: model.apply({"params": p}, x), params)
        zh.check_vjp(lambda x: model.apply({"params": params}, x), x)


def test_bf16_compute_keeps_f32_params():
    x = models.example_input("mlp_mnist", batch_size=4)
    f32 = models.get("mlp_mnist")
    bf16 = models.get("mlp_mnist", dtype=jnp.bfloat16)
    variables = zh.init(bf16, x)
    assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = zh.apply(bf16, variables, x)
    assert out.dtype == jnp.float32  # logits come back at full precision
    chex.assert_trees_all_close(out, zh.apply(f32, variables, x), rtol=tol.BF16_RTOL,
                                atol=tol.BF16_ATOL)


def test_trains_on_digits():
    x, y = zh.digits()
    model = models.MLP(hidden_sizes=(64,), in_features=64)
    params = zh.init(model, x)["params"]
    first, last = zh.train(lambda p, rng: zh.cross_entropy(model.apply({"params": p}, x), y),
                           params, steps=100)
    assert last < tol.TRAIN_LOSS_RATIO * first and last < 0.3, (first, last)
