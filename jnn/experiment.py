"""A whole run from a `Config`: data, model, optimizer, state, fit, test report, run directory.

This is what `jnn train` and `jnn eval` do, as importable functions (`train`, `evaluate_run`), so
examples and research code can run a config without the command line.

Run directory layout:
  config.json       the full config (written first; a resume reads it back)
  metrics.jsonl     one JSON record per log / evaluation (appended, never truncated)
  tb/               TensorBoard event files
  curves.png        loss / accuracy / learning-rate curves
  checkpoints/      orbax steps (latest k + best), with the data iterator's position
  test_metrics.json the final test evaluation, with the per-class report
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jnn import adversarial as adversarial_lib
from jnn import data as data_lib
from jnn import losses as losses_lib
from jnn import metrics as metrics_lib
from jnn import models as models_lib
from jnn import lora as lora_lib
from jnn import optim as optim_lib
from jnn import pruning as pruning_lib
from jnn import quantize as quantize_lib
from jnn import transfer as transfer_lib
from jnn.checkpoint import Checkpointer, CheckpointError, check_space
from jnn.config import Config, from_dict, to_dict
from jnn.optim import make_optimizer
from jnn.train.loop import EarlyStopping, evaluate, fit
from jnn.train.state import TrainState, create_train_state
from jnn.train.step import check_batch, make_eval_step, make_train_step
from jnn.writers import make_run_writers

CONFIG_FILE, TEST_FILE, CHECKPOINTS = "config.json", "test_metrics.json", "checkpoints"


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists already, or has nothing to resume)."""


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
    attack = attack_of(config)
    if attack is None:
        train_step = make_train_step(loss_fn, on_nonfinite="skip")
    else:
        train_step = adversarial_lib.make_adversarial_train_step(loss_fn, attack, mix=config.train.adversarial_mix,
                                                                 on_nonfinite="skip")
    eval_step = jax.jit(make_eval_step(loss_fn, confusion=classification))
    state = create_train_state(model, tx, example, config.train.seed, precision=config.train.precision)
    state, note = _fine_tuning(config, state, note)
    if jax.process_count() > 1:
        train_step, eval_step, state = _across_processes(train_step, eval_step, state)
    else:
        train_step = jax.jit(train_step, donate_argnums=0)
    return Experiment(config, splits, state, train_data, eval_data, loss_fn, note, tuple(normalize),
                      train_step, eval_step)


def _fine_tuning(config: Config, state: TrainState, note: str | None) -> tuple[TrainState, str | None]:
    """`train.init_from` (pretrained weights, new layers kept) and `train.lora_rank` (adapters)."""
    t, notes = config.train, [note] if note else []
    if t.init_from:
        state, report = transfer_lib.load_pretrained(state, t.init_from, skip_mismatched=True)
        notes.append(f"initialised from {t.init_from}: {str(report).splitlines()[0]}"
                     + "".join(f"; {line.strip()}" for line in str(report).splitlines()[1:]))
    if t.lora_rank:
        state = lora_lib.apply(state, lora_lib.LoRA(t.lora_rank, t.lora_alpha, tuple(t.lora_targets)), state.tx)
        notes.append(f"LoRA rank {t.lora_rank}: {lora_lib.trainable_count(state):,} trainable parameters")
    return state, "\n".join(notes) or None


def attack_of(config: Config) -> adversarial_lib.PGD | None:
    """The adversarial attack a config trains against (None without `train.adversarial`)."""
    t = config.train
    if t.adversarial is None:
        return None
    clip = None if config.data.normalize else (0.0, 1.0)  # jnn's image loaders scale to [0, 1]
    if t.adversarial == "fgsm":
        return adversarial_lib.fgsm(t.adversarial_epsilon, clip=clip)
    return adversarial_lib.PGD(t.adversarial_epsilon, steps=t.adversarial_steps, norm=t.adversarial_norm, clip=clip)


def _across_processes(train_step, eval_step, state):
    """A multi-process run (`jax.distributed` initialised): data parallel over every device.

    Each process loads its own block of every batch (the train Pipeline's default shard is the
    process index, so `data.batch_size` is per process) and the step is `parallel.data_parallel`
    over all devices (replicated state). Evaluation needs no collective: every process evaluates
    the whole split on its own replica, so every process takes the same early-stopping and
    best-checkpoint decisions. Metrics come back as this process's copy.
    """
    from jnn import parallel

    step = parallel.data_parallel(train_step, parallel.make_mesh())

    def distributed_step(state, batch):
        state, metrics = step(state, step.shard_batch(batch))
        return state, _local(metrics)

    def local_eval_step(state, batch):
        return eval_step(_local(state), batch)

    return distributed_step, local_eval_step, step.shard_state(state)


def _local(tree):
    """This process's copy of every replicated array of `tree` (tracers and local arrays as they are)."""
    def local(x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_fully_addressable:
            return x.addressable_shards[0].data
        return x

    return jax.tree.map(local, tree)


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
    jax.eval_shape(make_train_step(exp.loss_fn), exp.state, first)  # the model and the loss take it
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


def _has_checkpoints(run_dir: str) -> bool:
    ckpt = os.path.join(run_dir, CHECKPOINTS)
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def check_resumable(run_dir: str) -> None:
    """Raises RunDirError unless `run_dir` holds checkpoints to resume from."""
    run_dir = os.path.abspath(run_dir)
    if not _has_checkpoints(run_dir):
        raise RunDirError(
            f"--resume {run_dir}: no checkpoint there; expected {os.path.join(run_dir, CHECKPOINTS)}/<step>. "
            f"Fix: start a new run with `jnn train`, or point --resume to a run that saved checkpoints.")


def read_config(run_dir: str) -> Config:
    """The config a run directory was trained with."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(
            f"{run_dir} has no {CONFIG_FILE}; expected a run directory written by `jnn train`. "
            f"Fix: pass the directory `jnn train` printed at its start.")
    with open(path, encoding="utf-8") as f:
        return from_dict(json.load(f))


def _check_run_dir(config: Config, run_dir: str, resume: bool) -> None:
    if resume:
        check_resumable(run_dir)
        saved = read_config(run_dir)
        moved = dataclasses.replace(saved, data=dataclasses.replace(saved.data, data_dir=config.data.data_dir))
        if to_dict(moved) != to_dict(config):  # only the data directory may change (data moved)
            raise RunDirError(
                f"--resume {run_dir}: the given config differs from the run's {CONFIG_FILE}; a resumed run "
                f"must use the config it started with. Fix: resume without --preset/--set, or start a new run.")
    elif _has_checkpoints(run_dir) or (os.path.exists(os.path.join(run_dir, CONFIG_FILE))
                                       and to_dict(read_config(run_dir)) != to_dict(config)):
        # A directory with only the same config.json is a first attempt that failed before its
        # first checkpoint: starting it again loses nothing.
        raise RunDirError(
            f"run directory {run_dir} already holds a run; refusing to overwrite it. "
            f"Fix: `jnn train --resume {run_dir}` to continue it, or choose another --run-dir.")


def train(config: Config, run_dir: str, *, resume: bool = False, progress: bool | None = None,
          stop_at: int | None = None, out=None) -> RunResult:
    """Trains `config` in `run_dir` (or resumes the run there), then evaluates on the test split.

    `stop_at` ends the run early at that step, with a checkpoint, as a preempted job would (for
    time-limited jobs); `resume=True` later continues it to `config.train.steps`, bit for bit.
    Everything a user can get wrong (run directory, config, first batch, metric names, disk
    space) is refused before anything is written.

    Returns:
      A `RunResult` (its `test` is None when `stop_at` stopped the run).

    Raises:
      RunDirError: `run_dir` already holds a run (without `resume`), or has nothing to resume.
      CheckpointError: the checkpoint does not fit the config's model and optimizer.
      OSError: the disk cannot hold the run's checkpoints (ENOSPC), or a file error.
    """
    start = time.perf_counter()
    run_dir = os.path.abspath(run_dir)
    _check_run_dir(config, run_dir, resume)
    threading.Thread(target=_import_writers, daemon=True).start()  # overlaps the compilation below
    exp = build(config)  # any data or model error is raised here, before anything is written
    check_run(exp, stop_at)
    t = config.train  # the checkpoints the run keeps at once: keep, the best, and the one being written
    check_space(os.path.join(run_dir, CHECKPOINTS), exp.state, copies=t.keep + 1 + (t.best_metric is not None))
    os.makedirs(run_dir, exist_ok=True)
    if not resume and _is_main():
        with open(os.path.join(run_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(to_dict(config), f, indent=2)
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
        writer = make_run_writers(run_dir, resume_step=int(state.step)) if _is_main() else _NoWriter()
        try:
            result = fit(
                state, exp.train_data, num_steps=t.steps, stop_at=stop_at, train_step=exp.train_step,
                eval_step=exp.eval_step,  # one compiled eval step for validation and the final test
                eval_data=(lambda: exp.eval_data("val")) if len(exp.splits.val["labels"]) else None,
                eval_every=t.eval_every, log_every=t.log_every,
                early_stopping=EarlyStopping(t.early_stopping, t.best_mode, t.patience) if t.early_stopping else None,
                writer=writer, checkpointer=checkpointer, data_state=data_state,
                progress=progress if _is_main() else False, plateau=optim_lib.plateau(config.optim),
            )
            _say_history(out, result.history)
            final = result.state
            if int(final.step) >= t.steps or result.stopped_early:  # else --stop-at: preempted
                best_step = checkpointer.best_step()
                if best_step is not None and best_step != int(final.step):
                    final, _ = checkpointer.restore(result.state, step=best_step)  # exp.state was donated
                test = evaluate(final, exp.eval_data("test"), exp.eval_step)
                test.update(_robust(exp, final))
                test.update(_quantized(exp, final))
                writer.write(int(final.step), test, "test")
        finally:
            writer.close()
    seconds = time.perf_counter() - start
    if test is None:
        _say(out, f"stopped at step {int(final.step)} of {t.steps}; continue with `jnn train --resume {run_dir}`")
    else:
        if _is_main():
            with open(os.path.join(run_dir, TEST_FILE), "w", encoding="utf-8") as f:
                json.dump(_jsonable(test), f, indent=2)
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
           stop_at: int | None = None, out=None) -> RunResult:
    """Continues the run in `run_dir` with the config it was started with (`train(..., resume=True)`).

    Args:
      data_dir: where the run's data is now, if it moved.
      progress, stop_at, out: as for `train`.
    """
    check_resumable(run_dir)
    config = read_config(run_dir)
    if data_dir:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=data_dir))
    return train(config, run_dir, resume=True, progress=progress, stop_at=stop_at, out=out)


def _robust(exp: Experiment, state: TrainState) -> dict[str, float]:
    """The test accuracy and loss under the attack the run trained against (empty without one)."""
    attack = attack_of(exp.config)
    if attack is None:
        return {}
    step = jax.jit(adversarial_lib.make_robust_eval_step(exp.loss_fn, attack))
    if jax.process_count() > 1:  # like the eval step: on this process's replica
        step = (lambda jitted: lambda s, b: jitted(_local(s), b))(step)
    robust = evaluate(state, exp.eval_data("test"), step)
    return {f"adversarial_{k}": v for k, v in robust.items() if k in ("accuracy", "loss")}


def _quantized(exp: Experiment, state: TrainState) -> dict[str, float]:
    """`train.quantize="int8"`: the int8 model's test accuracy, its size and the float model's."""
    if exp.config.train.quantize is None:
        return {}
    quantized = quantize_lib.ptq(_local(state))
    correct = total = 0
    for batch in exp.eval_data("test"):
        correct += int((np.asarray(quantized(batch["inputs"])).argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return {"int8_accuracy": correct / total, "int8_bytes": quantized.nbytes, "float_bytes": quantized.float_nbytes}


def _say_history(out, history: list[dict]) -> None:
    for record in history:
        if record["split"] == "eval":
            _say(out, _line(record))
    skipped = max((r.get("nonfinite", 0.0) for r in history if r["split"] == "train"), default=0.0)
    if skipped:
        _say(out, f"skipped {int(skipped)} step(s) with a non-finite loss or gradient (NaN/Inf in the data, or a "
                  f"diverging run); none of them was applied")


def _import_writers() -> None:
    """Imports tensorboardX and matplotlib while XLA compiles, which frees the GIL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import tensorboardX  # noqa: F401


def _line(record: dict) -> str:
    values = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "split"))
    return f"[{record['split']}] step {record['step']}  {values}"


def _report_text(exp: Experiment, test: dict) -> str:
    if "report" not in test:
        return "test: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items() if np.ndim(v) == 0)
    text = "test split, per class:\n" + metrics_lib.format_report(test["report"], exp.splits.class_names)
    if "int8_accuracy" in test:
        text += (f"\nint8 (qwix PTQ, w8a8): accuracy {test['int8_accuracy']:.4f}, parameters "
                 f"{test['float_bytes']:,} -> {test['int8_bytes']:,} bytes")
    if "adversarial_accuracy" in test:
        text += (f"\nunder the training attack ({exp.config.train.adversarial}, epsilon "
                 f"{exp.config.train.adversarial_epsilon}): accuracy {test['adversarial_accuracy']:.4f}")
    return text


def _jsonable(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _jsonable(v) for k, v in tree.items()}
    value = np.asarray(tree)
    return value.item() if value.ndim == 0 else value.tolist()


def evaluate_run(run_dir: str, *, step: int | None = None, data_dir: str | None = None,
                 out=None) -> dict[str, Any]:
    """Evaluates a run directory's checkpoint (best, or `step`) on its test split.

    Raises:
      RunDirError / CheckpointError: not a run directory, or no usable checkpoint.
    """
    run_dir = os.path.abspath(run_dir)
    config = read_config(run_dir)
    if data_dir is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=data_dir))
    if not _has_checkpoints(run_dir):
        raise RunDirError(f"{run_dir} has no checkpoints to evaluate; expected {CHECKPOINTS}/<step> folders.")
    exp = build(config)
    t = config.train
    with Checkpointer(os.path.join(run_dir, CHECKPOINTS), keep=t.keep, best_metric=t.best_metric,
                      best_mode=t.best_mode) as checkpointer:
        if step is None:
            step = checkpointer.best_step()
            step = checkpointer.latest_step() if step is None else step
        state, _ = checkpointer.restore(exp.state, step=step)
    test = evaluate(state, exp.eval_data("test"), exp.eval_step)
    _say(out, _report_text(exp, test))
    _say(out, f"test accuracy {test.get('accuracy', float('nan')):.4f} (checkpoint step {int(state.step)})")
    return test


__all__ = ["Experiment", "RunDirError", "RunResult", "CheckpointError", "build", "check_resumable", "check_run", "evaluate_run",
           "load_data", "read_config", "resize_images", "resume", "train"]
