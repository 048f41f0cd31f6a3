"""Correctness checks for your own model and loss, the ones jnn's own tests run on its zoo.

Call them from your test suite (pytest or otherwise); each raises `AssertionError` with what was
expected and what was got.

Example:
  >>> jnn.testing.check_model(MyModel(), x[:4], y[:4], loss_fn="cross_entropy")
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jnn.train.state import create_train_state
from jnn.train.step import make_train_step, resolve_loss, step_rng

# Defaults: float32 reorderings (jit vs eager) and float64 central differences.
REORDER_RTOL, REORDER_ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_ATOL, GRAD_EPS = 1e-5, 1e-6, 1e-6


def check_step_jit_matches_eager(model: Any, inputs: Any, labels: Any, *, loss_fn: Any = "cross_entropy",
                                 rtol: float = REORDER_RTOL, atol: float = REORDER_ATOL) -> None:
    """One train step compiled equals the same step run op by op (SGD, so rounding is not amplified)."""
    state = create_train_state(model, optax.sgd(0.1), inputs[:1], 0)
    step = make_train_step(loss_fn)
    batch = {"inputs": inputs, "labels": labels}
    eager, eager_metrics = step(state, batch)
    jitted, jit_metrics = jax.jit(step)(state, batch)
    chex.assert_trees_all_close(jitted.params, eager.params, rtol=rtol, atol=atol)
    chex.assert_trees_all_close(jit_metrics, eager_metrics, rtol=rtol, atol=atol)


def check_no_retrace(model: Any, inputs: Any, labels: Any, *, loss_fn: Any = "cross_entropy", calls: int = 3) -> None:
    """The jitted, donating train step traces once over `calls` calls with fresh batches."""
    chex.clear_trace_counter()
    train_step = make_train_step(loss_fn)

    @chex.assert_max_traces(n=1)
    def traced(state, batch):
        return train_step(state, batch)

    step = jax.jit(traced, donate_argnums=0)
    state = create_train_state(model, optax.adam(1e-3), inputs[:1], 0)
    for i in range(calls):
        perm = np.random.default_rng(i).permutation(len(labels))
        state, _ = step(state, {"inputs": np.asarray(inputs)[perm], "labels": np.asarray(labels)[perm]})


def check_gradients_float64(model_fn: Callable[[Any], Any], inputs: Any, labels: Any, *,
                            loss_fn: Any = "cross_entropy", max_params: int = 2000,
                            rtol: float = GRAD_RTOL, atol: float = GRAD_ATOL, eps: float = GRAD_EPS) -> None:
    """The train step's gradient equals central finite differences of the same loss, in float64.

    Args:
      model_fn: `dtype -> model`, e.g. `lambda dtype: MyModel(dtype=dtype, param_dtype=dtype)`, so
        the model is built in float64 inside the check.
      inputs, labels: a small batch (float inputs are cast to float64).
      loss_fn: the loss, as for `make_train_step`.
      max_params: refuse models with more parameters than this (one pair of loss evaluations
        per parameter); check a tiny configuration of your architecture.
    """
    loss = resolve_loss(loss_fn)
    with jax.enable_x64(True):
        model = model_fn(jnp.float64)
        x = np.asarray(inputs)
        x = x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x
        state = create_train_state(model, optax.sgd(1.0), x[:1], 0, fast_compile=False)
        flat, unravel = ravel_pytree(state.params)
        if flat.size > max_params:
            raise ValueError(f"check_gradients_float64: the model has {flat.size} parameters; expected at most "
                             f"{max_params}. Fix: check a tiny configuration, or raise max_params.")
        assert flat.dtype == jnp.float64, f"expected float64 parameters, got {flat.dtype}"
        # With SGD at learning rate 1 the update is exactly -grad: this reads the step's own gradient.
        new_state, _ = jax.jit(make_train_step(loss_fn))(state, {"inputs": x, "labels": labels})
        step_grad = ravel_pytree(jax.tree.map(lambda a, b: a - b, state.params, new_state.params))[0]
        # The same training mode and per-step randomness as the step: dropout masks and batch
        # statistics are then identical, so the check holds for such models too.
        batch = {"inputs": x, "labels": labels}

        @jax.jit
        def objective(v):
            outputs, _ = state.model.apply(unravel(v), state.model_state, x, train=True, rng=step_rng(state))
            return jnp.mean(loss(outputs, labels, batch))

        eye = np.eye(flat.size)
        fd = np.array([(objective(flat + eps * e) - objective(flat - eps * e)) / (2 * eps) for e in eye])
        np.testing.assert_allclose(step_grad, fd, rtol=rtol, atol=atol,
                                   err_msg="train-step gradient vs float64 central differences")


def check_model(model: Any, inputs: Any, labels: Any, *, loss_fn: Any = "cross_entropy") -> None:
    """Runs `check_step_jit_matches_eager` and `check_no_retrace` on `model`."""
    check_step_jit_matches_eager(model, inputs, labels, loss_fn=loss_fn)
    check_no_retrace(model, inputs, labels, loss_fn=loss_fn)
