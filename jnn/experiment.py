"""A whole run from a `Config`: data, model, optimizer, state, fit, test report, run directory.

This is what `jnn train` and `jnn eval` do, as importable functions (`train`, `resume`,
`evaluate_run`), so examples and research code can run a config without the command line. The
run directory's layout and rules are in `jnn._run_dir`; the toolbox options (adversarial,
fine-tuning, int8, multi-process) in `jnn._run_options`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jnn import _claim as claim_lib
from jnn import _collector
from jnn import compiler, profiling, trackers
from jnn import data as data_lib
from jnn import losses as losses_lib
from jnn import metrics as metrics_lib
from jnn import models as models_lib
from jnn import optim as optim_lib
from jnn import pruning as pruning_lib
from jnn import quantize as quantize_lib
from jnn._run_dir import (CHECKPOINTS, CONFIG_FILE, TEST_FILE, RunDirError, check_resumable, check_run_dir,
                          has_checkpoints, jsonable, read_config, with_data_dir, write_json)
from jnn._run_options import across_processes, attack_of, fine_tuning, report_lines, test_extras, train_step_of
from jnn.checkpoint import Checkpointer, CheckpointError, check_space
from jnn.config import Config, to_dict
from jnn.optim import make_optimizer
from jnn.train.evaluation import pad_batch
from jnn.train.loop import EarlyStopping, evaluate, fit
from jnn.train import preemption as preemption_lib
from jnn.train.preemption import Preempted
from jnn.train.state import TrainState, create_train_state
from jnn.train.step import check_batch, make_eval_step
from jnn._summary import summary as model_summary
from jnn.writers import CONFUSION_FILE, make_run_writers, plot_confusion, preload as preload_writers


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `train` returns.

    Attributes:
      run_dir: the run directory (absolute).
      steps: the step the run reached.
      test: the final test metrics (None when stopped by `stop_at`).
      best: the best evaluation record (or the last one without early stopping).
      stopped_early: whether early stopping ended the run.
      seconds: wall time of the call.
      history: every logged record, as `fit` returns it.
    """

    run_dir: str
    steps: int
    test: dict[str, Any] | None
    best: dict[str, Any] | None
    stopped_early: bool
    seconds: float
    history: list[dict]

    def __getitem__(self, key: str) -> Any:
        """`result["test"]`: the dict access of jnn 0.1, kept for one release (use `result.test`)."""
        import warnings

        warnings.warn("experiment.train's result is a RunResult: use result.<field>, not result[<field>].",
                      DeprecationWarning, stacklevel=2)
        return getattr(self, key)


@dataclasses.dataclass
class Experiment:
    """Everything built from a config, ready to `fit`."""

    config: Config
    splits: data_lib.Splits
    state: TrainState
    train_data: data_lib.Pipeline
    eval_data: Callable[[str], data_lib.Pipeline]
    loss_fn: Callable
    note: str | None
    normalize: tuple  # the deterministic preprocessing shared by train and eval pipelines
    train_step: Callable  # jitted (state donated), skipping non-finite steps as `fit` does
    eval_step: Callable  # jitted; with a confusion matrix for classification

    def pipeline(self, arrays, *, train: bool = True, batch_size: int | None = None) -> data_lib.Pipeline:
        """A pipeline over other arrays (e.g. a subset of classes) with this run's preprocessing.

        Train pipelines get the config's batch size (or `batch_size`) and seed (no augmentation
        beyond the normalisation); eval pipelines the eval batch size, in order.
        """
        d = self.config.data
        size = batch_size or (d.batch_size if train else d.eval_batch_size)
        return data_lib.Pipeline(arrays, size, seed=d.seed, train=train, augment=list(self.normalize) or None)


# ------------------------------------------------------------------ building blocks


def resize_images(splits: data_lib.Splits, shape: tuple[int, ...]) -> data_lib.Splits:
    """Resizes every split's (N, H, W, C) images to `shape` (bilinear; channels tiled from 1)."""
    h, w, c = shape

    def resize(x: np.ndarray) -> np.ndarray:
        if x.shape[1:] == tuple(shape):
            return x
        y = np.asarray(jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bilinear"), np.float32)
        if y.shape[-1] != c:
            if y.shape[-1] != 1:
                raise ValueError(f"cannot map {y.shape[-1]} channels to {c}; expected 1 or {c}.")
            y = np.repeat(y, c, axis=-1)
        return np.clip(y, 0.0, 1.0)

    def split(arrays):
        return {**arrays, "inputs": resize(arrays["inputs"])}

    return dataclasses.replace(splits, train=split(splits.train), val=split(splits.val), test=split(splits.test),
                               input_shape=tuple(shape))


def load_data(config: Config) -> tuple[data_lib.Splits, str | None]:
    """The config's data splits; mnist/cifar10 without a data_dir fall back to resized digits."""
    d = config.data
    kwargs: dict[str, Any] = {"val_fraction": d.val_fraction, "seed": d.seed}
    if d.name in ("mnist", "cifar10") and d.data_dir is None:
        splits = data_lib.load("digits", **kwargs)
        note = (f"no data directory given for {d.name}: training on scikit-learn's bundled digits instead"
                f"{' resized to ' + 'x'.join(map(str, d.input_shape)) if d.input_shape else ''}. "
                f"Pass --data-dir DIR with the {d.name} files to train on {d.name}.")
        if d.input_shape:
            splits = resize_images(splits, d.input_shape)
        return splits, note
    if d.name.partition(":")[0] == "text":
        kwargs = {"seq_len": d.seq_len} | ({"val_fraction": d.val_fraction} if d.val_fraction is not None else {})
        return data_lib.load(d.name, d.data_dir, **kwargs), None
    return data_lib.load(d.name, d.data_dir, **kwargs), None


def build_model(config: Config, splits: data_lib.Splits):
    """The config's model, with `num_classes` / `vocab_size` / `block_size` filled from the data."""
    kwargs = dict(config.model.kwargs)
    fields = {f.name for f in dataclasses.fields(models_lib.spec(config.model.name).cls)}
    for field in ("num_classes", "vocab_size"):
        if field in fields and field not in kwargs:
            kwargs[field] = splits.num_classes
    if "block_size" in fields and "block_size" not in kwargs and splits.train["inputs"].ndim == 2:
        kwargs["block_size"] = splits.train["inputs"].shape[1]
    if config.train.compute_dtype != "float32" and "dtype" in fields:
        kwargs["dtype"] = jnp.dtype(config.train.compute_dtype)
    model = models_lib.get(config.model.name, **kwargs)
    return quantize_lib.qat(model) if config.train.qat else model


def run_optim(config: Config):
    """The config's optimizer settings with `total_steps` filled in: schedules (and pruning) count
    optimizer updates, one per `accumulate_steps` steps."""
    optim = config.optim
    if optim.total_steps is None:
        optim = dataclasses.replace(optim, total_steps=-(-config.train.steps // optim.accumulate_steps))
    return optim


def build(config: Config) -> Experiment:
    """Builds data, model, optimizer, the initial state and the jitted steps of a config."""
    splits, note = load_data(config)
    d = config.data
    normalize = []
    if d.normalize:
        mean, std = data_lib.channel_stats(splits.train["inputs"])
        normalize = [data_lib.Normalize(mean, std)]
    augment: list = []
    unknown = sorted(set(d.augment) - {"crop", "flip"})
    if unknown:
        raise ValueError(f"data.augment: unknown augmentation(s) {unknown}; expected any of ['crop', 'flip'].")
    if "crop" in d.augment:
        augment.append(data_lib.RandomCrop(padding=d.crop_padding))
    if "flip" in d.augment:
        augment.append(data_lib.RandomFlip())
    augment += normalize
    if d.mixup:
        augment.append(data_lib.Mixup(splits.num_classes, d.mixup))
    train_data = data_lib.Pipeline(splits.train, d.batch_size, seed=d.seed, augment=augment or None)

    def eval_data(split: str) -> data_lib.Pipeline:  # the whole split, in every process
        return data_lib.Pipeline(splits.split(split), d.eval_batch_size, train=False, augment=normalize or None,
                                 shard_index=0, shard_count=1)

    model = build_model(config, splits)
    tx = make_optimizer(run_optim(config))
    example = splits.train["inputs"][:1]
    loss_fn = losses_lib.get(config.train.loss, **(
        {"label_smoothing": config.train.label_smoothing} if config.train.label_smoothing else {}))
    classification = splits.train["labels"].ndim == 1 and splits.num_classes > 1
    train_step = train_step_of(config, loss_fn)
    eval_step = compiler.jit(make_eval_step(loss_fn, confusion=classification))
    state = create_train_state(model, tx, example, config.train.seed, precision=config.train.precision)
    state, note = fine_tuning(config, state, note)
    if jax.process_count() > 1:
        train_step, eval_step, state = across_processes(train_step, eval_step, state)
    else:
        train_step = compiler.jit(train_step, donate_argnums=0)
    return Experiment(config, splits, state, train_data, eval_data, loss_fn, note, tuple(normalize),
                      train_step, eval_step)


def _is_main() -> bool:
    """Whether this process writes the run directory's files and prints (process 0)."""
    return jax.process_index() == 0


class _NoWriter:
    def write(self, step, metrics, split="train") -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ train / eval a run directory


def _say(out, text: str) -> None:
    if _is_main():
        print(text, file=out or sys.stdout, flush=True)  # sys.stdout looked up now, not at import


def check_run(exp: Experiment, stop_at: int | None = None) -> None:
    """What would fail once training started, refused before anything trains or is written: a
    first batch the model or loss cannot take (`check_batch`, with label values), a
    best-checkpoint or early-stopping metric the evaluation does not compute (found from the eval
    step's output, on shapes only), a `stop_at` past the run's end."""
    t = exp.config.train
    if stop_at is not None and not 0 < stop_at < t.steps:
        raise ValueError(f"--stop-at {stop_at}: expected a step in [1, train.steps={t.steps}); the run ends at "
                         f"step {t.steps} anyway. Fix: pass a smaller --stop-at, or none.")
    first = next(iter(exp.train_data.numpy_iterator()))  # the first batch, augmented, without threads
    check_batch(exp.state, first, where="jnn train")
    # The model and the loss take it: traced by the jitted step itself when it runs in this
    # process alone, so that fit's first call reuses the trace (~0.2 s of the digits' default).
    step = exp.train_step if jax.process_count() == 1 else train_step_of(exp.config, exp.loss_fn)
    jax.eval_shape(step, exp.state, first)
    n = min(len(exp.splits.train["labels"]), exp.config.data.eval_batch_size)
    batch = {**jax.tree.map(lambda a: jax.ShapeDtypeStruct((n,) + a.shape[1:], a.dtype), exp.splits.train),
             "mask": jax.ShapeDtypeStruct((n,), jnp.float32)}
    names = sorted(k for k, v in jax.eval_shape(exp.eval_step, exp.state, batch).items()
                   if k != "confusion")
    plateau = optim_lib.plateau(exp.config.optim)
    for key, metric in (("train.best_metric", t.best_metric), ("train.early_stopping", t.early_stopping),
                        ("optim.plateau_metric", plateau.metric if plateau else None)):
        if metric and metric not in names:
            raise ValueError(f"{key}={metric!r} is not an evaluation metric of this run; expected one of "
                             f"{names}. Fix: --set {key}={'accuracy' if 'accuracy' in names else names[0]}.")


def train(config: Config, run_dir: str, *, resume: bool = False, progress: bool | None = None,
          stop_at: int | None = None, out=None, summary: bool = False,
          profile: profiling.Profile | str | None = None) -> RunResult:
    """Trains `config` in `run_dir` (or resumes the run there), then evaluates on the test split.

    `stop_at` ends the run early at that step, with a checkpoint, as a preempted job would (for
    time-limited jobs); `resume=True` later continues it to `config.train.steps`, bit for bit.
    Everything a user can get wrong (run directory, config, first batch, metric names, disk
    space, a tracker that is not installed, profile steps outside the run) is refused before
    anything is written.

    `summary=True` prints the model summary (`jnn.summary`) before training; `profile`
    ("START:STOP" or a `jnn.profiling.Profile`) records a `jax.profiler` trace of those steps
    into `run_dir/profile`. `config.log` adds Weights & Biases / MLflow writers (`jnn.trackers`).

    Returns:
      A `RunResult` (its `test` is None when `stop_at` stopped the run).

    A signal (SIGTERM, SIGUSR1, SIGINT) is caught from the start: training stops at the next step
    boundary with a checkpoint of it (`jnn.Preempted`, exit code 75).

    Raises:
      RunDirError: `run_dir` already holds a run (without `resume`), or has nothing to resume.
      ClaimedError: another running `jnn train` (or Checkpointer) writes `run_dir`; names it.
      CheckpointError: the checkpoint does not fit the config's model and optimizer.
      OSError: the disk cannot hold the run's checkpoints (ENOSPC), or a file error.
      Preempted: a scheduler's signal stopped the run, with a checkpoint.
    """
    with preemption_lib.watch_signals():  # a signal during start-up stops the run at its first step
        return _claim_and_train(config, run_dir, resume, progress, stop_at, out, summary, profile)


def _claim_and_train(config: Config, run_dir: str, resume: bool, progress, stop_at, out, summary: bool,
                     profile) -> RunResult:
    start = time.perf_counter()
    run_dir = os.path.abspath(run_dir)
    claim_lib.probe(run_dir)  # a run still writing there: say so, before "already holds a run"
    check_run_dir(config, run_dir, resume)
    trackers.check_log(config.log)
    profile = profiling.for_run(profile, run_dir)
    if profile is not None:
        profile.check(0, stop_at or config.train.steps)
    preload_writers()  # in a thread, overlapping the compilation below
    exp = build(config)  # any data or model error is raised here, before anything is written
    check_run(exp, stop_at)
    if summary:
        _say(out, str(model_summary(exp.state, exp.splits.train["inputs"][:1])))
    t = config.train  # the checkpoints the run keeps at once: keep, the best, and the one being written
    check_space(os.path.join(run_dir, CHECKPOINTS), exp.state, copies=t.keep + 1 + (t.best_metric is not None))
    claim = claim_lib.Claim(run_dir, "run directory", "jnn train")
    if _is_main():  # process 0 writes the directory, for the whole run
        claim.acquire()
    try:
        return _train(exp, config, run_dir, resume, progress, stop_at, out, start, profile)
    except Preempted as stop:
        _say(out, f"preempted by {stop.signal_name} at step {stop.step} of {config.train.steps}, with a checkpoint; "
                  f"continue with `jnn train --resume {run_dir}`")
        raise
    finally:
        claim.release()


class _EvalCompiledMeanwhile:
    """`exp.train_step` and `exp.eval_step` for `fit`, with the eval step compiled in a thread
    while the first train steps run (the main thread mostly waits for the device then): the first
    evaluation finds it compiled, 0.3 s sooner on the digits' default with a warm compilation
    cache.

    The thread starts after the first train step has compiled and dispatched, and only when that
    took at most `QUICK_S` (so the eval step compiles in seconds too: a run preempted meanwhile
    waits for the thread before it exits, since a daemon thread still inside XLA's compiler at exit
    aborts the process) and when an evaluation comes before `stop_at`. The first evaluation joins
    it. Best effort: a failure in the thread leaves that evaluation to compile the step (and report
    any error) as before. Not used across processes (the eval step takes global arrays there).
    """

    QUICK_S = 5.0

    def __init__(self, exp: Experiment, state: TrainState, stop_at: int | None):
        self.exp, self.thread, self.pending = exp, None, False
        t, step = exp.config.train, int(state.step)
        first_eval = min(t.steps, (step // t.eval_every + 1) * t.eval_every)
        if jax.process_count() > 1 or not len(exp.splits.val["labels"]) or (stop_at is not None and stop_at < first_eval):
            return
        # Shapes without shardings: with them, the compiled program is not the one a call looks up.
        self.shapes = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False)), state)
        self.pending = True

    def _compile(self) -> None:
        try:
            data = self.exp.eval_data("val")
            batch = pad_batch(next(iter(data.numpy_iterator())), data.batch_size)  # as `evaluate` pads it
            self.exp.eval_step.lower(self.shapes, batch).compile()
        except Exception:  # noqa: BLE001 - best effort, see the class docstring
            pass

    def train_step(self, state, batch):
        if not self.pending:
            return self.exp.train_step(state, batch)
        self.pending, start = False, time.perf_counter()
        out = self.exp.train_step(state, batch)
        if time.perf_counter() - start <= self.QUICK_S:
            self.thread = threading.Thread(target=self._compile, name="jnn-compile-eval")
            self.thread.start()
        return out

    def eval_step(self, state, batch):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        return self.exp.eval_step(state, batch)


def _train(exp: Experiment, config: Config, run_dir: str, resume: bool, progress, stop_at, out,
           start: float, profile) -> RunResult:
    t = config.train
    os.makedirs(run_dir, exist_ok=True)
    if not resume and _is_main():
        write_json(run_dir, CONFIG_FILE, to_dict(config))
    if exp.note:
        _say(out, f"note: {exp.note}")
    state, data_state, test = exp.state, None, None
    with Checkpointer(os.path.join(run_dir, CHECKPOINTS), keep=t.keep, best_metric=t.best_metric,
                      best_mode=t.best_mode) as checkpointer:
        if resume:
            state, data_state = checkpointer.restore(exp.state)
            _say(out, f"resumed {run_dir} at step {int(state.step)}")
        if stop_at is not None and stop_at <= int(state.step):
            raise RunDirError(f"--stop-at {stop_at}: the run is already at step {int(state.step)}; expected a "
                              f"later step (up to train.steps={t.steps}). Fix: pass a larger --stop-at.")
        _say(out, f"training {config.model.name} on {exp.splits.name} ({len(exp.splits.train['labels'])} train / "
                  f"{len(exp.splits.val['labels'])} val / {len(exp.splits.test['labels'])} test) for {t.steps} "
                  f"steps; run directory {run_dir}")
        writer = make_run_writers(run_dir, resume_step=int(state.step),
                                  class_names=exp.splits.class_names) if _is_main() else _NoWriter()
        try:
            if _is_main() and config.log.writers:
                writer.writers += trackers.make_trackers(config.log, run_dir, to_dict(config),
                                                         class_names=exp.splits.class_names)
            meanwhile = _EvalCompiledMeanwhile(exp, state, stop_at)
            _collector.resume()  # the `jnn` command's start-up is over: its collector comes back on
            result = fit(
                state, exp.train_data, num_steps=t.steps, stop_at=stop_at, train_step=meanwhile.train_step,
                eval_step=meanwhile.eval_step,  # one compiled eval step for validation and the final test
                eval_data=(lambda: exp.eval_data("val")) if len(exp.splits.val["labels"]) else None,
                eval_every=t.eval_every, log_every=t.log_every,
                early_stopping=EarlyStopping(t.early_stopping, t.best_mode, t.patience) if t.early_stopping else None,
                writer=writer, checkpointer=checkpointer, data_state=data_state,
                progress=progress if _is_main() else False, plateau=optim_lib.plateau(config.optim),
                profile=profile if _is_main() else None,
            )
            _say_history(out, result.history)
            final = result.state
            if int(final.step) >= t.steps or result.stopped_early:  # else --stop-at: preempted
                best_step = checkpointer.best_step()
                if best_step is not None and best_step != int(final.step):
                    final, _ = checkpointer.restore(result.state, step=best_step)  # exp.state was donated
                test = evaluate(final, exp.eval_data("test"), exp.eval_step)
                test.update(test_extras(config, exp.loss_fn, final, lambda: exp.eval_data("test")))
                writer.write(int(final.step), test, "test")
        finally:
            writer.close()
    seconds = time.perf_counter() - start
    if test is None:
        _say(out, f"stopped at step {int(final.step)} of {t.steps}; continue with `jnn train --resume {run_dir}`")
    else:
        if _is_main():
            write_json(run_dir, TEST_FILE, jsonable(test))
        _say(out, _report_text(exp, test))
        if config.optim.prune_sparsity:
            zeros = pruning_lib.sparsity_report(final.params, optim_lib.pruning(run_optim(config)))
            _say(out, f"pruned: {zeros['total']:.2%} of the pruned kernels' weights and {zeros['all']:.2%} of all "
                      f"parameters are zero (target {config.optim.prune_sparsity:.0%})")
        _say(out, f"test accuracy {test.get('accuracy', float('nan')):.4f} (checkpoint step {int(final.step)}); "
                  f"{seconds:.1f} s; run directory {run_dir}")
    return RunResult(run_dir, int(result.state.step), test, result.best, result.stopped_early, seconds,
                     result.history)


def resume(run_dir: str, *, data_dir: str | None = None, progress: bool | None = None,
           stop_at: int | None = None, out=None, summary: bool = False,
           profile: profiling.Profile | str | None = None) -> RunResult:
    """Continues the run in `run_dir` with the config it was started with (`train(..., resume=True)`).

    Args:
      data_dir: where the run's data is now, if it moved.
      progress, stop_at, out, summary, profile: as for `train`.
    """
    check_resumable(run_dir)
    config = with_data_dir(read_config(run_dir), data_dir or None)
    return train(config, run_dir, resume=True, progress=progress, stop_at=stop_at, out=out, summary=summary,
                 profile=profile)


def _say_history(out, history: list[dict]) -> None:
    for record in history:
        if record["split"] == "eval":
            _say(out, _line(record))
    skipped = max((r.get("nonfinite", 0.0) for r in history if r["split"] == "train"), default=0.0)
    if skipped:
        _say(out, f"skipped {int(skipped)} step(s) with a non-finite loss or gradient (NaN/Inf in the data, or a "
                  f"diverging run); none of them was applied")


def _line(record: dict) -> str:
    values = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "split"))
    return f"[{record['split']}] step {record['step']}  {values}"


def _report_text(exp: Experiment, test: dict) -> str:
    if "report" not in test:
        return "test: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items() if np.ndim(v) == 0)
    return ("test split, per class:\n" + metrics_lib.format_report(test["report"], exp.splits.class_names)
            + report_lines(exp.config, test))


def restore(run_dir: str, *, step: int | None = None, data_dir: str | None = None) -> tuple[Experiment, TrainState]:
    """A run directory's experiment, rebuilt from its config, and its checkpoint: the best one, else the
    newest, or `step`.

    Raises:
      RunDirError / CheckpointError: not a run directory, or no usable checkpoint.
    """
    run_dir = os.path.abspath(run_dir)
    config = with_data_dir(read_config(run_dir), data_dir)
    if not has_checkpoints(run_dir):
        raise RunDirError(f"{run_dir} has no checkpoints; expected {CHECKPOINTS}/<step> folders written by `jnn train`.")
    exp = build(config)
    t = config.train
    with Checkpointer(os.path.join(run_dir, CHECKPOINTS), keep=t.keep, best_metric=t.best_metric,
                      best_mode=t.best_mode, read_only=True) as checkpointer:  # the run may still be training
        if step is None:
            step = checkpointer.best_step()
            step = checkpointer.latest_step() if step is None else step
        state, _ = checkpointer.restore(exp.state, step=step)
    return exp, state


def evaluate_run(run_dir: str, *, step: int | None = None, data_dir: str | None = None,
                 out=None) -> dict[str, Any]:
    """Evaluates a run directory's checkpoint (best, or `step`) on its test split, and draws its
    confusion matrix into the run directory (`confusion.png`, or `confusion-step<step>.png`).

    Raises:
      RunDirError / CheckpointError: not a run directory, or no usable checkpoint.
    """
    picture = CONFUSION_FILE if step is None else f"confusion-step{step}.png"
    exp, state = restore(run_dir, step=step, data_dir=data_dir)
    test = evaluate(state, exp.eval_data("test"), exp.eval_step)
    _say(out, _report_text(exp, test))
    if "confusion" in test and _is_main():
        path = plot_confusion(test["confusion"], os.path.join(os.path.abspath(run_dir), picture),
                              exp.splits.class_names)
        _say(out, f"confusion matrix: {path}")
    _say(out, f"test accuracy {test.get('accuracy', float('nan')):.4f} (checkpoint step {int(state.step)})")
    return test


__all__ = ["Experiment", "RunDirError", "RunResult", "CheckpointError", "attack_of", "build", "check_resumable",
           "check_run", "evaluate_run", "load_data", "read_config", "resize_images", "restore", "resume", "train"]
