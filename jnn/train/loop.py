"""fit(): the training loop around the pure step: evaluation, early stopping, logging, checkpoints.

The loop never syncs with the device per step: train metrics of a logging interval are fetched
together, and evaluation accumulates on device and is read once per evaluation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from jnn import compiler
from jnn.profiling import StepProfiler
from jnn.train import preemption as preemption_lib
from jnn.train.early_stopping import EarlyStopping
from jnn.train.evaluation import evaluate, pad_batch  # noqa: F401 - jnn.train.loop.pad_batch
from jnn.train.state import TrainState
from jnn.train.step import check_batch, make_eval_step, make_train_step

Batch = Mapping[str, Any]
_EARLY_STOPPING = "early_stopping"  # the key of the early-stopping counters in a checkpoint's data state
PREEMPTION_SYNC_EVERY = 10  # multi-process runs agree on a stop signal every this many steps


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
    plateau: Any = None,
    preemption: bool = True,
    profile: Any = None,
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
      plateau: a `jnn.optim.Plateau` whose `transform()` is in the optimizer chain: after each
        evaluation it lowers the learning rate when its metric has stopped improving (required
        when the chain has one, so the rate never silently stays put).
      preemption: on SIGTERM or SIGUSR1 (a scheduler's warning) finish the current step, save a
        checkpoint of it and raise `jnn.Preempted` (exit code 75 if uncaught); on SIGINT the same,
        then KeyboardInterrupt (see `jnn.train.preemption`; main thread only). In a multi-process
        run all processes stop at the same step (they agree every 10 steps). False: signals act
        as usual.
      profile: a `jnn.profiling.Profile`: a `jax.profiler` trace of its steps into its `logdir`
        (printed when written); the steps must lie in this call's run.

    Returns:
      A `FitResult` with the final state, the history of logged records, the best evaluation and
      whether early stopping ended the run.
    """
    _check_fit_arguments(num_steps, log_every, eval_every, max_traces, loss_fn, train_step, eval_step,
                         eval_data, early_stopping)
    _check_plateau(plateau, state, eval_data)
    train_step = train_step or compiler.jit(make_train_step(loss_fn, on_nonfinite=on_nonfinite), donate_argnums=0)
    if eval_data is not None and eval_step is None:
        eval_step = compiler.jit(make_eval_step(loss_fn))
    eval_every = eval_every or max(num_steps // 10, 1)
    data = _TrainData(train_data, data_state, early_stopping, max_traces)
    step = int(jax.device_get(state.step))
    if profile is not None:
        profile.check(step, num_steps if stop_at is None else min(stop_at, num_steps))
    profiler = StepProfiler(profile)
    log = _Log(writer, step,
               NonFiniteGuard(on_nonfinite, max_nonfinite) if on_nonfinite != "apply" else None)
    last_saved = step if checkpointer is not None and step in checkpointer.all_steps() else None

    def save(values: Mapping[str, float] | None):  # at most once per step (orbax refuses a second)
        nonlocal last_saved
        if checkpointer is not None and last_saved != step:
            checkpointer.save(state, data_state=data.loop_state(early_stopping), metrics=values)
            last_saved = step

    end = num_steps if stop_at is None else min(stop_at, num_steps)
    stopped_early = early_stopping is not None and early_stopping.should_stop  # it had stopped already
    bar = _progress(progress, num_steps, step)
    watching = preemption_lib.watch_signals() if preemption else contextlib.nullcontext()
    signalled = None
    watching.__enter__()  # left in `finally` below, after the last save
    try:
        while step < end and not stopped_early:
            signalled = preemption_lib.agreed(step, PREEMPTION_SYNC_EVERY) if preemption else None
            if signalled:
                break
            position, batch = data.next(state, step, num_steps)
            with profiler.step(step):
                state, metrics = train_step(state, batch)
            step += 1
            profiler.after(step, state)
            data.advance()
            log.train(step, position, metrics, bar, flush=step % log_every == 0 or step == end,
                      batch_size=data.batch_size)
            if step % eval_every == 0 or step == num_steps:
                values = log.evaluate(step, state, eval_data, eval_step, early_stopping)
                if plateau is not None:  # before the save: the checkpoint holds the new scale
                    state = state.replace(opt_state=plateau.update(state.opt_state, values))
                stopped_early = early_stopping is not None and early_stopping.should_stop
                save(values)
        if signalled:
            started = time.perf_counter()
            save(None)
            print(f"fit: {signalled}: stopped at step {step}"
                  + (f"; checkpoint saved in {time.perf_counter() - started:.2f} s" if checkpointer else
                     "; no checkpointer, nothing saved"), file=sys.stderr, flush=True)
        elif step < num_steps and not stopped_early:  # stopped at `stop_at`: resumable, not evaluated
            save(None)
    except KeyboardInterrupt:  # keep what was trained: checkpoint, then re-raise
        try:  # `state` and the data position always describe the last completed step
            save(None)
        except Exception as err:  # noqa: BLE001 - e.g. interrupted inside the donating step
            print(f"fit: interrupted; could not save a checkpoint at step {step}: {err}", file=sys.stderr)
        raise
    finally:
        profiler.close()
        bar.close()
        if checkpointer is not None:
            checkpointer.wait()
        if writer is not None and hasattr(writer, "flush"):
            writer.flush()
        watching.__exit__(None, None, None)
    best = early_stopping.best_record if early_stopping is not None else log.last_eval
    result = FitResult(state=state, history=log.history, best=best, stopped_early=stopped_early,
                       data_state=data.loop_state(early_stopping))
    if signalled == "SIGINT":
        raise KeyboardInterrupt(f"stopped at step {step}" + (" with a checkpoint" if checkpointer else ""))
    if signalled:
        raise preemption_lib.Preempted(signalled, step, checkpointer is not None, result)
    return result


def _check_fit_arguments(num_steps, log_every, eval_every, max_traces, loss_fn, train_step, eval_step,
                         eval_data, early_stopping) -> None:
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


def _check_plateau(plateau, state, eval_data) -> None:
    from jnn.optim import plateau_scale  # noqa: PLC0415 - jnn.optim imports nothing of the loop

    has = plateau_scale(state.opt_state) is not None
    if plateau is None and has:
        raise ValueError("fit: the optimizer reduces its learning rate on plateaus (a jnn.optim.Plateau "
                         "transform is in its chain), but fit was given no plateau= to drive it; the rate "
                         "would never change. Fix: pass the same Plateau as fit(..., plateau=plateau).")
    if plateau is not None and not has:
        raise ValueError(f"fit: plateau={plateau} was given, but the optimizer has no plateau.transform() in "
                         f"its chain. Fix: build it as optax.chain(<optimizer>, plateau.transform()), or use "
                         f"OptimConfig(schedule='plateau').")
    if plateau is not None and eval_data is None:
        raise ValueError("fit: plateau= watches an evaluation metric, but no eval_data was given. Fix: pass "
                         "eval_data= (e.g. a validation Pipeline), or drop plateau.")


class _TrainData:
    """The train iterator and its position: resumed from `data_state`, checked on the first batch
    (label values on the host) and, with `max_traces=1`, for shape drift on every batch."""

    def __init__(self, train_data, data_state, early_stopping, max_traces):
        self.iterator = train_data if hasattr(train_data, "__next__") else iter(train_data)
        data_state = dict(data_state or {})
        stopping = data_state.pop(_EARLY_STOPPING, None)
        if data_state:
            if not hasattr(self.iterator, "set_state"):
                raise ValueError("fit: data_state was given but the train data iterator has no set_state().")
            self.iterator.set_state(data_state)
        if stopping is not None and early_stopping is not None:  # a resumed run keeps its patience
            early_stopping.load_state_dict(stopping)
        # The position matching the state: the iterator's state after the last completed step.
        self.position = self.iterator.get_state() if hasattr(self.iterator, "get_state") else None
        self.batch_size = None
        self.signature = {} if max_traces is not None else None

    def next(self, state, step: int, num_steps: int):
        """`(position, batch)` of `step`."""
        position = self.position.get("next_index", self.position) if isinstance(self.position, Mapping) else step
        try:
            batch = next(self.iterator)
        except StopIteration:
            raise ValueError(
                f"fit: the training data ended after step {step}, before num_steps={num_steps}. Fix: "
                f"pass data that repeats (e.g. jnn.data.Pipeline(..., num_epochs=None)) or num_steps="
                f"{step}.") from None
        if self.batch_size is None:  # host-side check of the first batch, with label values
            check_batch(state, batch, where="fit")
            self.batch_size = len(jax.tree.leaves(batch["labels"])[0])
        if self.signature is not None:
            self.signature = _check_signature(self.signature or None, batch, step)
        return position, batch

    def advance(self) -> None:
        if self.position is not None:
            self.position = self.iterator.get_state()

    def loop_state(self, early_stopping) -> dict | None:
        """What a resumed `fit` needs besides the train state: data position, early-stopping counters."""
        out = dict(self.position or {})
        if early_stopping is not None:
            out[_EARLY_STOPPING] = early_stopping.state_dict()
        return out or None


class _Log:
    """The run's records: train metrics averaged per interval (with throughput and the non-finite
    guard), evaluations, the writer and the progress bar's summary."""

    def __init__(self, writer, step: int, guard: NonFiniteGuard | None):
        self.writer, self.guard = writer, guard
        self.history: list[dict] = []
        self.last_eval: dict | None = None
        self.pending: list[dict] = []
        self.steps: list[tuple[int, Any]] = []  # (step, batch position) of each pending metric
        self.observed = 0  # pending metrics whose non-finite flag the guard has seen
        self.since, self.since_step = time.perf_counter(), step

    def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
        self.history.append({"step": step, "split": split, **values})
        if self.writer is not None:
            self.writer.write(step, values, split)

    def train(self, step: int, position, metrics, bar, *, flush: bool, batch_size: int) -> None:
        self.pending.append(metrics)
        self.steps.append((step - 1, position))
        bar.update(1)
        if self.guard is not None and "nonfinite" in metrics and (self.guard.policy == "raise" or flush):
            flags = [float(f) for f in jax.device_get([m["nonfinite"] for m in self.pending[self.observed:]])]
            self.guard.observe(self.steps[self.observed:], flags)
            self.observed = len(self.pending)
        if not flush:
            return
        values = _mean_metrics(self.pending)
        if "nonfinite" in values:  # the count of skipped steps so far, not an average
            values["nonfinite"] = float(self.guard.total if self.guard is not None else values["nonfinite"])
        now = time.perf_counter()
        values["examples_per_sec"] = (step - self.since_step) * batch_size / max(now - self.since, 1e-9)
        self.since, self.since_step = now, step
        self.write(step, "train", values)
        self.pending, self.steps, self.observed = [], [], 0
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()
                         if k in ("loss", "accuracy", "learning_rate", "examples_per_sec")}, refresh=False)

    def evaluate(self, step, state, eval_data, eval_step, early_stopping) -> dict | None:
        if eval_data is None:
            return None
        data = eval_data() if callable(eval_data) else eval_data
        values = {k: v for k, v in evaluate(state, data, eval_step).items()
                  if not isinstance(v, Mapping) and np.ndim(v) == 0}
        self.write(step, "eval", values)
        self.last_eval = {"step": step, **values}
        if early_stopping is not None:
            early_stopping.update(step, values)
        return values
