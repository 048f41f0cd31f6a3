"""jnn.layers: the CPU formulations equal flax's layers in values and gradients; switches work."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from tests import tolerances as tol
from jnn import layers, models

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

# (input shape, window, strides, padding): non-overlapping (divisible or not), overlapping with
# padding (ResNet's stem pool), SAME, uneven windows, one spatial dim, and no batch dim.
POOL_CASES = [
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
    ((2, 9, 7, 3), (2, 2), (2, 2), "VALID"),
    ((2, 9, 9, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 7, 6, 3), (3, 3), (1, 1), "SAME"),
    ((2, 7, 8, 2), (2, 3), (1, 2), "SAME"),
    ((3, 11, 4), (3,), (2,), "VALID"),
    ((6, 6, 2), (2, 2), (2, 2), "VALID"),
]
POOLS = {"max": (layers.max_pool, nn.max_pool), "avg": (layers.avg_pool, nn.avg_pool)}
# (input shape, kernel size, strides, padding): 1 and 3 input channels (stacked taps), 6 (per
# tap), 20 (above the bound: XLA's own), stride 2 with PyTorch-style padding, 1x1, 1-D.
CONV_CASES = [
    ((2, 7, 7, 1), (3, 3), (1, 1), "VALID"),
    ((2, 8, 8, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 7, 6), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 6, 6, 6), (1, 1), (2, 2), "VALID"),
    ((2, 6, 6, 20), (3, 3), (1, 1), "SAME"),
    ((2, 9, 4), (3,), (1,), "SAME"),
]


# XLA:CPU spends far longer optimising these tiny programs than running them.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _random(shape, seed=0, dtype=jnp.float64):
    """Standard normal values drawn with numpy (jax.random would compile a program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _abstract_init(model, x):
    """(output, variables) as ShapeDtypeStructs."""
    return jax.eval_shape(model.init_with_output, jax.random.key(0), x)


def _value_and_vjp(fn, x, ct):
    """(fn(x), the VJP of ct), compiled in one program (op by op, every slice would compile)."""
    def value_and_vjp(x, ct):
        y, vjp = jax.vjp(fn, x)
        return y, vjp(ct)[0]

    return _jit(value_and_vjp)(x, ct)


@pytest.mark.parametrize("kind", sorted(POOLS))
@pytest.mark.parametrize("shape,window,strides,padding", POOL_CASES)
def test_pool_matches_flax_float64(kind, shape, window, strides, padding):
    fast, flax_pool = POOLS[kind]
    with jax.enable_x64(True):
        x = _random(shape)
        ct = _random(jax.eval_shape(lambda x: flax_pool(x, window, strides, padding), x).shape, seed=1)
        y, dx = _value_and_vjp(lambda x: fast(x, window, strides, padding, impl="fast"), x, ct)
        y_ref, dx_ref = _value_and_vjp(lambda x: flax_pool(x, window, strides, padding), x, ct)
        chex.assert_trees_all_close((y, dx), (y_ref, dx_ref), rtol=tol.GRAD_CHECK_RTOL, atol=tol.GRAD_CHECK_ATOL)
        if kind == "max":  # a maximum and its routing are exact
            chex.assert_trees_all_equal((y, dx), (y_ref, dx_ref))


@pytest.mark.parametrize("kind", sorted(POOLS))
def test_pool_check_grads_float64(kind):
    # Forward and reverse mode: the custom JVP keeps jax.jvp and jacfwd working.
    pool = functools.partial(POOLS[kind][0], window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                             impl="fast")
    with jax.enable_x64(True):
        jax.test_util.check_grads(jax.jit(pool), (_random((1, 5, 5, 2)),), order=1, eps=tol.FINITE_DIFF_EPS,
                                  rtol=tol.GRAD_CHECK_RTOL, atol=tol.GRAD_CHECK_ATOL)


def test_avg_pool_count_include_pad_false():
    x = _random((2, 7, 7, 3), dtype=jnp.float32)
    args = ((3, 3), (2, 2), ((1, 1), (1, 1)), False)
    chex.assert_trees_all_close(layers.avg_pool(x, *args, impl="fast"), nn.avg_pool(x, *args),
                                rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)


@pytest.mark.parametrize("window,strides,padding", [((2, 2), (2, 2), "VALID"), ((3, 3), (2, 2), ((1, 1), (1, 1))),
                                                    ((3, 3), (1, 1), "SAME")])
def test_max_pool_ties_route_the_gradient_as_xla_does(window, strides, padding):
    # Small integers: most windows hold several equal maxima. The first in row-major window
    # order gets the gradient, as in XLA's select-and-scatter, so the gradients are identical.
    x = jnp.asarray(np.round(2 * np.random.default_rng(0).standard_normal((2, 9, 9, 4))), jnp.float32)
    ct = _random(jax.eval_shape(lambda x: nn.max_pool(x, window, strides, padding), x).shape, seed=1,
                 dtype=jnp.float32)
    fast = _value_and_vjp(lambda x: layers.max_pool(x, window, strides, padding, impl="fast"), x, ct)
    chex.assert_trees_all_equal(fast, _value_and_vjp(lambda x: nn.max_pool(x, window, strides, padding), x, ct))


@pytest.fixture(params=["materialized", "taps"])
def conv_path(request, monkeypatch):
    """The two CPU formulations of `layers.Conv`'s kernel gradient: XLA's own from a materialized
    input (jnn's XLA option in effect: the process default `import jnn` sets), and the per-tap
    products (a process where JAX started before jnn, so the option is not in effect)."""
    from jnn import compiler

    if request.param == "taps":
        monkeypatch.setattr(compiler, "process_default", lambda: False)
    assert compiler.options_active() == (request.param == "materialized")
    return request.param


@pytest.mark.parametrize("shape,kernel_size,strides,padding", CONV_CASES)
def test_conv_matches_flax_float64(shape, kernel_size, strides, padding, conv_path):
    with jax.enable_x64(True):
        x = _random(shape)
        kwargs = {"features": 5, "kernel_size": kernel_size, "strides": strides, "padding": padding,
                  "dtype": jnp.float64, "param_dtype": jnp.float64}
        fast, ref = layers.Conv(**kwargs), nn.Conv(**kwargs)
        variables = _jit(ref.init)(jax.random.key(0), x)
        chex.assert_trees_all_equal(_jit(fast.init)(jax.random.key(0), x), variables)

        def loss(module, variables, x):
            return jnp.sum(jnp.sin(module.apply(variables, x)))

        with layers.using("fast"):
            y, grads = _jit(jax.value_and_grad(functools.partial(loss, fast), (0, 1)))(variables, x)
        y_ref, grads_ref = _jit(jax.value_and_grad(functools.partial(loss, ref), (0, 1)))(variables, x)
        chex.assert_trees_all_close((y, grads), (y_ref, grads_ref), rtol=tol.GRAD_CHECK_RTOL,
                                    atol=tol.GRAD_CHECK_ATOL)


def test_conv_check_grads_float64(conv_path):
    # Forward and reverse mode (a custom JVP keeps jax.jvp and jacfwd working), through both
    # kernel-gradient formulations.
    with jax.enable_x64(True):
        for channels in (2, 6):
            x = _random((1, 4, 4, channels))
            conv = layers.Conv(3, (3, 3), (2, 2), ((1, 1), (1, 1)), dtype=jnp.float64, param_dtype=jnp.float64)
            variables = _jit(conv.init)(jax.random.key(0), x)
            with layers.using("fast"):
                jax.test_util.check_grads(jax.jit(conv.apply), (variables, x), order=1, eps=tol.FINITE_DIFF_EPS,
                                          rtol=tol.GRAD_CHECK_RTOL, atol=tol.GRAD_CHECK_ATOL)


def test_cpu_gradient_has_no_select_and_scatter():
    x = jnp.ones((2, 8, 8, 3))

    def hlo(impl):
        grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=impl) ** 2))
        return jax.jit(grad).lower(x).as_text()

    assert jax.default_backend() == "cpu"
    assert "select_and_scatter" not in hlo("auto")
    assert "select_and_scatter" in hlo("native")  # the check would see it


def test_native_path_is_flax():
    x = _random((2, 8, 8, 3), dtype=jnp.float32)
    for fast, flax_pool in POOLS.values():
        with layers.using("native"):
            jaxpr = jax.make_jaxpr(functools.partial(fast, window_shape=(2, 2), strides=(2, 2)))(x)
        assert str(jaxpr) == str(jax.make_jaxpr(functools.partial(flax_pool, window_shape=(2, 2), strides=(2, 2)))(x))
    conv = layers.Conv(4, (3, 3))
    variables = _jit(conv.init)(jax.random.key(0), x)
    with layers.using("native"):
        jaxpr = jax.make_jaxpr(jax.grad(lambda v: conv.apply(v, x).sum()))(variables)
    assert str(jaxpr) == str(jax.make_jaxpr(jax.grad(lambda v: nn.Conv(4, (3, 3)).apply(v, x).sum()))(variables))

def test_conv_formulation_follows_the_option(conv_path):
    x = _random((2, 8, 8, 3), dtype=jnp.float32)
    conv = layers.Conv(4, (3, 3))
    variables = _jit(conv.init)(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(lambda v: conv.apply(v, x))(variables))
    assert ("custom_jvp_call" in jaxpr) == (conv_path == "taps") and ("cond[" in jaxpr) == (conv_path == "materialized")


def test_switches():
    assert layers.use_fast() == (jax.default_backend() == "cpu")  # "auto"
    with layers.using("native"):
        assert not layers.use_fast()
        assert layers.use_fast("fast")
    previous = layers.set_impl("fast")
    try:
        assert previous == "auto" and layers.use_fast()
    finally:
        layers.set_impl(previous)
    with pytest.raises(ValueError, match=r"must be one of \('auto', 'fast', 'native'\), received 'gpu'"):
        layers.set_impl("gpu")


@pytest.fixture
def flax_layers(monkeypatch):
    """Puts flax's own layers back into the model zoo (as it was before jnn.layers) while active."""
    def patch():
        monkeypatch.setattr(layers, "Conv", nn.Conv)
        monkeypatch.setattr(layers, "max_pool", nn.max_pool)
    return patch


@pytest.mark.parametrize("name", ["cnn_keras_mnist", "lenet5", "digits_cnn", "resnet20", "resnet18"])
def test_zoo_parameter_trees_unchanged(name, flax_layers):
    x = models.input_spec(name, batch_size=1)
    ours = _abstract_init(models.get(name), x)
    flax_layers()
    reference = _abstract_init(models.get(name), x)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(reference)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, reference)


@pytest.mark.parametrize("name,kwargs,shape", [("cnn_keras_mnist", {}, (2, 28, 28, 1)),
                                               ("resnet18", {"stage_sizes": (1, 1), "widths": (4, 8)}, (2, 32, 32, 3))])
def test_zoo_init_and_forward_equal_flax(name, kwargs, shape, flax_layers):
    model = models.get(name, **kwargs)
    x = _random(shape, dtype=jnp.float32)
    with layers.using("fast"):
        variables = _jit(model.init)(jax.random.key(0), x)
        ours = _jit(model.apply)(variables, x)
    flax_layers()
    chex.assert_trees_all_equal(_jit(model.init)(jax.random.key(0), x), variables)  # same initialisation
    chex.assert_trees_all_close(ours, _jit(model.apply)(variables, x), rtol=tol.F32_REORDER_RTOL,
                                atol=tol.F32_REORDER_ATOL)
