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


class NonFiniteError(ValueError):
    """Training met non-finite steps (NaN or Inf loss or gradients) it was told not to go past
    (a ValueError: the usual cause is bad data, and the `jnn` command reports it in one line)."""


class NonFiniteGuard:
    """Counts the steps a "skip"/"raise" train step reported as non-finite (`metrics["nonfinite"]`).

    Attributes:
      policy: "skip" (stop after `max_consecutive` in a row) or "raise" (stop at the first).
      total: non-finite steps seen so far.
      consecutive: the current run of consecutive non-finite steps.
    """

    def __init__(self, policy: str, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"fit: max_nonfinite={max_consecutive}; expected at least 1.")
        self.policy, self.max_consecutive = policy, 1 if policy == "raise" else max_consecutive
        self.total = self.consecutive = 0
        self._first: tuple[int, Any] | None = None

    def observe(self, steps: list[tuple[int, Any]], flags: list[float]) -> None:
        """Records `(step, batch position)` pairs and their flags; raises past the limit."""
        for (step, position), flag in zip(steps, flags):
            if not flag:
                self.consecutive, self._first = 0, None
                continue
            self.total += 1
            self.consecutive += 1
            self._first = self._first or (step, position)
            if self.consecutive >= self.max_consecutive:
                first_step, first_position = self._first
                raise NonFiniteError(
                    f"fit: step {step} (batch position {position}) had a non-finite loss or gradient: "
                    f"{self.consecutive} consecutive non-finite step(s) since step {first_step} (batch "
                    f"position {first_position}), {self.total} in all (on_nonfinite={self.policy!r}, "
                    f"max_nonfinite={self.max_consecutive}). None of them was applied and nothing "
                    f"non-finite was saved. Fix: look for NaN/Inf inputs or out-of-range labels at that "
                    f"position, or lower the learning rate / clip gradients (optim clip_norm).")


def _signature(batch: Batch) -> dict[str, tuple]:
    return {jax.tree_util.keystr(path): (tuple(np.shape(x)), str(np.result_type(x)))
            for path, x in jax.tree_util.tree_leaves_with_path(batch)}


def _check_signature(first: dict | None, batch: Batch, step: int) -> dict:
    """The first batch's shapes and dtypes; raises when `batch` differs (the step would re-trace)."""
    got = _signature(batch)
    if first is None:
        return got
    if got != first:
        changed = [k for k in sorted(set(first) | set(got)) if first.get(k) != got.get(k)]
        key = changed[0]
        raise ValueError(
            f"fit: batch{key} at step {step} has (shape, dtype) {got.get(key, 'missing')}, but the first "
            f"batch had {first.get(key, 'no such entry')}; the compiled step would re-trace and "
            f"re-compile (max_traces=1). Changed: {changed}. Fix: make every batch the same shape "
            f"(drop_remainder=True, or pad with jnn.pad_batch) and dtype.")
    return first


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
    on_nonfinite: str = "skip",
    max_nonfinite: int = 10,
    max_traces: int | None = None,
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
      on_nonfinite: the built step's policy for a step with a NaN/Inf loss or gradient (see
        `make_train_step`): "skip" (default: the state is kept, training goes on, and stops with a
        `NonFiniteError` after `max_nonfinite` consecutive ones), "raise" (stops at the first;
        fetches a flag every step) or "apply". A given `train_step` is checked when its metrics
        have "nonfinite".
      max_nonfinite: consecutive non-finite steps "skip" tolerates.
      max_traces: 1 to fail loudly when a batch's shapes or dtypes differ from the first batch's
        (the compiled step would re-trace and re-compile), naming the entry that changed.

    Returns:
      A `FitResult` with the final state, the history of logged records, the best evaluation and
      whether early stopping ended the run.
    """
    if loss_fn is None and (train_step is None or (eval_data is not None and eval_step is None)):
        raise ValueError("fit: pass loss_fn, or train_step (and eval_step when there is eval_data).")
    if max_traces is not None and max_traces != 1:
        raise ValueError(f"fit: max_traces={max_traces}; expected None or 1 (one compiled step).")
    if num_steps < 0 or log_every < 1 or (eval_every is not None and eval_every < 1):
        raise ValueError(f"fit: expected num_steps >= 0, log_every >= 1 and eval_every >= 1 (or None); got "
                         f"num_steps={num_steps}, log_every={log_every}, eval_every={eval_every}.")
    if early_stopping is not None and eval_data is None:
        raise ValueError("fit: early_stopping watches an evaluation metric, but no eval_data was given. "
                         "Fix: pass eval_data= (e.g. a validation Pipeline), or drop early_stopping.")
    guard = NonFiniteGuard(on_nonfinite, max_nonfinite) if on_nonfinite != "apply" else None
    train_step = train_step or jax.jit(make_train_step(loss_fn, on_nonfinite=on_nonfinite), donate_argnums=0)
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
    pending_steps: list[tuple[int, Any]] = []  # (step, batch position) of each pending metric
    batch_size = None
    signature = None
    observed = 0  # pending metrics whose non-finite flag the guard has seen
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
            position = synced.get("next_index", synced) if isinstance(synced, Mapping) else step
            try:
                batch = next(iterator)
            except StopIteration:
                raise ValueError(
                    f"fit: the training data ended after step {step}, before num_steps={num_steps}. Fix: "
                    f"pass data that repeats (e.g. jnn.data.Pipeline(..., num_epochs=None)) or num_steps="
                    f"{step}.") from None
            if batch_size is None:  # host-side check of the first batch, with label values
                check_batch(state, batch, where="fit")
                batch_size = len(jax.tree.leaves(batch["labels"])[0])
            if max_traces is not None:
                signature = _check_signature(signature, batch, step)
            state, metrics = train_step(state, batch)
            step += 1
            if synced is not None:
                synced = iterator.get_state()
            pending.append(metrics)
            pending_steps.append((step - 1, position))
            bar.update(1)
            if guard is not None and "nonfinite" in metrics and \
                    (guard.policy == "raise" or step % log_every == 0 or step == end):
                flags = [float(f) for f in jax.device_get([m["nonfinite"] for m in pending[observed:]])]
                guard.observe(pending_steps[observed:], flags)
                observed = len(pending)
            if step % log_every == 0 or step == end:
                pending_steps, observed = [], 0
                values = _mean_metrics(pending)
                if "nonfinite" in values:  # the count of skipped steps so far, not an average
                    values["nonfinite"] = float(guard.total if guard is not None else values["nonfinite"])
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
