"""Orbax save/restore of the whole training state, and of the data iterator's position.

What is saved is everything `TrainState` holds as arrays (step, params, optimizer state, model
state such as batch statistics, and the PRNG key as raw key data), plus the input pipeline's
JSON state, so a resumed run sees exactly the batches an uninterrupted one would. The static parts
(model, optimizer) come from the template state the caller rebuilds from its config.

Retention: the latest `keep` checkpoints, plus the best one by a chosen metric.
Orbax commits atomically (temp dir + rename), but a kill during deletion of an old step can leave a
half-deleted step that is still listed: `restore` then falls back from the newest to older steps.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jnn._claim import Claim
from jnn._names import path_str
from jnn.train.state import TrainState

log = logging.getLogger(__name__)

_STATE, _DATA, _METRICS = "state", "data", "metrics"
_OVERHEAD = 1 << 20  # bytes of orbax metadata and JSON items per checkpoint, generously


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be restored from (missing, empty, incompatible)."""


def _arrays(state: TrainState) -> dict[str, Any]:
    """The saveable arrays of a state; the PRNG key as its raw uint32 data."""
    arrays = {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "model_state": state.model_state,
        "rng": jax.random.key_data(state.rng),
    }
    if state.loss_scale is not None:  # a float16 precision policy's dynamic loss scale
        arrays["loss_scale"] = state.loss_scale
    return arrays


def _target(template: TrainState) -> dict[str, Any]:
    """What to restore into: the template's shapes, dtypes *and shardings* (shapes only: the
    template's buffers may be donated). With the shardings, orbax places every array as the
    template is placed, whatever topology saved it (8 devices -> 1, 1 -> 8, FSDP <-> replicated);
    `jax.eval_shape` alone drops them, and orbax then insists on the saved layout."""
    shapes = jax.eval_shape(_arrays, template)
    sources = {"step": template.step, "params": template.params, "opt_state": template.opt_state,
               "model_state": template.model_state, "rng": template.rng}
    if template.loss_scale is not None:
        sources["loss_scale"] = template.loss_scale
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(shape, source):
        sharding = getattr(source, "sharding", None) if isinstance(source, jax.Array) else None
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding or default)

    return jax.tree.map(target, shapes, sources)


def _mismatches(saved: Any, target: Any) -> list[str]:
    """`path: saved shape vs expected shape` for every leaf that differs (or exists on one side only)."""
    def flat(tree):  # orbax's metadata turns named tuples into dicts: compare plain names
        return {path_str(p): tuple(getattr(x, "shape", ()) or ())
                for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    saved, target = flat(saved), flat(target)
    out = []
    for path in sorted(set(saved) | set(target)):
        if path not in target:
            out.append(f"{path}: in the checkpoint {saved[path]}, not in the model/optimizer")
        elif path not in saved:
            out.append(f"{path}: in the model/optimizer {target[path]}, not in the checkpoint")
        elif saved[path] != target[path]:
            out.append(f"{path}: checkpoint {saved[path]} vs model/optimizer {target[path]}")
    return out


def _with_arrays(template: TrainState, arrays: Mapping[str, Any]) -> TrainState:
    rng = arrays["rng"]
    if jax.dtypes.issubdtype(template.rng.dtype, jax.dtypes.prng_key):  # a typed key put in the state
        rng = jax.random.wrap_key_data(rng, impl=jax.random.key_impl(template.rng))
    return template.replace(
        step=arrays["step"],
        params=arrays["params"],
        opt_state=arrays["opt_state"],
        model_state=arrays["model_state"],
        rng=rng,
        loss_scale=arrays.get("loss_scale", template.loss_scale),
    )


def check_space(directory: str | os.PathLike, state: TrainState, copies: int = 1) -> int:
    """Raises OSError(ENOSPC) unless the disk under `directory` holds `copies` checkpoints of `state`.

    `Checkpointer.save` checks one copy before it writes anything, so a full disk is one clear
    error, not a half-written step and orbax's tracebacks from every writer thread; `jnn train`
    checks all the copies a run keeps before it trains. Returns the bytes one checkpoint needs
    (the arrays' bytes plus 1 MiB for metadata; orbax stores arrays uncompressed).
    """
    one = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
              for x in jax.tree.leaves(jax.eval_shape(_arrays, state))) + _OVERHEAD
    where = os.path.abspath(os.fspath(directory))
    while not os.path.exists(where):  # the directory may not exist yet
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if free < copies * one:
        raise OSError(errno.ENOSPC, (
            f"not enough disk space for checkpoints in {os.fspath(directory)}: {copies} checkpoint(s) of "
            f"{one / 2**20:.1f} MiB need {copies * one / 2**20:.1f} MiB, but {free / 2**20:.1f} MiB are free. "
            f"Fix: free some space, write the run to a larger disk (--run-dir), or keep fewer "
            f"checkpoints (train.keep)"))
    return one


class Checkpointer:
    """Saves and restores `TrainState` (+ data position) with an orbax `CheckpointManager`.

    Example:
      >>> ckpt = jnn.Checkpointer(run_dir / "checkpoints", keep=2, best_metric="accuracy")
      >>> ckpt.save(state, data_state=loader_state, metrics={"accuracy": 0.97})  # True: saved
      True
      >>> state, data_state = ckpt.restore(template_state)

    Args:
      directory: where step folders are written (created if missing).
      keep: number of most recent checkpoints to keep.
      best_metric: also keep the checkpoint with the best value of this metric (None: don't).
      best_mode: "max" or "min" for `best_metric`.
      async_save: write in a background thread (call `wait()` before reading the files).
      read_only: only restore (e.g. evaluating a run that may still be training): the directory
        is not claimed. A writing checkpointer claims it (process 0 of a multi-process run), so a
        second writer, in any process on this machine or another, is refused at once naming
        the holder (`jnn._claim`); the claim ends with `close()` or with the process.

    Raises:
      ClaimedError: (a `ValueError`) another live process writes this directory.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = False, read_only: bool = False):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min'; got {best_mode!r}.")
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.read_only = read_only
        self._claim = None if read_only or jax.process_index() != 0 else \
            Claim(self.directory, "checkpoint directory", "jnn.Checkpointer").acquire()
        self.best_metric, self.best_mode = best_metric, best_mode
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep)]
        if best_metric is not None:
            policies.append(pp.BestN(get_metric_fn=lambda metrics: metrics[best_metric],
                                     reverse=best_mode == "min", n=1,  # ascending sort keeps the tail
                                     keep_checkpoints_without_metrics=False))  # else kept forever
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(), _DATA: ocp.JsonCheckpointHandler(),
                           _METRICS: ocp.JsonCheckpointHandler()},
        )

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (None without a metric or checkpoints)."""
        if self.best_metric is None:
            return None
        scored = []
        for step in self.all_steps():
            metrics = self.metrics(step)
            if metrics and self.best_metric in metrics and math.isfinite(float(metrics[self.best_metric])):
                scored.append((float(metrics[self.best_metric]), step))  # a diverged (NaN) step is never best
        if not scored:
            return None
        return (max(scored) if self.best_mode == "max" else min(scored))[1]

    # ------------------------------------------------------------------ save / restore

    def save(self, state: TrainState, *, data_state: Mapping[str, Any] | None = None,
             metrics: Mapping[str, float] | None = None, force: bool = True) -> bool:
        """Saves `state` at its own step. Returns whether a checkpoint was written.

        Raises:
          OSError: ENOSPC when the disk cannot hold the checkpoint (checked before writing).
          ValueError: the checkpointer is read-only (it holds no claim on the directory).
        """
        if self.read_only:
            raise ValueError(f"Checkpointer({self.directory!r}, read_only=True) cannot save: a read-only "
                             f"checkpointer does not claim the directory, so another process may be writing it. "
                             f"Fix: create it without read_only to write (one writer per directory).")
        step = int(jax.device_get(state.step))
        check_space(self.directory, state)
        items = {_STATE: ocp.args.StandardSave(_arrays(state))}
        if data_state is not None:
            items[_DATA] = ocp.args.JsonSave(dict(data_state))
        clean = None
        if metrics is not None:
            clean = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
            worst = -math.inf if self.best_mode == "max" else math.inf
            clean = {k: v if math.isfinite(v) else worst for k, v in clean.items()}  # NaN never ranks best
            if self.best_metric is not None and self.best_metric not in clean:
                raise ValueError(
                    f"Checkpointer.save: best_metric {self.best_metric!r} is not among the metrics "
                    f"given {sorted(clean)}. Fix: pass metrics that include it, or change best_metric.")
            items[_METRICS] = ocp.args.JsonSave(clean)
        return self._manager.save(step, args=ocp.args.Composite(**items), metrics=clean, force=force)

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict | None]:
        """Restores the state (into `template`'s structure) and the data state, if one was saved.

        With `step=None`, tries the newest checkpoint first and falls back to older ones if a
        checkpoint is unreadable (e.g. a half-deleted step after a kill).

        Raises:
          CheckpointError: if there is no checkpoint, or none fits the template (e.g. the model or
            optimizer in the config changed since the run was saved).
        """
        steps = [step] if step is not None else self.all_steps()[::-1]
        if not steps:
            raise CheckpointError(
                f"no checkpoint found in {self.directory}; expected step folders written by "
                f"`jnn train` or Checkpointer.save. Fix: point to a run directory that has checkpoints.")
        if step is not None and step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available steps: "
                                  f"{self.all_steps()}. Fix: pass one of those, or no step for the newest.")
        target = _target(template)
        errors, mismatched = [], []
        for s in steps:
            try:
                saved = self._manager.item_metadata(s)[_STATE]
            except Exception:  # noqa: BLE001 - unreadable metadata: let restore report it
                saved = None
            diff = _mismatches(saved, target) if saved is not None else []
            if diff:
                mismatched.append(s)
                errors.append(f"step {s}: {len(diff)} array(s) differ: {'; '.join(diff[:8])}"
                              f"{' ...' if len(diff) > 8 else ''}")
                continue
            try:
                restored = self._manager.restore(s, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}))
                state = _with_arrays(template, restored[_STATE])
            except Exception as err:  # noqa: BLE001 - orbax raises many types; we report all
                errors.append(f"step {s}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
                log.warning("checkpoint step %s could not be restored (%s); trying an older one", s, err)
                continue
            return state, self._restore_data(s)
        if mismatched:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored into the current model and "
                f"optimizer: the checkpoints hold a different model or optimizer than the one given "
                f"(paths under params/ are parameters, under opt_state/ optimizer state): "
                f"{' | '.join(errors)}. Fix: build the model and optimizer the run was saved with (for "
                f"`jnn train --resume`, the run's config.json), or restore the parameters alone into "
                f"the new model.")
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored: {'; '.join(errors)}. Fix: check "
            f"that the files are complete (a run killed while saving falls back to an older step).")

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with `step`, if any."""
        return self._restore_json(step, _METRICS)

    def _restore_data(self, step: int) -> dict | None:
        return self._restore_json(step, _DATA)

    def _restore_json(self, step: int, item: str) -> dict | None:
        if not os.path.isdir(os.path.join(self.directory, str(step), item)):
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(restored[item])

    def wait(self) -> None:
        """Blocks until any background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        finally:
            if self._claim is not None:
                self._claim.release()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
