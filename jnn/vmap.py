"""`jax.vmap` modes of training: per-example gradients, DP-SGD, and ensembles of K models.

- `per_example_grads(loss_fn, state, batch)`: the gradient of each example's loss, stacked on a
  leading batch axis (their mean is the train step's gradient).
- `make_dp_train_step(loss_fn)`: DP-SGD. The step feeds per-example gradients to the state's
  optimizer, which must start with optax's `differentially_private_aggregate` (per-example
  clipping, sum, Gaussian noise, divide by the batch size), e.g. `optax.contrib.dpsgd(...)`.
- `create_ensemble(model, tx, x, rng, k)`: K independently initialised members in one stacked
  `TrainState`; `ensemble_train_step(step)` is `jax.vmap(step)` over it, each member with its
  own dropout key and BatchNorm statistics.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jnn.train.state import TrainState, _initializer, _FAST_COMPILE
from jnn.train.step import Step, check_batch, resolve_loss, step_rng

PyTree = Any
Batch = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------
# Per-example gradients.
# ----------------------------------------------------------------------------------------------


def _example_loss_fn(loss_fn, state: TrainState, train: bool, where: str):
    """`f(params, example, index) -> loss` on one example (a batch entry without its batch axis),
    run as a batch of one."""
    loss = resolve_loss(loss_fn)
    if train and any(state.model.batch_stats_flags(state.model_state)):
        raise ValueError(
            f"{where}: the model has BatchNorm statistics; in training mode BatchNorm mixes the "
            f"examples of a batch, so a per-example gradient is not defined. Fix: use "
            f"GroupNorm/LayerNorm, or pass train=False (running statistics).")
    base_rng = step_rng(state)

    def example_loss(params, example, index):
        one = jax.tree.map(lambda a: a[None], example)  # a batch of one
        outputs, _ = state.model.apply(params, state.model_state, one["inputs"], train=train,
                                       rng=jax.random.fold_in(base_rng, index))
        return jnp.sum(jnp.asarray(loss(outputs, one["labels"], one), jnp.float32))

    return example_loss


def _per_example(fn, params, batch: Batch):
    """vmaps `fn(params, example, index)` over the batch's examples."""
    index = jnp.arange(len(jax.tree.leaves(batch["labels"])[0]))
    return jax.vmap(fn, in_axes=(None, 0, 0))(params, dict(batch), index)


def per_example_grads(loss_fn: Callable | str, state: TrainState, batch: Batch, *,
                      train: bool = True) -> PyTree:
    """The gradient of each example's loss with respect to `state.params`.

    Each example runs as a batch of one (`jax.vmap` over the batch axis), with its own dropout key
    (`fold_in(fold_in(rng, step), index)`). The mean over the leading axis equals the gradient of
    the batch's mean loss, which is what `make_train_step` follows; the sum equals the gradient of
    the summed loss.

    Example:
      >>> g = jnn.per_example_grads("cross_entropy", state, {"inputs": x[:8], "labels": y[:8]})
      >>> g["Dense_0"]["kernel"].shape == (8, *state.params["Dense_0"]["kernel"].shape)
      True

    Args:
      loss_fn: as in `make_train_step` (a callable or a `jnn.losses` name).
      state: a `TrainState`.
      batch: a dict with "inputs" and "labels".
      train: run the model in training mode (dropout on); False uses eval mode, which also makes
        BatchNorm models (running statistics) valid.

    Returns:
      Gradients with the structure of `state.params`, each leaf with a leading batch axis.

    Raises:
      ValueError: for a malformed batch, or a BatchNorm model in training mode.
    """
    check_batch(state, batch, where="per_example_grads")
    example_loss = _example_loss_fn(loss_fn, state, train, "per_example_grads")
    return _per_example(jax.grad(example_loss), state.params, batch)


# ----------------------------------------------------------------------------------------------
# DP-SGD.
# ----------------------------------------------------------------------------------------------


def _has_dp_aggregate(opt_state: PyTree) -> bool:
    dp_state = optax.contrib.DifferentiallyPrivateAggregateState
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, dp_state))
    return any(isinstance(x, dp_state) for x in leaves)


def make_dp_train_step(loss_fn: Callable | str, *, validate: bool = True
                       ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """A DP-SGD `train_step(state, batch) -> (state, metrics)`.

    The step computes per-example gradients and hands them to `state.tx`, which must begin with
    `optax.contrib.differentially_private_aggregate(l2_norm_clip, noise_multiplier, key)`: it clips
    each example's gradient to `l2_norm_clip`, sums, adds Gaussian noise of standard deviation
    `noise_multiplier * l2_norm_clip` and divides by the batch size. `optax.contrib.dpsgd(...)` is
    that followed by SGD; chain it with any other optimizer for DP-Adam. The noise key lives in
    the optimizer state, so a run resumes exactly. The step is pure: compile it with `jax.jit` or
    `jnn.parallel.data_parallel`.

    Example:
      >>> tx = optax.chain(optax.contrib.differentially_private_aggregate(
      ...     l2_norm_clip=1.0, noise_multiplier=1.1, key=jax.random.key(0)), optax.sgd(0.1))
      >>> state = jnn.create_train_state(model, tx, x[:1], 0)
      >>> state, metrics = jax.jit(jnn.make_dp_train_step("cross_entropy"))(state, batch)

    Args:
      loss_fn: as in `make_train_step`.
      validate: check the batch before tracing.

    Returns:
      `train_step`, with metrics "loss" (mean over the batch) and "per_example_grad_norm" (the mean
      norm before clipping).

    Raises:
      ValueError (when called): if the optimizer does not start with the DP aggregation, the
        model has BatchNorm, or the batch has a "mask" (the aggregation divides by the batch size).
    """

    def train_step(state: TrainState, batch: Batch):
        if validate:
            check_batch(state, batch, where="dp_train_step")
        if not _has_dp_aggregate(state.opt_state):
            raise ValueError(
                "dp_train_step: the optimizer does not aggregate per-example gradients; it must "
                "start with optax.contrib.differentially_private_aggregate. Fix: create the state "
                "with tx=optax.contrib.dpsgd(lr, l2_norm_clip, noise_multiplier, seed) or "
                "optax.chain(optax.contrib.differentially_private_aggregate(...), optax.adam(lr)).")
        if "mask" in batch:
            raise ValueError(
                "dp_train_step: batch['mask'] is not supported: the DP aggregation divides by the "
                "batch size, so padding would change the noise scale. Fix: drop the last partial "
                "batch (every batch full).")
        example_loss = _example_loss_fn(loss_fn, state, True, "dp_train_step")
        losses, grads = _per_example(jax.value_and_grad(example_loss), state.params, batch)  # (B,), (B, ...)
        norms = jax.vmap(optax.tree.norm)(grads)  # (B,)
        new_state = state.apply_gradients(grads)
        return new_state, {"loss": jnp.mean(losses), "per_example_grad_norm": jnp.mean(norms)}

    return Step(train_step, "train")


# ----------------------------------------------------------------------------------------------
# Ensembles.
# ----------------------------------------------------------------------------------------------


def ensemble_keys(rng: jax.Array | int, k: int) -> jax.Array:
    """The K member keys `create_ensemble` uses: `jax.random.split(rng, k)`."""
    rng = jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng
    return jax.random.split(rng, k)


def create_ensemble(model: Any, tx: optax.GradientTransformation, example_inputs: Any,
                    rng: jax.Array | int, k: int, *, train_kwarg: str | None = "auto",
                    rng_streams: tuple[str, ...] | None = None, **init_kwargs: Any) -> TrainState:
    """K independently initialised copies of a model, stacked into one `TrainState`.

    Member `i` equals `create_train_state(model, tx, example_inputs, ensemble_keys(rng, k)[i])`:
    its own parameters, optimizer state, BatchNorm statistics and dropout key. Every array has a
    leading axis of size K.

    Example:
      >>> states = jnn.create_ensemble(model, optax.adam(1e-3), x[:1], 0, k=5)
      >>> step = jax.jit(jnn.ensemble_train_step(jnn.make_train_step("cross_entropy")))
      >>> states, metrics = step(states, batch)      # metrics["loss"].shape == (5,)

    Args:
      model, tx, example_inputs: as in `create_train_state` (and its keyword arguments).
      rng: a key or int seed, split into K member keys.
      k: the number of members.

    Raises:
      ValueError: if k < 1.
    """
    if k < 1:
        raise ValueError(f"create_ensemble: k={k}; an ensemble needs at least one member.")
    keys = ensemble_keys(rng, k)
    init = _initializer(model, tx, example_inputs, keys[0], init_kwargs, train_kwarg, rng_streams)
    if init.args[2:]:
        raise ValueError(
            "create_ensemble: an nnx module is already initialised, so its K members would be "
            "identical. Fix: create K modules with different nnx.Rngs seeds and stack their states, "
            "or use a linen module.")
    # One compiled jit(vmap(init)) for all members; member i equals create_train_state(..., keys[i]).
    options = _FAST_COMPILE if jax.default_backend() == "cpu" else None
    stacked = jax.jit(jax.vmap(init.fn, in_axes=(0, None)))
    parts = stacked.lower(keys, init.args[1]).compile(options)(keys, init.args[1])
    member = jax.eval_shape(init.fn, *init.args)
    return init.finish(parts, jnp.zeros((k,), jnp.int32), member)


def ensemble_train_step(train_step: Callable, *, shared_batch: bool = True) -> Callable:
    """`jax.vmap(train_step)` over a stacked ensemble state.

    Args:
      train_step: a step from `make_train_step` (or `make_eval_step`).
      shared_batch: every member sees the same batch (`in_axes=(0, None)`); False: the batch has
        a leading member axis, one batch per member (`in_axes=(0, 0)`, e.g. bootstrap samples).

    Returns:
      The vmapped step; compile it with `jax.jit(..., donate_argnums=0)`. Metrics gain a leading
      member axis.
    """
    return jax.vmap(train_step, in_axes=(0, None if shared_batch else 0))


def ensemble_member(state: PyTree, i: int) -> PyTree:
    """Member `i` of a stacked ensemble state."""
    return jax.tree.map(lambda x: x[i], state)
