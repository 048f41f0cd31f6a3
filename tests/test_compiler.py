"""jnn's XLA CPU option: the process default that `import jnn` sets (any `jax.jit` gets it), the
per-call `jnn.jit` when JAX started first, and the convolution formulation that goes with them.

conftest imports jnn before JAX runs anything, as users do: in this process the option is the
process default. The per-call path runs in a subprocess that starts JAX first (or opts out).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

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


VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_jnn_makes_the_option_the_process_default():
    assert jax.default_backend() == "cpu"
    assert f"--{OPTION}={VALUE}" in os.environ["XLA_FLAGS"].split()
    assert compiler.process_default() and compiler.options_active()  # any CPU program, jax.jit too
    assert jnn.compiler_options() == {}  # nothing to add per call: XLA has it


def test_the_process_default_is_set_only_before_jax_starts_and_never_over_the_user(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert compiler.set_process_default() is False  # JAX's backends are running in this process
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.setenv("XLA_FLAGS", f"--{OPTION}=LIBRARY_FUSION_TYPE_REDUCE")
    assert compiler.set_process_default() is False and jnn.compiler_options() == {}  # the user's own wins
    assert not compiler.process_default()


PER_CALL = textwrap.dedent(r"""
    import os, re, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    if sys.argv[1] == "jax-first":
        jax.numpy.zeros(1)  # JAX's backends start before jnn is imported: too late for a process default
    import jnn
    from jnn import compiler, models
    from tests.test_compiler import OPTION, VALUE, _random, _resnet_state, _ynn_convolutions
    assert not compiler.process_default() and OPTION not in os.environ.get("XLA_FLAGS", "")
    assert jnn.compiler_options() == {OPTION: VALUE} and jnn.compiler_options("gpu") == {}
    seen = []
    def f(x, y):
        seen.append(compiler.options_active())
        return x * 2 + y
    assert not compiler.options_active()
    g = jnn.jit(f, static_argnums=1)
    assert float(g(jnp.float32(1.0), 3)) == 5.0 and seen == [True] and not compiler.options_active()
    text = jnn.jit(f, static_argnums=1, compiler_options={OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}).lower(
        jnp.ones(3), 1).compile().as_text()  # the caller's compiler_options win over jnn's entry
    x, g = _random((32, 32, 32, 16)), _random((32, 32, 32, 16), 1)  # smaller ones stay out of YNNPACK
    def kernel_grad(x, g):
        conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.vjp(conv, jnp.zeros((3, 3, 16, 16)))[1](g)[0]
    assert _ynn_convolutions(jax.jit(kernel_grad).lower(x, g).compile().as_text())  # jaxlib's default
    assert not _ynn_convolutions(jnn.jit(kernel_grad).lower(x, g).compile().as_text())
    np.testing.assert_allclose(jnn.jit(kernel_grad)(x, g), jax.jit(kernel_grad)(x, g), rtol=1e-4, atol=1e-3)
    state, batch = _resnet_state()
    step = jnn.make_train_step("cross_entropy")
    assert len(re.findall(r" conditional\(", jnn.jit(step).lower(state, batch).compile().as_text())) >= 5
    assert len(re.findall(r" conditional\(", jax.jit(step).lower(state, batch).compile().as_text())) <= 1  # the guard
    print("per-call ok")
""")


import pytest  # noqa: E402


@pytest.mark.parametrize("how", ["jax-first", "opt-out"])
def test_per_call_options_when_the_default_is_not_in_effect(how):
    """JAX started before `import jnn` (or JNN_XLA_DEFAULTS=0): `jnn.jit` adds the option per call,
    jax.jit does not."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               **({"JNN_XLA_DEFAULTS": "0"} if how == "opt-out" else {}))
    done = subprocess.run([sys.executable, "-c", PER_CALL, how], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "per-call ok" in done.stdout, done.stderr[-3000:]


def test_options_need_a_measured_jaxlib(monkeypatch):
    import jaxlib

    compiler._supported.cache_clear()
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(jaxlib, "__version__", "0.11.0")
    try:
        assert jnn.compiler_options() == {}
    finally:
        monkeypatch.undo()
        compiler._supported.cache_clear()


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


def test_no_convolution_runs_in_ynnpack_under_plain_jax_jit():
    x, g = _random((32, 32, 32, 16)), _random((32, 32, 32, 16), 1)  # smaller ones stay out of YNNPACK

    def kernel_grad(x, g):
        conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.vjp(conv, jnp.zeros((3, 3, 16, 16)))[1](g)[0]

    assert not _ynn_convolutions(jax.jit(kernel_grad).lower(x, g).compile().as_text())  # the process default
    assert not _ynn_convolutions(jnn.jit(kernel_grad).lower(x, g).compile().as_text())


def test_compiled_step_reads_conv_inputs_under_either_jit():
    """Each conv input is a conditional's output, so the kernel gradient's transpose reads it
    instead of recomputing BatchNorm, ReLU and the residual sums (what makes the step fast)."""
    state, batch = _resnet_state()
    step = jnn.make_train_step("cross_entropy")
    for jit in (jnn.jit, jax.jit):
        assert len(re.findall(r" conditional\(", jit(step).lower(state, batch).compile().as_text())) >= 5


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
