"""fit(): the training loop around the pure step: evaluation, early stopping, logging, checkpoints.

The loop never syncs with the device per step: train metrics of a logging interval are fetched
together, and evaluation accumulates on device and is read once per evaluation.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np

from jnn import metrics as metrics_lib
from jnn.train.state import TrainState
from jnn.train.step import check_batch, make_eval_step, make_train_step

Batch = Mapping[str, Any]
_EARLY_STOPPING = "early_stopping"  # the key of the early-stopping counters in a checkpoint's data state


@dataclasses.dataclass
class EarlyStopping:
    """Stops when `metric` has not improved by `min_delta` for `patience` evaluations.

    Attributes:
      metric: an evaluation metric name, e.g. "accuracy" or "loss".
      mode: "max" if larger is better, "min" otherwise.
      patience: evaluations without improvement before stopping.
      min_delta: the smallest change that counts as an improvement.
    """

    metric: str = "accuracy"
    mode: str = "max"
    patience: int = 5
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    wait: int = 0

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"EarlyStopping.mode must be 'max' or 'min'; got {self.mode!r}.")

    def improved(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        delta = value - self.best if self.mode == "max" else self.best - value
        return delta > self.min_delta

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Records an evaluation; returns True when training should stop."""
        if self.metric not in metrics:
            raise ValueError(
                f"EarlyStopping: metric {self.metric!r} is not among the evaluation metrics "
                f"{sorted(metrics)}. Fix: choose one of those.")
        value = float(metrics[self.metric])
        if self.improved(value):
            self.best, self.best_step, self.wait = value, step, 0
            return False
        self.wait += 1
        return self.wait >= self.patience


@dataclasses.dataclass
class FitResult:
    """What `fit` returns: the final state and what happened.

    `best` is the best evaluation by the early-stopping metric, or the last evaluation when there
    is no early stopping (the checkpointer's `best_step` ranks by its own `best_metric`).
    `data_state` is the loop's position, as the checkpoints hold it: the train iterator's state
    and the early-stopping counters; pass it back to `fit` to continue.
    """

    state: TrainState
    history: list[dict]
    best: dict | None
    stopped_early: bool
    data_state: dict | None


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
        eval_step = jax.jit(make_eval_step(loss_fn, confusion=confusion))
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


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(pending)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _progress(progress: bool | None, total: int, initial: int):
    from tqdm.auto import tqdm

    enabled = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step",
                leave=False, file=sys.stderr)


def fit(
    state: TrainState,
    train_data: Iterable[Batch],
    *,
    num_steps: int,
    loss_fn: Any = None,
    train_step: Callable | None = None,
    eval_step: Callable | None = None,
    eval_data: Callable[[], Iterable[Batch]] | Iterable[Batch] | None = None,
    eval_every: int | None = None,
    log_every: int = 50,
    early_stopping: EarlyStopping | None = None,
    writer: Any = None,
    checkpointer: Any = None,
    data_state: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    stop_at: int | None = None,
) -> FitResult:
    """Trains `state` until `num_steps` (counting from step 0), evaluating and checkpointing.

    Example:
      >>> splits = jnn.data.load("digits")
      >>> result = jnn.fit(state, jnn.data.Pipeline(splits.train, 64), num_steps=500,
      ...                  loss_fn="cross_entropy", eval_data=jnn.data.Pipeline(splits.val, 256, train=False),
      ...                  eval_every=100, early_stopping=jnn.EarlyStopping("accuracy", patience=3))

    Args:
      state: the state to train; a restored state continues from its `step`. Its buffers are
        donated to the compiled step (no copy of the parameters): use `result.state` afterwards.
      train_data: an iterable (or iterator) of batches; if its iterator has `get_state`/`set_state`
        (grain), its position is checkpointed and restored with `data_state`.
      num_steps: the step at which training ends.
      loss_fn: the loss, used to build the steps when `train_step`/`eval_step` are not given.
      train_step: a compiled step `(state, batch) -> (state, metrics)`; default
        `jax.jit(make_train_step(loss_fn), donate_argnums=0)`.
      eval_step: a compiled eval step; default `jax.jit(make_eval_step(loss_fn))`.
      eval_data: batches to evaluate on (an iterable re-iterated at each evaluation, or a function
        returning one).
      eval_every: evaluate every this many steps (and at the end); default: 10 times per run.
      log_every: average and write train metrics every this many steps.
      early_stopping: an `EarlyStopping` on an evaluation metric.
      writer: any object with `write(step, metrics, split)` (see `jnn.writers`).
      checkpointer: a `jnn.Checkpointer`; saved at each evaluation (with its metrics) and at the end.
      data_state: the loop's saved position, from `Checkpointer.restore`: the train iterator's
        state, and the early-stopping counters under "early_stopping" (so a resumed run keeps
        its best value and patience).
      progress: show a tqdm bar (default: only when stderr is a terminal).
      stop_at: end this call at this step, before `num_steps`, with a checkpoint, as a preempted
        job stops (it evaluates only if `stop_at` is an evaluation step anyway). Calling `fit`
        again from that checkpoint (with its `data_state`) then evaluates, stops early and ends
        with the state of an uninterrupted run, bit for bit; only the train-metric record logged
        at `stop_at` is extra.

    Returns:
      A `FitResult` with the final state, the history of logged records, the best evaluation and
      whether early stopping ended the run.
    """
    if train_step is None or eval_step is None:
        if loss_fn is None:
            raise ValueError("fit: pass loss_fn, or both train_step and eval_step.")
    train_step = train_step or jax.jit(make_train_step(loss_fn), donate_argnums=0)
    if eval_data is not None and eval_step is None:
        eval_step = jax.jit(make_eval_step(loss_fn))
    eval_every = eval_every or max(num_steps // 10, 1)
    iterator: Iterator[Batch] = train_data if hasattr(train_data, "__next__") else iter(train_data)
    data_state = dict(data_state or {})
    stopping_state = data_state.pop(_EARLY_STOPPING, None)
    if data_state:
        if not hasattr(iterator, "set_state"):
            raise ValueError("fit: data_state was given but the train data iterator has no set_state().")
        iterator.set_state(data_state)

    history: list[dict] = []
    best: dict | None = None
    stopped_early = False
    if stopping_state is not None and early_stopping is not None:  # a resumed run keeps its patience
        saved = (stopping_state.get("metric"), stopping_state.get("mode"))
        if saved != (early_stopping.metric, early_stopping.mode):
            raise ValueError(
                f"fit: the checkpoint's early-stopping counters are for metric {saved[0]!r} ({saved[1]}), but "
                f"early_stopping watches {early_stopping.metric!r} ({early_stopping.mode}). Fix: resume with the "
                f"same EarlyStopping, or drop 'early_stopping' from data_state to start its patience anew.")
        early_stopping.best, early_stopping.best_step, early_stopping.wait = (
            stopping_state["best"], stopping_state["best_step"], stopping_state["wait"])
        best = stopping_state.get("best_record")  # the whole evaluation record of the best step
        stopped_early = early_stopping.wait >= early_stopping.patience  # it had stopped already
    step = int(jax.device_get(state.step))
    pending: list[dict] = []
    batch_size = None
    last_log_time, last_log_step = time.perf_counter(), step

    def log(split: str, values: Mapping[str, float]):
        record = {"step": step, "split": split, **values}
        history.append(record)
        if writer is not None:
            writer.write(step, values, split)

    def run_eval() -> dict[str, float] | None:
        nonlocal best, stopped_early
        if eval_data is None:
            return None
        data = eval_data() if callable(eval_data) else eval_data
        values = {k: v for k, v in evaluate(state, data, eval_step).items()
                  if not isinstance(v, Mapping) and np.ndim(v) == 0}
        log("eval", values)
        if early_stopping is not None:
            stopped_early = early_stopping.update(step, values)
            if early_stopping.best_step == step:
                best = {"step": step, **values}
        elif best is None or step >= best["step"]:
            best = {"step": step, **values}
        return values

    # A state restored from a checkpoint of this step is saved already (orbax refuses a second save).
    last_saved = step if checkpointer is not None and step in checkpointer.all_steps() else None
    synced = iterator.get_state() if hasattr(iterator, "get_state") else None  # position matching `state`

    def loop_state() -> dict | None:
        """What a resumed `fit` needs besides the train state: data position, early-stopping counters."""
        out = dict(synced or {})
        if early_stopping is not None:
            out[_EARLY_STOPPING] = {
                "metric": early_stopping.metric, "mode": early_stopping.mode, "best": early_stopping.best,
                "best_step": early_stopping.best_step, "wait": early_stopping.wait, "best_record": best}
        return out or None

    def save(values: Mapping[str, float] | None):
        nonlocal last_saved
        if checkpointer is None or last_saved == step:
            return
        checkpointer.save(state, data_state=loop_state(), metrics=values)
        last_saved = step

    end = num_steps if stop_at is None else min(stop_at, num_steps)
    bar = _progress(progress, num_steps, step)
    try:
        while step < end and not stopped_early:
            batch = next(iterator)
            if batch_size is None:  # host-side check of the first batch, with label values
                check_batch(state, batch, where="fit")
                batch_size = len(jax.tree.leaves(batch["labels"])[0])
            state, metrics = train_step(state, batch)
            step += 1
            if synced is not None:
                synced = iterator.get_state()
            pending.append(metrics)
            bar.update(1)
            if step % log_every == 0 or step == end:
                values = _mean_metrics(pending)
                now = time.perf_counter()
                values["examples_per_sec"] = (step - last_log_step) * batch_size / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step, pending = now, step, []
                log("train", values)
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()
                                 if k in ("loss", "accuracy", "learning_rate", "examples_per_sec")}, refresh=False)
            if step % eval_every == 0 or step == num_steps:
                values = run_eval()
                save(values)
        if step < num_steps and not stopped_early:  # stopped at `stop_at`: resumable, not evaluated
            save(None)
    except KeyboardInterrupt:  # keep what was trained: checkpoint, then re-raise
        try:  # `state` and `synced` always describe the last completed step
            save(None)
        except Exception as err:  # noqa: BLE001 - e.g. interrupted inside the donating step
            print(f"fit: interrupted; could not save a checkpoint at step {step}: {err}", file=sys.stderr)
        raise
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.wait()
        if writer is not None and hasattr(writer, "flush"):
            writer.flush()
    return FitResult(state=state, history=history, best=best, stopped_early=stopped_early, data_state=loop_state())
