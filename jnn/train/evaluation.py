"""evaluate(): a state's metrics over a data set, accumulated on device and read once; and
pad_batch(), which pads a last partial batch with a zero mask so nothing recompiles."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from jnn import compiler
from jnn import metrics as metrics_lib
from jnn.train.state import TrainState
from jnn.train.step import make_eval_step

Batch = Mapping[str, Any]


def pad_batch(batch: Batch, size: int) -> dict:
    """Pads a (last, partial) batch to `size` examples with a zero "mask" on the padding.

    Every entry may be an array or a pytree of arrays (e.g. inputs as a tuple or dict).
    """
    n = len(jax.tree.leaves(batch["labels"])[0])
    mask = np.asarray(batch.get("mask", np.ones(n, np.float32)), np.float32)
    if n == size:
        return {**batch, "mask": mask}
    if n > size:
        raise ValueError(f"pad_batch: batch has {n} examples, more than the padded size {size}.")

    def pad(a):
        a = np.asarray(a)
        return np.concatenate([a, np.zeros((size - n,) + a.shape[1:], a.dtype)])

    padded = jax.tree.map(pad, {k: v for k, v in batch.items() if k != "mask"})
    return {**padded, "mask": pad(mask)}


def evaluate(state: TrainState, data: Iterable[Batch], eval_step: Callable | None = None, *,
             loss_fn: Any = None, confusion: bool = False) -> dict[str, Any]:
    """Evaluates `state` over `data`, accumulating on device and reading once at the end.

    Batches are padded with a mask to `data.batch_size` when `data` has one (a `jnn.data.Pipeline`),
    else to the first batch's size, so neither a last partial batch nor another split of the same
    batch size recompiles the step, and the padding does not change the result.

    Args:
      state: the state to evaluate.
      data: an iterable of batches (e.g. a `jnn.data.Pipeline(..., train=False)`).
      eval_step: a (jitted) step from `make_eval_step`; built from `loss_fn` when None.
      loss_fn: the loss, when `eval_step` is None.
      confusion: also return the confusion matrix and a per-class report (when `eval_step` is None).

    Returns:
      The computed metrics, e.g. {"loss": 0.05, "accuracy": 0.99, "confusion": (C, C) array,
      "report": {...}} (the last two only with a confusion matrix).
    """
    if eval_step is None:
        if loss_fn is None:
            raise ValueError("evaluate: pass eval_step or loss_fn.")
        eval_step = compiler.jit(make_eval_step(loss_fn, confusion=confusion))
    total = None
    size = getattr(data, "batch_size", None)  # a Pipeline: pad every split to the same shape
    size = size if isinstance(size, int) else None
    for batch in data:
        size = size or len(jax.tree.leaves(batch["labels"])[0])
        total = metrics_lib.merge(total, eval_step(state, pad_batch(batch, size)))
    if total is None:
        raise ValueError("evaluate: the evaluation data yielded no batches.")
    result = metrics_lib.compute(total)
    if "confusion" in result:
        result["report"] = metrics_lib.classification_report(np.asarray(result["confusion"]))
    return result
