"""Shared checks for the model-zoo tests: parameter counts, jit agreement, gradients, training."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.test_util import check_grads
from sklearn import datasets

import _zoo_tolerances as tol


# XLA:CPU spends seconds optimising each tiny test program and microseconds running it:
# compile without backend optimisations (about 3x faster to compile, slower to run).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def key(seed: int = 0) -> jax.Array:
    """A PRNG key for the tests.

    "rbg" keys: with jax's default ``jax_threefry_partitionable=True`` (jax >= 0.5), compiling a
    model's ``init`` with threefry keys takes 2-6x longer on CPU than the model itself, which
    would dominate this suite's runtime. Only the random values differ.
    """
    return jax.random.key(seed, impl="rbg")


def count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init(model, x) -> tuple[Any, Any]:
    """(output, variables) as ShapeDtypeStructs: nothing is allocated, big presets are cheap."""
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return jax.eval_shape(model.init_with_output, key(0), spec)


def param_count(model, x) -> int:
    """Trainable parameters (the "params" collection) of ``model`` on input like ``x``."""
    return count(abstract_init(model, x)[1]["params"])


def init(model, x, seed: int = 0, **kwargs) -> Any:
    """``model.init`` under jit (op-by-op initialisation is slow on CPU)."""
    return jit(lambda rng, x: model.init(rng, x, **kwargs))(key(seed), x)


def apply(model, variables, x, **kwargs) -> Any:
    """``model.apply`` under jit; ``rngs`` and ``mutable`` pass through as keywords."""
    rngs = kwargs.pop("rngs", None)
    return jit(lambda v, x, r: model.apply(v, x, rngs=r, **kwargs))(variables, x, rngs)


def assert_jit_matches(model, variables, x, **kwargs) -> Any:
    """Runs ``apply`` op by op and under jit; asserts equal results and returns them."""
    eager = model.apply(variables, x, **kwargs)
    jitted = jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)
    chex.assert_trees_all_close(eager, jitted, rtol=tol.JIT_RTOL, atol=tol.JIT_ATOL)
    return jitted


def check_param_grads(fn: Callable[[Any], Any], params: Any) -> None:
    """Reverse-mode, first-order check of ``fn(params)`` against finite differences.

    Call inside ``jax.enable_x64(True)`` with a float64 model.
    """
    dtypes = {str(p.dtype) for p in jax.tree.leaves(params)}
    assert dtypes == {"float64"}, f"gradient checks need float64 parameters, got {dtypes}"
    check_grads(jit(fn), (params,), order=1, modes=("rev",), eps=tol.GRAD_EPS,
                rtol=tol.GRAD_RTOL, atol=tol.GRAD_ATOL)


def check_input_grads(fn: Callable[[Any], Any], x: Any) -> None:
    """Like ``check_param_grads`` for the gradient with respect to a float input."""
    check_grads(jit(fn), (x,), order=1, modes=("rev",), eps=tol.GRAD_EPS,
                rtol=tol.GRAD_RTOL, atol=tol.GRAD_ATOL)


def train(loss_fn: Callable[[Any, jax.Array], jax.Array], params: Any, steps: int,
          learning_rate: float = 1e-2, seed: int = 0) -> tuple[float, float]:
    """Minimises ``loss_fn(params, rng)`` with Adam; returns (first loss, mean of the last 10)."""
    tx = optax.adam(learning_rate)

    # A Python loop over a jitted step: XLA:CPU runs convolutions far slower inside lax.scan.
    @jit
    def step(params, opt_state, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, rng, losses = tx.init(params), key(seed), []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(rng, i))
        losses.append(loss)
    losses = np.asarray(jax.device_get(losses))
    assert np.all(np.isfinite(losses)), losses
    return float(losses[0]), float(losses[-10:].mean())


def digits(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` scikit-learn digits: (n, 8, 8, 1) float32 in [0, 1], (n,) int32 labels."""
    bunch = datasets.load_digits()
    x = (bunch.images[:n] / 16.0).astype(np.float32)[..., None]
    return x, bunch.target[:n].astype(np.int32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
