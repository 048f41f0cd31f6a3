"""ResNet: published parameter counts, shapes, BatchNorm behaviour, gradients, training."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _zoo_helpers as zh
from tests import tolerances as tol
from jnn import models

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

# Option A (zero-padding shortcuts, He et al.) has no shortcut parameters: ResNet-20 has 269,722
# (as the widely used akamaster/pytorch_resnet_cifar10 prints). The 272,474 sometimes quoted is
# option B: + 2,752 for the two 1x1 projection convolutions and their BatchNorms.
CIFAR_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet56": 853_018}
# torchvision's counts (BatchNorm scale and bias included, running statistics not).
IMAGENET_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}

TINY = dict(stage_sizes=(1, 1, 1), widths=(4, 8, 16))


@pytest.fixture(scope="module")
def tiny():
    """A 3-stage CIFAR ResNet with one block per stage, its input and its variables."""
    model = models.get("resnet20", **TINY)
    x = models.example_input("resnet20", batch_size=4)
    return model, x, zh.init(model, x)


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS) + sorted(IMAGENET_PARAMS))
def test_published_param_counts(name):
    x = models.input_spec(name, batch_size=1)
    out, variables = zh.abstract_init(models.get(name), x)
    assert zh.count(variables["params"]) == {**CIFAR_PARAMS, **IMAGENET_PARAMS}[name]
    chex.assert_shape(out, (1, 10 if name in CIFAR_PARAMS else 1000))
    # A running mean and variance for every BatchNorm scale and bias.
    assert zh.count(variables["batch_stats"]) == zh.count(
        [v for path, v in jax.tree_util.tree_leaves_with_path(variables["params"])
         if "bn" in jax.tree_util.keystr(path)])


def test_option_b_shortcuts():
    x = models.input_spec("resnet20", batch_size=1)
    assert zh.param_count(models.get("resnet20", shortcut="B"), x) == 272_474


def test_forward_jit_and_eager(tiny):
    model, x, variables = tiny
    chex.assert_shape(zh.assert_jit_matches(model, variables, x), (4, 10))


def test_imagenet_stem_bottleneck_tiny():
    model = models.get("resnet50", num_classes=5, stage_sizes=(1, 1), widths=(4, 8))
    x = models.example_input("resnet50", batch_size=2)[:, :32, :32]  # (2, 32, 32, 3)
    out = zh.apply(model, zh.init(model, x), x)
    chex.assert_shape(out, (2, 5))


def test_batchnorm_stats_update_only_in_training(tiny):
    model, x, variables = tiny
    out, updates = zh.apply(model, variables, x, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                           updates["batch_stats"])
    assert all(jax.tree.leaves(changed))
    # Evaluation reads the running averages and needs no mutable collection.
    chex.assert_shape(zh.apply(model, variables, x, train=False), (4, 10))
    # momentum 0.9: new running mean = 0.9 * 0 + 0.1 * batch mean.
    stem_mean = updates["batch_stats"]["stem_bn"]["mean"]
    assert float(jnp.abs(stem_mean).max()) > 0


def test_bn_axis_name_syncs_statistics(tiny):
    local, x, variables = tiny
    model = models.get("resnet20", bn_axis_name="devices", **TINY)
    full, full_stats = zh.apply(local, variables, x, train=True, mutable=["batch_stats"])
    shards = x.reshape(2, 2, *x.shape[1:])  # (devices, B/devices, H, W, C)
    fn = jax.vmap(lambda xs: model.apply(variables, xs, train=True, mutable=["batch_stats"]),
                  axis_name="devices")
    synced, synced_stats = jax.jit(fn)(shards)
    chex.assert_trees_all_close(synced.reshape(full.shape), full, rtol=tol.F32_RTOL,
                                atol=tol.F32_ATOL)
    chex.assert_trees_all_close(jax.tree.map(lambda s: s[0], synced_stats), full_stats,
                                rtol=tol.F32_RTOL, atol=tol.F32_ATOL)


def test_init_matches_torchvision(tiny):
    params = zh.init_compiled(tiny[0], tiny[1])["params"]
    kernel = params["stage3_block1"]["conv2"]["kernel"]  # (3, 3, 16, 16)
    expected_std = np.sqrt(2 / (3 * 3 * 16))  # Kaiming normal, fan_out, ReLU gain
    assert abs(float(kernel.std()) - expected_std) < 0.2 * expected_std
    chex.assert_trees_all_equal(params["stage1_block1"]["bn1"]["scale"], jnp.ones(4))
    zero = models.ResNet(stage_sizes=(1,), widths=(2,), stem="cifar", zero_init_residual=True)
    params = zh.init_compiled(zero, jnp.zeros((1, 4, 4, 3)))["params"]
    chex.assert_trees_all_equal(params["stage1_block1"]["bn2"]["scale"], jnp.zeros(2))


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"ResNet expected input of shape \(B, H, W, 3\), "
                                         r"received \(2, 32, 32, 1\)"):
        jax.eval_shape(models.get("resnet20").init, zh.key(), jnp.zeros((2, 32, 32, 1)))
    with pytest.raises(ValueError, match=r"received \(32, 32, 3\)"):
        jax.eval_shape(models.get("resnet18").init, zh.key(), jnp.zeros((32, 32, 3)))


def test_gradients_float64_training_mode():
    with jax.enable_x64(True):
        model = models.ResNet(stage_sizes=(1, 1), widths=(2, 4), stem="cifar", shortcut="B",
                              num_classes=3, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(0), (4, 4, 4, 3), jnp.float64)
        variables = zh.init(model, x)

        def fn(params):
            out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                 train=True, mutable=["batch_stats"])
            return out

        zh.check_vjp(fn, variables["params"])


def test_bf16_close_to_f32(tiny):
    f32, x, variables = tiny
    out = zh.apply(models.get("resnet20", dtype=jnp.bfloat16, **TINY), variables, x)
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(out, zh.apply(f32, variables, x), rtol=tol.BF16_RTOL,
                                atol=tol.BF16_ATOL)


def test_trains_on_digits():
    x, y = zh.digits(128)
    model = models.get("resnet20", in_channels=1, **TINY)
    variables = zh.init(model, x)

    def loss(params, rng):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
        return zh.cross_entropy(logits, y)

    first, last = zh.train(loss, variables["params"], steps=40, learning_rate=1e-2)
    assert last < tol.TRAIN_LOSS_RATIO * first, (first, last)
