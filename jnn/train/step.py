"""make_train_step / make_eval_step: pure `(state, batch) -> (state, metrics)` functions.

The step is written once and compiled by the caller: `jax.jit` (with `donate_argnums=0`),
`jax.vmap` (ensembles), `jax.pmap` / `shard_map` (pass `axis_name`: gradients, losses, metrics and
batch statistics are then reduced across that axis), or `jnn.parallel.data_parallel` (sharded jit).

Batches are dicts with "inputs" and "labels" and optional extra keys; a "mask" key weighs examples
(1 = counts, 0 = padding), which is how a padded last batch is evaluated exactly.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Collection
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jnn import losses as losses_lib
from jnn import metrics as metrics_lib
from jnn import optim as optim_lib
from jnn import precision as precision_lib
from jnn.train.batch import check_batch
from jnn.train.state import TrainState, describe

LossFn = Callable[[Any, jax.Array], jax.Array]
Batch = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------
# Loss reduction and metrics, shared by the train and eval steps.
# ----------------------------------------------------------------------------------------------


def _takes_batch(fn: Callable) -> bool:
    try:
        parameter = inspect.signature(fn).parameters.get("batch")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def _array_loss(fn: Callable) -> bool:
    """A library loss that takes the model's output array (jnn.losses, optax.losses)."""
    fn = getattr(fn, "func", fn)  # functools.partial
    if fn in losses_lib.STRUCTURED_OUTPUT_LOSSES:  # e.g. "elbo": the VAE's (logits, mean, logvar)
        return False
    module = getattr(fn, "__module__", "") or ""
    return module.startswith(("jnn.losses", "optax"))


def resolve_loss(loss_fn: LossFn | str) -> Callable[[Any, Any, Batch], jax.Array]:
    """The loss as `loss(outputs, labels, batch)`.

    `loss_fn` is a callable `loss_fn(outputs, labels)`, or `loss_fn(outputs, labels, batch)` when it
    has a parameter named `batch` (for losses that read other batch entries, e.g. per-token
    weights); a string names a `jnn.losses` function. A library loss (jnn.losses, optax) given a
    model that returns a tuple or dict raises a `ValueError` that says how to write the loss.
    """
    name = loss_fn if isinstance(loss_fn, str) else getattr(loss_fn, "__name__", repr(loss_fn))
    fn = losses_lib.get(loss_fn) if isinstance(loss_fn, str) else loss_fn
    if not callable(fn):
        raise ValueError(f"expected a loss function loss(outputs, labels) or a jnn.losses name, got "
                         f"{type(loss_fn).__name__}.")
    wants_batch, array_loss = _takes_batch(fn), _array_loss(fn)

    def loss(outputs, labels, batch):
        if array_loss and not isinstance(outputs, (jax.Array, np.ndarray)):
            raise ValueError(
                f"the loss {name!r} takes the model's output array, but the model returns a "
                f"{describe(outputs)}. A loss receives the model's whole output. Fix: write "
                f"loss_fn(outputs, labels) that picks the part to score, e.g. "
                f"lambda out, y: jnn.losses.cross_entropy(out[0], y) (or out['logits']); give it a "
                f"`batch` parameter to read other batch entries.")
        return fn(outputs, labels, batch=batch) if wants_batch else fn(outputs, labels)

    return loss


def _weighted_sum(values: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Sum of `values` weighted by `mask` (broadcast over trailing axes), and the total weight."""
    values = jnp.asarray(values, jnp.float32) if values.dtype != jnp.float64 else values
    if values.ndim == 0:
        if mask is not None:
            raise ValueError(
                "the loss function returned a scalar, but the batch has a 'mask', which needs one "
                "loss per example. Fix: return per-example losses (no mean) from the loss function."
            )
        return values, jnp.ones((), values.dtype)
    if mask is None:
        return values.sum(), jnp.asarray(values.size, values.dtype)
    return losses_lib.masked_sum(values, mask)


def _invalid_labels_to_nan(losses: jax.Array, outputs: Any, labels: Any) -> jax.Array:
    """NaN where a class-id label is out of range: optax's integer-label cross-entropy reads label -1
    as the last class, a silently wrong loss; NaN is caught by the non-finite policy."""
    if not isinstance(outputs, jax.Array) or not isinstance(labels, (jax.Array, np.ndarray)) \
            or not jnp.issubdtype(labels.dtype, jnp.integer) or labels.ndim != outputs.ndim - 1 \
            or outputs.shape[-1] < 2:  # one output: a regression with integer targets, not class ids
        return losses
    valid = (labels >= 0) & (labels < outputs.shape[-1])  # (B, ...)
    if losses.shape != valid.shape:
        valid = jnp.all(valid) if losses.ndim == 0 else \
            jnp.all(valid.reshape(valid.shape[0], -1), axis=-1).reshape((-1,) + (1,) * (losses.ndim - 1))
    return jnp.where(valid, losses, jnp.nan)


def _without_padding(tree: Any, mask: jax.Array | None) -> Any:
    """Zeroes the float values of padded examples (mask 0), so a NaN there cannot reach a gradient
    (a zero weight on its loss does not stop a NaN: 0 * NaN = NaN in the backward pass)."""
    if mask is None:
        return tree
    keep = jnp.any(jnp.reshape(mask, (jnp.shape(mask)[0], -1)) > 0, axis=-1)  # (B,)

    def select(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating) or jnp.ndim(x) < 1:
            return x
        return jnp.where(keep.reshape((-1,) + (1,) * (jnp.ndim(x) - 1)), x, jnp.zeros((), jnp.result_type(x)))

    return jax.tree.map(select, tree)


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating value in `tree` is finite, exactly (a boolean scalar). For the model
    state (BatchNorm statistics and the like: small, and possibly holding sentinels such as
    `finfo.max`, whose sums would overflow)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _sums_finite(tree: Any) -> jax.Array:
    """Whether every floating value in `tree` is finite, read from one sum per leaf (a boolean
    scalar): NaN and Inf propagate through a sum, and +Inf + -Inf is NaN, so a leaf's sum is finite
    exactly when its values are, short of a sum past the dtype's range (~3e38 in float32; half
    precision sums in float32), which counts as non-finite too. For gradients.

    The cheapest exact check found on a CPU (`benchmarks/studies/README.md`, "The non-finite guard's cost"):
    a sum costs half a sum of squares (XLA:CPU squares in a separate pass), and there an array's
    sums over its leading axes as one product with ones (a library call, no reshape: a sharded
    axis stays sharded) cost less than XLA's reduction passes.
    """
    on_cpu = jax.default_backend() == "cpu"
    flags = []
    for x in jax.tree.leaves(tree):
        dtype = jnp.result_type(x)
        if not jnp.issubdtype(dtype, jnp.inexact) or jnp.size(x) == 0:
            continue
        if jnp.issubdtype(dtype, jnp.complexfloating):
            x, dtype = jnp.stack([jnp.real(x), jnp.imag(x)]), jnp.finfo(dtype).dtype
        if on_cpu and jnp.ndim(x) >= 2 and dtype in (jnp.float32, jnp.float64):
            lead = tuple(range(jnp.ndim(x) - 1))
            columns = lax.dot_general(jnp.ones(jnp.shape(x)[:-1], dtype), x, ((lead, lead), ((), ())))
            total = jnp.sum(columns)
        else:  # half precision sums in float32: a float16 sum would overflow at 65504
            total = jnp.sum(x, dtype=jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype)
        flags.append(jnp.isfinite(total))
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _global_norm(grads: Any) -> jax.Array:
    """`optax.tree.norm`, with half-precision leaves squared and summed in float32 (in float16 a
    norm above 256 would overflow: a reported Inf, and a false non-finite step)."""
    return optax.tree.norm(jax.tree.map(
        lambda g: g.astype(jnp.float32) if jnp.issubdtype(g.dtype, jnp.floating) and jnp.finfo(g.dtype).bits < 32
        else g, grads))


NONFINITE_POLICIES = ("apply", "skip", "raise")


def _accuracy_counts(outputs, labels, mask) -> tuple[jax.Array, jax.Array] | None:
    """(correct, count) for classification outputs, or None when accuracy does not apply."""
    if not isinstance(outputs, jax.Array) or outputs.ndim < 2 or not isinstance(labels, (jax.Array, np.ndarray)):
        return None
    if jnp.issubdtype(labels.dtype, jnp.integer) and labels.ndim == outputs.ndim - 1:
        correct = (jnp.argmax(outputs, -1) == labels).astype(jnp.float32)
    elif labels.shape == outputs.shape and jnp.issubdtype(labels.dtype, jnp.floating):
        correct = (jnp.argmax(outputs, -1) == jnp.argmax(labels, -1)).astype(jnp.float32)
    else:
        return None
    return _weighted_sum(correct, mask)


def _psum(tree, axis_name):
    return tree if axis_name is None else lax.psum(tree, axis_name)


def step_rng(state: TrainState, axis_name: str | None = None) -> jax.Array:
    """The step's key, `fold_in(state.key, state.step)`; each rng stream the model draws from gets
    `jnn.train.model.stream_key(key, name)`."""
    rng = jax.random.fold_in(state.key, state.step)
    if axis_name is not None:  # different dropout masks on each device's shard of the batch
        rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    return rng


def _mean_batch_stats(model, model_state, axis_name, devices, others):
    """psums `others` and the BatchNorm statistics of `model_state` in one all-reduce; averages the
    statistics. Other collections keep their dtype and per-device values."""
    leaves, tree = jax.tree.flatten(model_state)
    flags = model.batch_stats_flags(model_state)
    stats = [x for x, is_stat in zip(leaves, flags) if is_stat]
    others, stats = lax.psum((others, stats), axis_name)
    means = iter(x / devices for x in stats)
    return others, jax.tree.unflatten(tree, [next(means) if is_stat else x for x, is_stat in zip(leaves, flags)])


def _check_state_types(old: Any, new: Any) -> None:
    """Refuses (while tracing) a model that changes the dtype or shape of its own state: the next
    step would compile again, and a skipped step could not keep the old state."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(old), jax.tree.leaves(new)):
        if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            raise ValueError(
                f"train_step: the model changed model_state{jax.tree_util.keystr(path)} from {jnp.result_type(a)} "
                f"{tuple(jnp.shape(a))} to {jnp.result_type(b)} {tuple(jnp.shape(b))} in one step; expected its "
                f"variables to keep their dtype and shape (the next step would compile again). Fix: cast the "
                f"update to the variable's dtype, e.g. new.astype(var.value.dtype).")


def _learning_rate(opt_state) -> jax.Array | None:
    """The current learning rate if the optimizer state holds one (`optax.inject_hyperparams`),
    times the scale of a `jnn.optim.Plateau` in the chain."""
    try:
        lr = optax.tree_utils.tree_get(
            opt_state, "learning_rate", filtering=lambda _, value: isinstance(value, jax.Array))
    except KeyError:  # several (e.g. multi_transform with two injected optimizers): ambiguous
        return None
    if lr is None:
        return None
    scale = optim_lib.plateau_scale(opt_state)
    lr = jnp.asarray(lr, jnp.float32)
    return lr if scale is None else lr * scale.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# The steps.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """A step function and the contract a wrapper needs to run it, as a value.

    Call it like the function (`step(state, batch)`); `jax.jit`, `jax.vmap`, `jax.pmap` and
    `jnn.parallel` take it as it is, and the parallel wrappers read its fields instead of guessing:
    whether it reduces over a device axis, and whether it returns a new state.

    Attributes:
      fn: the pure function: `(state, batch) -> (state, metrics)` for "train",
        `(state, batch) -> metrics` for "eval".
      kind: "train" or "eval".
      axis_name: the device axis its collectives reduce over (pmap / shard_map), or None.
      on_nonfinite: a train step's non-finite policy (see `make_train_step`).
    """

    fn: Callable
    kind: str
    axis_name: str | None = None
    on_nonfinite: str = "apply"

    def __post_init__(self):
        if self.kind not in ("train", "eval"):
            raise ValueError(f"Step: kind={self.kind!r}; expected 'train' or 'eval'.")

    def __call__(self, state, batch):
        return self.fn(state, batch)

    @property
    def __name__(self) -> str:  # noqa: A003 - what jax.jit names the program (profiles, HLO dumps)
        return getattr(self.fn, "__name__", f"{self.kind}_step")


TRAIN_METRICS = ("loss", "accuracy", "grad_norm", "learning_rate")


def make_train_step(
    loss_fn: LossFn | str,
    *,
    axis_name: str | None = None,
    metrics: Collection[str] = TRAIN_METRICS,
    validate: bool = True,
    on_nonfinite: str = "skip",
) -> "Step":
    """Returns a pure `train_step(state, batch) -> (new_state, metrics)`, as a `Step`.

    Example:
      >>> step = jax.jit(jnn.make_train_step(optax.softmax_cross_entropy_with_integer_labels),
      ...                donate_argnums=0)
      >>> state, metrics = step(state, {"inputs": x, "labels": y})

    Args:
      loss_fn: `loss_fn(outputs, labels)` returning per-example (or per-element) losses or their
        mean, e.g. `optax.softmax_cross_entropy_with_integer_labels`; or the name of a
        `jnn.losses` function ("cross_entropy", "nll", "mse", ...).
      axis_name: the mapped axis (under `jax.pmap` or `shard_map`) over which gradients, the loss,
        metrics and batch statistics are reduced. None for single-device or sharded jit.
      metrics: which metrics to compute, of `TRAIN_METRICS`: "loss" (always computed),
        "accuracy" (when outputs are class scores and labels class ids or one-hot), "grad_norm"
        (the global L2 norm of the gradient) and "learning_rate" (when the optimizer exposes one,
        as `jnn.optim.make_optimizer` and `optax.inject_hyperparams` do). Each costs a little:
        the gradient norm is one more pass over every gradient (measured in
        `benchmarks/studies/README.md`); `metrics=("loss",)` is the bare step.
      validate: check the batch against the model before tracing (see `check_batch`).
      on_nonfinite: what a step whose loss, gradients or model state are not finite (NaN or Inf)
        does. "skip" (the default) and "raise": the step leaves params, opt_state and model_state
        bitwise unchanged (a `lax.cond` around the update; `step` still advances, as the data did)
        and reports `nonfinite` = 1.0 in its metrics; `jnn.fit` counts those, stopping after
        `max_nonfinite` consecutive ones ("skip") or at the first ("raise") with an error naming
        the step and the batch position. With the default metrics the check reads the gradient
        norm the `grad_norm` metric computes anyway (its cost: `benchmarks/studies/README.md`). "apply":
        the bare step, which applies a NaN update (every parameter becomes NaN, silently).

    Returns:
      `train_step`, whose metrics are scalars named as in `metrics` (plus "nonfinite" when
      `on_nonfinite` is "skip" or "raise").

    Raises:
      ValueError: an unknown metric name or non-finite policy.
    """
    loss_fn = resolve_loss(loss_fn)
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = sorted(set(metrics) - set(TRAIN_METRICS))
    if unknown:
        raise ValueError(f"make_train_step: unknown metric(s) {unknown}; expected a collection of "
                         f"{list(TRAIN_METRICS)}. Fix: e.g. metrics=('loss', 'accuracy').")
    want = frozenset(metrics)
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"make_train_step: on_nonfinite={on_nonfinite!r}; expected one of "
                         f"{list(NONFINITE_POLICIES)}.")

    def train_step(state: TrainState, batch: Batch):
        if validate:
            check_batch(state, batch, where="train_step")
        inputs, labels, mask = batch["inputs"], batch["labels"], batch.get("mask")
        inputs, labels = _without_padding((inputs, labels), mask)
        rng = step_rng(state, axis_name)
        devices = 1 if axis_name is None else lax.axis_size(axis_name)

        loss_scale = state.loss_scale  # float16 policies: the loss is scaled, the gradient unscaled

        def compute_loss(params):
            outputs, new_model_state = state.model.apply(params, state.model_state, inputs, train=True,
                                                         rng=rng, axis_name=axis_name)
            losses = _invalid_labels_to_nan(jnp.asarray(loss_fn(outputs, labels, batch)), outputs, labels)
            loss_sum, weight = _weighted_sum(losses, mask)
            if mask is None:  # the global weight is static: the mean's 1/N folds into the backward pass
                loss_sum = loss_sum / (weight * devices)
            scaled = loss_sum if loss_scale is None else loss_sum * loss_scale.scale
            return scaled, (loss_sum, outputs, new_model_state, lax.stop_gradient(weight))

        # With a mask, differentiate the weighted *sum* and divide by the total weight afterwards: the
        # weight does not depend on the parameters, so this is the gradient of the mean, and across
        # devices it needs a single all-reduce of everything (as a hand-written pmean step does), not
        # one per quantity (pmap on 8 CPU devices vs a hand-written pmap step: 1.38x -> 1.12x).
        (_, (loss, outputs, new_model_state, weight)), grads = jax.value_and_grad(
            compute_loss, has_aux=True)(state.params)
        _check_state_types(state.model_state, new_model_state)
        if loss_scale is not None:
            grads = jax.tree.map(lambda g: g / loss_scale.scale.astype(g.dtype), grads)
        counts = _accuracy_counts(outputs, labels, mask) if "accuracy" in want else None
        if axis_name is not None:
            (grads, loss, weight, counts), new_model_state = _mean_batch_stats(
                state.model, new_model_state, axis_name, devices, (grads, loss, weight, counts))
        if mask is not None:
            scale = 1.0 / jnp.maximum(weight, 1e-12)
            grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
            loss = loss * scale
        out = {"loss": loss}
        guarded = on_nonfinite != "apply" or loss_scale is not None
        norm = _global_norm(grads) if "grad_norm" in want else None
        update = lambda: state.apply_gradients(grads, model_state=new_model_state, value=loss)  # noqa: E731
        if not guarded:
            new_state = update()
        else:  # keep the old state, bitwise, when anything is not finite (`step` still advances)
            # A cond, not a select of the whole state: the update then writes in place into the
            # donated buffers, where a select must first copy the old optimizer state. The gradients
            # are finite exactly when their global norm is (short of a norm that overflows float32,
            # |g| ~ 1e19, which counts as non-finite too); without the norm metric, their sums are
            # the cheaper check (measured in benchmarks/studies/README.md, "The non-finite guard's cost").
            loss_ok = jnp.isfinite(loss) & _all_finite(new_model_state)
            grads_ok = jnp.isfinite(norm) if norm is not None else _sums_finite(grads)
            finite = loss_ok & grads_ok
            new_state = lax.cond(finite, update, lambda: state.replace(step=state.step + 1))
            if loss_scale is not None:  # an overflow is the loss scale's business: halve it, skip
                new_state = new_state.replace(loss_scale=precision_lib.adjust(
                    loss_scale, grads_ok, state.model.precision))
                out["loss_scale"] = new_state.loss_scale.scale
            if on_nonfinite != "apply":  # with a loss scale, only a non-finite loss counts here
                out["nonfinite"] = 1.0 - (finite if loss_scale is None else loss_ok).astype(jnp.float32)
        if "grad_norm" in want:
            out["grad_norm"] = norm
        if counts is not None:
            correct, count = counts
            out["accuracy"] = correct / jnp.maximum(count, 1.0)
        lr = _learning_rate(new_state.opt_state) if "learning_rate" in want else None
        if lr is not None:
            out["learning_rate"] = lr
        return new_state, out

    return Step(train_step, "train", axis_name, on_nonfinite)


def make_eval_step(
    loss_fn: LossFn | str,
    *,
    axis_name: str | None = None,
    confusion: bool = False,
    top_k: tuple[int, ...] = (),
    validate: bool = True,
) -> "Step":
    """Returns a pure `eval_step(state, batch) -> metrics` (a `Step`) that runs the model in eval mode.

    The metrics are mergeable accumulators (`jnn.metrics.Average`, `jnn.metrics.ConfusionMatrix`):
    sum them over batches on device with `jnn.metrics.merge` and read them once at the end with
    `jnn.metrics.compute`. A "mask" in the batch excludes padding examples exactly.

    Args:
      loss_fn: as in `make_train_step`.
      axis_name: mapped axis over which the accumulators are summed (pmap / shard_map).
      confusion: also accumulate a confusion matrix (classification only).
      top_k: also accumulate top-k accuracy for each k (classification only).
      validate: check the batch before tracing.

    Returns:
      `eval_step` returning a dict with "loss" and, for classification, "accuracy" (plus
      "top_{k}_accuracy" and "confusion" when asked).
    """
    loss_fn = resolve_loss(loss_fn)

    def eval_step(state: TrainState, batch: Batch):
        if validate:
            check_batch(state, batch, where="eval_step")
        inputs, labels, mask = batch["inputs"], batch["labels"], batch.get("mask")
        outputs, _ = state.model.apply(state.params, state.model_state, inputs, train=False,
                                       rng=step_rng(state, axis_name), axis_name=axis_name)
        losses = _invalid_labels_to_nan(jnp.asarray(loss_fn(outputs, labels, batch)), outputs, labels)
        out: dict[str, Any] = {"loss": metrics_lib.Average(*_weighted_sum(losses, mask))}
        counts = _accuracy_counts(outputs, labels, mask)
        if counts is not None:
            out["accuracy"] = metrics_lib.Average(*counts)
            class_ids = labels if labels.ndim == outputs.ndim - 1 else jnp.argmax(labels, -1)
            for k in top_k:
                hits = metrics_lib.top_k_correct(outputs, class_ids, k)
                out[f"top_{k}_accuracy"] = metrics_lib.Average(*_weighted_sum(hits, mask))
            if confusion:
                out["confusion"] = metrics_lib.ConfusionMatrix.from_predictions(
                    jnp.argmax(outputs, -1), class_ids, outputs.shape[-1], mask)
        return _psum(out, axis_name)

    return Step(eval_step, "eval", axis_name)
