"""`jnn.jit`: jax.jit with jnn's XLA options, and the convolution formulation that goes with them."""
from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jnn
from jnn import compiler, layers, models
from tests import tolerances as tol

OPTION = "xla_cpu_experimental_ynn_fusion_type"


def _random(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def test_options_on_cpu_only_and_never_over_xla_flags(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert jnn.compiler_options() == {OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    assert jnn.compiler_options("gpu") == {} and jnn.compiler_options("tpu") == {}
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 --{OPTION}=LIBRARY_FUSION_TYPE_REDUCE")
    assert jnn.compiler_options() == {}  # the user's own setting wins


def test_options_need_a_measured_jaxlib(monkeypatch):
    import jaxlib

    compiler._supported.cache_clear()
    monkeypatch.setattr(jaxlib, "__version__", "0.11.0")
    try:
        assert jnn.compiler_options() == {}
    finally:
        monkeypatch.undo()
        compiler._supported.cache_clear()
    assert jnn.compiler_options() != {}


def test_jit_traces_with_options_active_and_keeps_arguments():
    seen = []

    def f(x, y):
        seen.append(compiler.options_active())
        return x * 2 + y

    assert not compiler.options_active()
    g = jnn.jit(f, static_argnums=1)
    assert float(g(jnp.float32(1.0), 3)) == 5.0 and seen == [True]
    assert not compiler.options_active()
    # the caller's compiler_options win over jnn's entry
    text = jnn.jit(f, static_argnums=1, compiler_options={OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}).lower(
        jnp.ones(3), 1).compile().as_text()
    assert "x" in text and seen == [True, True]


def test_materialized_is_the_identity():
    x = _random((2, 3, 4))
    for v in (x, x.at[0, 0, 0].set(jnp.nan), jnp.zeros((0, 3))):
        out = jax.jit(layers._materialized)(v)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(v))
    y, t = jax.jvp(layers._materialized, (x,), (jnp.ones_like(x),))
    np.testing.assert_array_equal(np.asarray(t), np.ones(x.shape))
    np.testing.assert_array_equal(np.asarray(jax.vmap(layers._materialized)(x)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda v: (layers._materialized(v) ** 2).sum())(x)),
                                  np.asarray(2 * x))


def _resnet_state(seed=0):
    model = models.get("resnet20", stage_sizes=(1, 1), widths=(8, 16))
    x = _random((8, 16, 16, 3), seed)
    labels = jnp.asarray(np.random.default_rng(seed).integers(0, 10, 8), jnp.int32)
    return jnn.create_train_state(model, optax.sgd(0.1), x[:1], 0), {"inputs": x, "labels": labels}


def test_jnn_jit_step_equals_jax_jit_step():
    state, batch = _resnet_state()
    step = jnn.make_train_step("cross_entropy")
    ours_state, ours = jnn.jit(step)(state, batch)
    ref_state, ref = jax.jit(step)(state, batch)
    chex.assert_trees_all_close(ours["loss"], ref["loss"], rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    chex.assert_trees_all_close(ours_state.params, ref_state.params, rtol=tol.F32_REORDER_RTOL,
                                atol=tol.F32_REORDER_ATOL)
    chex.assert_trees_all_close(ours_state.model_state, ref_state.model_state, rtol=tol.F32_REORDER_RTOL,
                                atol=tol.F32_REORDER_ATOL)


def test_conv_under_jnn_jit_check_grads_float64():
    with jax.enable_x64():
        x = _random((2, 6, 6, 3), dtype=jnp.float64)
        conv = layers.Conv(4, (3, 3), (2, 2), dtype=jnp.float64, param_dtype=jnp.float64)
        variables = jax.jit(conv.init)(jax.random.key(0), x)
        apply = jnn.jit(lambda v, x: jnp.tanh(conv.apply(v, jnp.maximum(x, 0.1 * x))))
        jax.test_util.check_grads(apply, (variables, x), order=2, modes=("fwd", "rev"),
                                  eps=tol.FINITE_DIFF_EPS, atol=tol.GRAD_CHECK_ATOL, rtol=tol.GRAD_CHECK_RTOL)


def _ynn_convolutions(hlo: str) -> list[str]:
    """The fusions of a compiled program that run a convolution in YNNPACK."""
    bodies = dict(re.findall(r"^(%[\w.\-]+) \(.*?\n(.*?)\n\}", hlo, re.S | re.M))
    return [line for line in hlo.splitlines() if '"__ynn_fusion"' in line
            and " convolution(" in bodies.get(re.search(r"calls=(%[\w.\-]+)", line).group(1), "")]


def test_no_convolution_runs_in_ynnpack():
    x, g = _random((32, 32, 32, 16)), _random((32, 32, 32, 16), 1)  # smaller ones stay out of YNNPACK

    def kernel_grad(x, g):
        conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.vjp(conv, jnp.zeros((3, 3, 16, 16)))[1](g)[0]

    assert _ynn_convolutions(jax.jit(kernel_grad).lower(x, g).compile().as_text())  # jaxlib's default
    assert not _ynn_convolutions(jnn.jit(kernel_grad).lower(x, g).compile().as_text())
    np.testing.assert_allclose(jnn.jit(kernel_grad)(x, g), jax.jit(kernel_grad)(x, g), rtol=1e-4, atol=1e-3)


def test_compiled_step_reads_conv_inputs():
    """Each conv input is a conditional's output, so the kernel gradient's transpose reads it
    instead of recomputing BatchNorm, ReLU and the residual sums (what makes the step fast)."""
    state, batch = _resnet_state()
    step = jnn.make_train_step("cross_entropy")
    assert len(re.findall(r" conditional\(", jnn.jit(step).lower(state, batch).compile().as_text())) >= 5
    assert not re.findall(r" conditional\(", jax.jit(step).lower(state, batch).compile().as_text())


def test_native_switch_keeps_xla_graph_under_jnn_jit():
    x = _random((2, 8, 8, 3))
    conv = layers.Conv(4, (3, 3))
    variables = jax.jit(conv.init)(jax.random.key(0), x)

    def conditionals(impl):
        with layers.using(impl):
            text = jnn.jit(lambda v: conv.apply(v, x)).lower(variables).as_text()
        return len(re.findall(r"stablehlo\.(case|if)", text))

    assert conditionals("fast") == 1 and conditionals("native") == 0


def test_jit_nested_in_transformations_runs_plain():
    f = jnn.jit(lambda x: jnp.sin(x) * 2)
    x = jnp.arange(4.0)
    np.testing.assert_allclose(jax.vmap(f)(x), np.sin(np.arange(4.0)) * 2, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda v: f(v).sum())(x), np.cos(np.arange(4.0)) * 2, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda v: f(v) + 1)(x), np.sin(np.arange(4.0)) * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(f(x), np.sin(np.arange(4.0)) * 2, rtol=1e-6)  # top level again
    assert f.lower(x).compile() is not None and f.__name__ == "<lambda>"
