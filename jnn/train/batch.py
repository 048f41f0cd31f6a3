"""`check_batch`: a batch checked against the model a state was created with (keys, shapes,
dtypes, the mask's shape, label values), with an error that says what was expected and how to fix
it. It runs on shapes only, so under `jax.jit` it happens while tracing, before anything compiles.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jnn import losses as losses_lib
from jnn.train.state import TrainState

Batch = Mapping[str, Any]


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _is_classification(spec, labels_shape, labels_dtype) -> bool:
    """Integer labels with one axis fewer than the model's output: class ids."""
    if spec is None or not spec.output_shape:
        return False
    if not jnp.issubdtype(labels_dtype, jnp.integer):
        return False
    return len(labels_shape) == len(spec.output_shape)  # (B, *out[:-1]) vs (*out)


def check_batch(state: TrainState, batch: Batch, *, where: str = "train_step") -> None:
    """Checks a batch against the model the state was created with.

    Shapes, dtypes and keys are checked always (at trace time under `jax.jit`); label values are
    checked against the number of classes when they are concrete (not traced), so call this on
    host batches to catch out-of-range labels in jitted code.

    Args:
      state: a `TrainState` from `create_train_state`.
      batch: a dict with "inputs" and "labels" (and optionally "mask").
      where: name used in error messages.

    Raises:
      ValueError: naming the key, the expected and the received shape/dtype, and the fix.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"{where}: expected the batch to be a dict with keys 'inputs' and 'labels', got "
            f"{type(batch).__name__}. Fix: pass {{'inputs': x, 'labels': y}}."
        )
    missing = [k for k in ("inputs", "labels") if k not in batch]
    if missing:
        raise ValueError(
            f"{where}: batch is missing key(s) {missing}; expected 'inputs' and 'labels', got keys "
            f"{sorted(batch)}. Fix: pass {{'inputs': x, 'labels': y, ...}}."
        )
    inputs, labels = batch["inputs"], batch["labels"]
    for key in ("inputs", "labels", "mask"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(batch.get(key)):
            check_numeric(leaf, f"batch[{key!r}]{jax.tree_util.keystr(path)}", where)
    spec = state.spec
    in_shape = _check_inputs(spec, inputs, where)
    if isinstance(labels, (Mapping, tuple, list)):  # structured labels: only the batch axis is checked
        for path, leaf in jax.tree_util.tree_leaves_with_path(labels):
            if not np.shape(leaf) or np.shape(leaf)[0] != in_shape[0]:
                raise ValueError(
                    f"{where}: batch['labels']{jax.tree_util.keystr(path)} has shape {np.shape(leaf)} but "
                    f"batch['inputs'] has batch size {in_shape[0]}; expected the same leading batch size.")
        return
    lab_shape = tuple(np.shape(labels))
    if not lab_shape or not in_shape or lab_shape[0] != in_shape[0]:
        raise ValueError(
            f"{where}: batch['labels'] has shape {lab_shape} but batch['inputs'] has shape "
            f"{in_shape}; expected the same leading batch size. Fix: pass one label per example."
        )
    if "mask" in batch:
        mask_shape = tuple(np.shape(batch["mask"]))
        if not mask_shape or mask_shape[0] != lab_shape[0] or not losses_lib.mask_fits(mask_shape, lab_shape):
            raise ValueError(
                f"{where}: batch['mask'] has shape {mask_shape}; expected a prefix of the labels' "
                f"shape {lab_shape} (axes after the first may be 1), e.g. ({lab_shape[0]},). Fix: one "
                f"weight per example."
            )
    if lab_shape[0] == 0:
        raise ValueError(f"{where}: the batch is empty (batch['labels'] has shape {lab_shape}); a step "
                         f"needs at least one example. Fix: skip empty batches.")
    lab_dtype = jnp.result_type(labels)
    if spec is not None and spec.output_kind == "array" and len(spec.output_shape) >= 1 \
            and spec.output_shape[-1] > 1 and lab_shape[1:] != spec.output_shape:
        want_ids = ("B",) + spec.output_shape[:-1]
        if len(lab_shape) == len(want_ids) + 1 and lab_shape[-1] == 1 and lab_shape[1:-1] == spec.output_shape[:-1]:
            raise ValueError(
                f"{where}: batch['labels'] has shape {lab_shape}; the model outputs "
                f"{_fmt(('B',) + spec.output_shape)} class scores, so class-id labels have shape "
                f"{_fmt(want_ids)}. Fix: labels.reshape({', '.join(['-1'] + [str(d) for d in want_ids[1:]])}).")
        if jnp.issubdtype(lab_dtype, jnp.floating) and len(lab_shape) == len(want_ids):
            raise ValueError(
                f"{where}: batch['labels'] has dtype {lab_dtype} and shape {lab_shape}; the model outputs "
                f"{spec.output_shape[-1]} class scores per example, so labels are integer class ids "
                f"{_fmt(want_ids)} or one-hot / probability vectors {_fmt(('B',) + spec.output_shape)}. "
                f"Fix: labels.astype('int32').")
    if _is_classification(spec, lab_shape, lab_dtype):
        num_classes = spec.output_shape[-1]
        if lab_shape[1:] != spec.output_shape[:-1]:
            raise ValueError(
                f"{where}: batch['labels'] has shape {lab_shape}; the model outputs "
                f"{_fmt(('B',) + spec.output_shape)}, so integer labels must have shape "
                f"{_fmt(('B',) + spec.output_shape[:-1])}."
            )
        if _is_concrete(labels) and np.size(labels):
            lab = np.asarray(labels)
            lo, hi = int(lab.min()), int(lab.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"{where}: batch['labels'] has values in [{lo}, {hi}]; the model has "
                    f"{num_classes} output classes, so labels must lie in [0, {num_classes - 1}]. "
                    f"Fix: remap the labels, or build the model with num_classes={hi + 1}."
                )


def check_numeric(x: Any, name: str, where: str, *, error: type[Exception] = ValueError) -> None:
    """Refuses strings and Python objects, which JAX cannot hold (it would fail inside tracing)."""
    kind = getattr(getattr(x, "dtype", None), "kind", None)
    if kind is None and isinstance(x, (str, bytes, list)):
        kind = np.asarray(x).dtype.kind
    if kind not in ("U", "S", "O"):
        return
    sample = np.asarray(x).ravel()[:3].tolist()
    what = "class labels" if "labels" in name else "values"
    raise error(
        f"{where}: {name} holds {'strings' if kind in 'US' else 'Python objects'} ({np.asarray(x).dtype}, "
        f"e.g. {sample}); expected numeric arrays (integer class ids or floats). Fix: map the {what} to "
        f"numbers first, e.g. names, ids = np.unique(labels, return_inverse=True), then pass ids.astype('int32').")


def _same_kind(got: Any, want: Any) -> bool:
    """Same kind of number: floats (bfloat16 and float16 included), integers, booleans, complex."""
    kinds = (jnp.floating, jnp.integer, jnp.bool_, jnp.complexfloating)
    return any(jnp.issubdtype(got, k) and jnp.issubdtype(want, k) for k in kinds)


def _check_inputs(spec, inputs: Any, where: str) -> tuple:
    """Checks `batch["inputs"]` (an array or a pytree of arrays) against the spec; returns the
    shape of its first array (whose leading axis is the batch size)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(inputs)
    if not leaves:
        raise ValueError(f"{where}: batch['inputs'] holds no arrays; expected "
                         f"{'an array' if spec is None else _fmt(('B',) + spec.shape)}.")
    if spec is not None and tree != spec.input_tree:
        raise ValueError(
            f"{where}: batch['inputs'] has structure {tree}; the model was initialised with inputs "
            f"of structure {spec.input_tree}. Fix: pass the inputs in the same form (array, tuple or "
            f"dict with the same keys) as the example inputs given to create_train_state.")
    sizes = set()
    for i, (path, x) in enumerate(leaves):
        name = "batch['inputs']" + jax.tree_util.keystr(path)
        shape, dtype = tuple(np.shape(x)), jnp.result_type(x)
        if not shape:
            raise ValueError(f"{where}: {name} is a scalar; expected a leading batch axis. Fix: pass a "
                             f"batch of examples, x[None] for one.")
        sizes.add(shape[0])
        if spec is None:
            continue
        _, want_shape, want_dtype = spec.inputs[i]
        expected = ("B",) + want_shape
        if len(shape) != len(expected):
            raise ValueError(
                f"{where}: {name} has rank {len(shape)} (shape {shape}); the model was "
                f"initialised with inputs of shape {_fmt(expected)} (rank {len(expected)}). Fix: reshape "
                f"the inputs to {_fmt(expected)}, or recreate the state with example inputs of the "
                f"new shape.")
        if shape[1:] != want_shape:
            raise ValueError(
                f"{where}: {name} has shape {shape}; expected {_fmt(expected)} (per-example "
                f"shape {want_shape}, as in the example inputs given to create_train_state). Fix: "
                f"resize the inputs, or recreate the state with example inputs of the new shape.")
        if not _same_kind(dtype, jnp.dtype(want_dtype)):
            raise ValueError(
                f"{where}: {name} has dtype {dtype}; expected {want_dtype} (the dtype of "
                f"the example inputs given to create_train_state). Fix: inputs.astype({want_dtype!r}).")
    if len(sizes) > 1:
        raise ValueError(f"{where}: the arrays of batch['inputs'] have different batch sizes "
                         f"{sorted(sizes)}; expected one leading batch axis shared by all.")
    return tuple(np.shape(leaves[0][1]))


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
