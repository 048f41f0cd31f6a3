"""The train step's gradient against central differences of the same loss, in float64.

Per parameter leaf, the step's gradient projected on a random unit direction is compared with
the central difference of the loss along it; a leaf that disagrees is bisected down to the one
element that disagrees most, which the failure names with both values. The cost is two loss
evaluations per leaf (plus 2 log2(n) to locate an error), whatever the model's size.

Kinks (ReLU at 0, max-pool ties, |x| at 0) are where autodiff picks one side's slope and a central
difference averages both. The check (1) moves the parameters to a random nearby point first, so no
pre-activation sits exactly on a kink (a zero bias on a blank image patch does), and (2) where the
left and right differences still disagree (a kink inside the difference's step) accepts any slope
between them: a subgradient. Anywhere the two one-sided differences agree, the gradient must
match: a wrong custom gradient is never excused.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jnn import precision as precision_lib
from jnn.testing._case import CHECK_TX, Case, gradient, take
from jnn.testing._report import Failure, ModelCheckError, index_str, path_str
from jnn.train import model as model_lib
from jnn.train.state import create_train_state
from jnn.train.step import resolve_loss, step_rng

# float64: step 1e-6 along a unit direction; relative tolerance on the directional derivative.
EPS, RTOL = 1e-6, 1e-5
# The random point the check moves to: each parameter moves by this fraction of its leaf's RMS
# (at least of MIN_SCALE), far beyond EPS, so no kink lies within a difference's step by design.
JITTER, MIN_SCALE = 0.02, 0.05


def _float64_model(case: Case) -> Any:
    """The model built or converted to compute in float64 (see `check_gradients`)."""
    if case.model_fn is not None:
        return case.model_fn(jnp.float64)
    model = case.model
    if model_lib.is_linen(model):
        fields = {f.name for f in dataclasses.fields(model)}
        changes = {name: jnp.float64 for name in ("dtype", "param_dtype")
                   if name in fields and _is_float_dtype(getattr(model, name))}
        return model.clone(**changes) if changes else model
    if model_lib.is_nnx(model):
        from flax import nnx  # noqa: PLC0415

        graphdef, variables = nnx.split(model)  # a copy in float64: the user's module is not changed
        model = nnx.merge(graphdef, jax.tree.map(
            lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, variables))
        for _, sub in nnx.iter_modules(model):
            for name in ("dtype", "param_dtype"):
                if _is_float_dtype(getattr(sub, name, None)):
                    setattr(sub, name, jnp.float64)
    return model


def _is_float_dtype(value: Any) -> bool:
    try:
        return value is not None and jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        return False


def _to64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64) if np.issubdtype(np.asarray(x).dtype, np.floating)
                        else np.asarray(x), jax.device_get(tree))


def _norm(tree) -> float:
    return math.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(tree)))


def check(case: Case) -> str:
    """Runs the gradient check on `case`; returns a one-line summary or raises `ModelCheckError`."""
    with jax.enable_x64(True):
        return _check(case)


def _check(case: Case) -> str:
    loss = resolve_loss(case.loss_fn)
    inputs, labels = _to64(case.inputs), case.labels
    labels = _to64(labels) if not any(np.issubdtype(np.asarray(y).dtype, np.integer) for y in jax.tree.leaves(labels)) \
        else labels
    batch = {"inputs": inputs, "labels": labels}
    tx = CHECK_TX
    state = create_train_state(_float64_model(case), tx, take(inputs, slice(0, 1)), 0, fast_compile=False,
                               train_kwarg=case.train_kwarg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + JITTER * max(float(np.sqrt(np.mean(x ** 2))), MIN_SCALE)
                          * rng.normal(size=x.shape), _to64(state.params))
    state = state.replace(params=params, opt_state=tx.init(params), model_state=_to64(state.model_state))
    key = step_rng(state)
    run = jax.jit(lambda p, s: jnp.mean(jnp.asarray(loss(state.model.apply(p, s, inputs, train=True, rng=key)[0],
                                                           labels, batch))))

    def objective(p):  # the model state is an argument: an nnx model writes its statistics into it
        return run(p, state.model_state)

    by_dtype, wide = precision_lib.product_flops_by_dtype(jax.make_jaxpr(run)(params, state.model_state))
    narrow = {d: f for d, f in by_dtype.items() if jnp.issubdtype(jnp.dtype(d), jnp.floating) and d != "float64"}
    if narrow:
        total = sum(by_dtype.values())
        raise ModelCheckError(Failure(
            "gradients", "could not run in float64: the model still computes "
            f"{100 * sum(narrow.values()) / total:.0f}% of its matrix products in {sorted(narrow)} with float64 "
            "parameters and inputs, so central differences would measure float32 rounding, not the gradient.",
            cause="its layers pin their computation dtype (flax `dtype=jnp.float32`) and the model has no "
                  "top-level `dtype` / `param_dtype` attribute jnn could set",
            fix="pass model_fn=lambda dtype: MyModel(dtype=dtype, param_dtype=dtype), which builds the model "
                "in the dtype the check asks for"))

    new_state, _ = jax.jit(case.step)(state, batch)
    grads = jax.device_get(gradient(new_state.opt_state))
    f0 = float(objective(params))
    noise = 1e-15 * max(1.0, abs(f0)) / EPS  # rounding of the loss, through the difference quotient

    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    grad_leaves = jax.tree.leaves(grads)
    kinks = 0

    def along(i: int, direction: np.ndarray) -> tuple[float, float, float]:
        """(central, left, right) differences of the loss along `direction` in leaf i."""
        def moved(sign):
            return [x + sign * EPS * direction if j == i else x for j, (_, x) in enumerate(leaves)]
        fp = float(objective(jax.tree.unflatten(tree, moved(1.0))))
        fm = float(objective(jax.tree.unflatten(tree, moved(-1.0))))
        return (fp - fm) / (2 * EPS), (f0 - fm) / EPS, (fp - f0) / EPS

    def excess(i: int, direction: np.ndarray) -> tuple[float, bool]:
        """How far the autodiff directional derivative lies outside what the differences allow."""
        g = np.asarray(grad_leaves[i], np.float64)
        ad = float(np.sum(g * direction))
        central, left, right = along(i, direction)
        tol = RTOL * max(float(np.linalg.norm(g * (direction != 0))), abs(central)) + 10 * noise
        if abs(right - left) > tol:  # a kink inside the step: any slope between the sides is right
            lo, hi = min(left, right), max(left, right)
            return max(lo - ad, ad - hi, 0.0) - tol, True
        return abs(ad - central) - tol, False

    for i, (path, x) in enumerate(leaves):
        if not np.issubdtype(x.dtype, np.floating) or x.size == 0:
            continue
        z = rng.normal(size=x.shape)
        direction = z / np.linalg.norm(z)
        bad, kink = excess(i, direction)
        kinks += kink
        if bad > 0:
            raise ModelCheckError(_locate(case, i, path, x, grad_leaves[i], along, excess))
    mode = "float64"
    return (f"{len(leaves)} parameter leaves agree with float64 central differences along random directions"
            f" ({mode}; {kinks} kink(s) met and accepted as subgradients)")


def _locate(case, i, path, x, grad, along, excess) -> Failure:
    """Bisects leaf i's indices down to the element whose gradient disagrees most."""
    flat = np.arange(x.size)
    while flat.size > 1:
        halves = (flat[: flat.size // 2], flat[flat.size // 2:])
        scores = []
        for half in halves:
            direction = np.zeros(x.size)
            direction[half] = 1.0 / math.sqrt(half.size)
            scores.append(excess(i, direction.reshape(x.shape))[0])
        flat = halves[int(np.argmax(scores))]
    index = np.unravel_index(int(flat[0]), x.shape)
    unit = np.zeros(x.shape)
    unit[index] = 1.0
    central, left, right = along(i, unit)
    g = float(np.asarray(grad)[index])
    ratio = f" (ratio {g / central:.4g})" if central else ""
    return Failure(
        "gradients", "the train step's gradient disagrees with float64 central differences of the same loss.",
        where=path_str("params", path) + index_str(index),
        expected=f"{central:.7g} (central difference; one-sided: {left:.7g} and {right:.7g})",
        got=f"{g:.7g} (the step's gradient){ratio}",
        cause="a custom gradient (jax.custom_vjp / custom_jvp) that is wrong, a stop_gradient or integer cast on "
              "a path that should carry gradient, or a loss whose gradient the step scales wrongly",
        fix="check the backward rule of the custom function used by this parameter's layer against "
            "jax.grad of its forward (jax.test_util.check_grads does it for one function)")
