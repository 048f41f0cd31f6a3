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
import jax.test_util
from sklearn import datasets

from tests import tolerances as tol


# XLA:CPU spends seconds optimising each tiny test program and microseconds running it:
# compile without backend optimisations (about 3x faster to compile, slower to run).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def key(seed: int = 0) -> jax.Array:
    """A PRNG key for the tests."""
    return jax.random.key(seed)


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


def init_compiled(model, x, seed: int = 0, **kwargs) -> Any:
    """``model.init`` under jit: the model's own initialisers (tests of initialisation)."""
    return jit(lambda rng, x: model.init(rng, x, **kwargs))(key(seed), x)


_ONES = ("scale", "var")
_ZEROS = ("bias", "mean")
_SMALL = ("embedding", "wpe", "pos_embed", "cls_token")


def init(model, x, seed: int = 0, **kwargs) -> Any:
    """Variables of the shapes ``model.init`` creates, drawn with numpy.

    Compiling ``init`` costs XLA:CPU several times more than compiling the model itself, and
    most tests only need sensible values: kernels N(0, 1/fan_in), embeddings N(0, 0.02^2),
    zero biases and running means, unit scales and running variances. The models' own
    initialisers are tested with ``init_compiled``; ``abstract_init`` traces every preset's.
    """
    shapes = jax.eval_shape(lambda rng, x: model.init(rng, x, **kwargs), key(seed), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = str(path[-1].key), leaf.shape
        if name in _ONES:
            value = np.ones(shape)
        elif name in _ZEROS:
            value = np.zeros(shape)
        elif name in _SMALL:
            value = 0.02 * rng.standard_normal(shape)
        else:  # a kernel: (..., fan_in axes..., out); the fused QKV kernel is (C, 3, N, H)
            fan_in = shape[0] if "qkv" in jax.tree_util.keystr(path) else np.prod(shape[:-1])
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=None)
def _compiled_apply(model, frozen_kwargs: tuple) -> Callable:
    # Modules hash by their attributes: one compilation per distinct model and call options.
    kwargs = dict(frozen_kwargs)
    return jit(lambda v, x, rngs: model.apply(v, x, rngs=rngs, **kwargs))


def apply(model, variables, x, **kwargs) -> Any:
    """``model.apply`` under jit, compiled once per model and keyword set.

    ``rngs`` are traced arguments; ``train``, ``mutable`` and ``method`` are static.
    """
    rngs = kwargs.pop("rngs", None)
    frozen = tuple(sorted((k, _freeze(v)) for k, v in kwargs.items()))
    return _compiled_apply(model, frozen)(variables, x, rngs)


def assert_jit_matches(model, variables, x, **kwargs) -> Any:
    """Runs ``apply`` op by op and under jit; asserts equal results and returns them."""
    eager = model.apply(variables, x, **kwargs)
    jitted = apply(model, variables, x, **kwargs)
    chex.assert_trees_all_close(eager, jitted, rtol=tol.JIT_RTOL, atol=tol.JIT_ATOL)
    return jitted


def check_vjp(fn: Callable[[Any], Any], arg: Any) -> None:
    """Reverse-mode, first-order gradient check of ``fn`` at ``arg`` against finite differences.

    This is exactly what ``jax.test_util.check_grads(fn, (arg,), order=1, modes=("rev",))``
    runs (its ``check_vjp``), with the forward and backward functions compiled at the top level
    so they can use the fast-compile options. Call inside ``jax.enable_x64(True)`` with a float64
    model.
    """
    dtypes = {str(a.dtype) for a in jax.tree.leaves(arg)}
    assert dtypes == {"float64"}, f"gradient checks need float64 inputs, got {dtypes}"
    forward = jit(fn)
    backward = jit(lambda a, ct: jax.vjp(fn, a)[1](ct))

    def fn_vjp(a):
        return forward(a), lambda ct: backward(a, ct)

    jax.test_util.check_vjp(forward, fn_vjp, (arg,), eps=tol.GRAD_EPS, rtol=tol.GRAD_RTOL,
                            atol=tol.GRAD_ATOL)


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
