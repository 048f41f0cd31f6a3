"""ViT: published parameter counts, shapes, errors, gradients, precision, training."""
import chex
import jax
import jax.numpy as jnp
import pytest

import _zoo_helpers as zh
from tests import tolerances as tol
from jnn import models

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

# timm's vit_{tiny,small,base}_patch16_224 with 1000 classes.
PARAMS = {"vit_tiny": 5_717_416, "vit_small": 22_050_664, "vit_base": 86_567_656}
# Patch embedding + class token + positions + blocks (12C^2 + 13C with a 2C MLP) + ln + head.
PARAMS["vit_digits"] = (2 * 2 * 32 + 32) + 32 + 17 * 32 + 2 * (8 * 32 * 32 + 11 * 32) + 64 + 330
PARAMS["vit_cifar_tiny"] = ((4 * 4 * 3 * 64 + 64) + 64 + 65 * 64 + 4 * (8 * 64 * 64 + 11 * 64)
                            + 128 + 650)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_preset_sizes_and_shapes(name):
    out, variables = zh.abstract_init(models.get(name), models.input_spec(name, batch_size=1))
    assert zh.count(variables["params"]) == PARAMS[name]
    chex.assert_shape(out, (1, 10 if name in ("vit_digits", "vit_cifar_tiny") else 1000))


def test_vit_digits_forward_jit_and_eager():
    model = models.get("vit_digits")
    x = models.example_input("vit_digits", batch_size=2)
    chex.assert_shape(zh.assert_jit_matches(model, zh.init(model, x), x), (2, 10))


@pytest.mark.parametrize("shape,match", [
    ((2, 8, 8, 3), r"ViT expected input of shape \(B, 8, 8, 1\), received \(2, 8, 8, 3\)"),
    ((2, 16, 16, 1), r"received \(2, 16, 16, 1\)"),
    ((8, 8, 1), r"received \(8, 8, 1\)"),
])
def test_bad_input_raises(shape, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(models.get("vit_digits").init, zh.key(), jnp.zeros(shape))


def test_gradients_float64():
    with jax.enable_x64(True):
        model = models.ViT(num_classes=3, image_size=4, patch_size=2, in_channels=1, embed_dim=4,
                           num_layers=1, num_heads=2, mlp_dim=4, dtype=jnp.float64,
                           param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1), jnp.float64)
        params = zh.init(model, x)["params"]
        zh.check_vjp(lambda p: model.apply({"params": p}, x), params)


def test_bf16_close_to_f32_and_trains():
    x, y = zh.digits(64)
    model = models.get("vit_digits")
    params = zh.init(model, x)["params"]
    out = zh.apply(models.get("vit_digits", dtype=jnp.bfloat16), {"params": params}, x)
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(out, zh.apply(model, {"params": params}, x), rtol=tol.BF16_RTOL,
                                atol=tol.BF16_ATOL)
    first, last = zh.train(lambda p, r: zh.cross_entropy(model.apply({"params": p}, x), y),
                           params, steps=40, learning_rate=3e-3)
    assert last < tol.TRAIN_LOSS_RATIO * first, (first, last)
