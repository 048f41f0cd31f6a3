"""What a parallel wrapper needs from the step and the model: the step's axis, BatchNorm's sync.

`make_train_step(loss, axis_name=...)` returns a `jnn.Step` whose fields say whether it reduces over
a device axis and whether it is a train or an eval step, so a wrapper can refuse the wrong kind
instead of silently training each device on its own shard.

BatchNorm statistics follow the step's axis for any flax model (`jnn.train.model`): statistics of
the global batch under sharded jit, averaged over the device axis under pmap and shard_map.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jnn.train.step import Step, make_train_step

_UNMARKED = object()


def step_axis_name(train_step: Callable) -> Any:
    """The `axis_name` of a `jnn.Step` (from `make_train_step`), or `_UNMARKED` for a plain function."""
    return train_step.axis_name if isinstance(train_step, Step) else _UNMARKED


def step_kind(step: Callable) -> str:
    """"train" or "eval" for a `jnn.Step`; a plain function is taken as a train step."""
    return step.kind if isinstance(step, Step) else "train"


def resolve_mapped_step(train_step: Callable | str | None, loss_fn: Any, axis_name: str | None, *,
                        where: str, default_axis: str, axis_from_mesh: bool) -> tuple[Callable, str]:
    """The step to run under a mapped axis (pmap / shard_map) and that axis's name.

    Args:
      train_step: a step from `make_train_step(loss, axis_name=...)` or the user's own step that
        reduces over `axis_name`; a string is taken as a loss name.
      loss_fn: alternatively, the loss: the step is built here with the right axis.
      axis_name: the device axis; None takes the step's own (pmap) or `default_axis`.
      where: the caller's name, for errors.
      default_axis: axis when neither the step nor the caller names one.
      axis_from_mesh: the axis is the mesh's (shard_map) and the step must match it.
    """
    if isinstance(train_step, str):
        train_step, loss_fn = None, train_step
    if (train_step is None) == (loss_fn is None):
        raise ValueError(
            f"{where}: pass exactly one of a train step (built with make_train_step(loss, "
            f"axis_name=...)) or loss_fn=; got {'both' if train_step is not None else 'neither'}.")
    if loss_fn is not None:
        axis = axis_name or default_axis
        return make_train_step(loss_fn, axis_name=axis), axis
    marked = step_axis_name(train_step)
    if marked is _UNMARKED:
        return train_step, axis_name or default_axis
    if marked is None:
        raise ValueError(
            f"{where}: the train step was built without axis_name, so it would not average "
            f"gradients over devices and each device would train on its own shard. Fix: build it "
            f"with make_train_step(loss, axis_name={axis_name or default_axis!r}), or pass "
            f"loss_fn=loss and let {where} build it.")
    if axis_name is not None and marked != axis_name:
        hint = "the mesh's data axis" if axis_from_mesh else "the device axis"
        raise ValueError(
            f"{where}: the train step reduces over axis_name={marked!r}, but {hint} is "
            f"{axis_name!r}. Fix: build the step with make_train_step(loss, axis_name={axis_name!r}).")
    return train_step, marked


def check_unmapped_step(train_step: Callable, *, where: str) -> None:
    """Sharded jit has no named device axis: refuse a step that reduces over one."""
    marked = step_axis_name(train_step)
    if marked is not _UNMARKED and marked is not None:
        raise ValueError(
            f"{where}: the train step was built with axis_name={marked!r}, but under sharded jit the "
            f"compiler inserts the cross-device reductions and there is no named axis. Fix: build it "
            f"with make_train_step(loss) (no axis_name); use pmap_train_step or "
            f"shard_map_train_step for a step with explicit collectives.")


def with_batch_norm_sync(train_step: Callable, sync: bool) -> Callable:
    """`train_step`, or with `sync=False` a step whose BatchNorm layers keep per-device statistics.

    jnn's step makes every BatchNorm reduce over the step's device axis (see `jnn.train.model`);
    this wrapper turns that off for one call and gives back the caller's static model, so nothing
    re-traces.
    """
    if sync:
        return train_step

    def step(state, batch):
        model = getattr(state, "model", None)
        if not hasattr(model, "sync_batch_norm"):
            return train_step(state, batch)
        out = train_step(state.replace(model=dataclasses.replace(model, sync_batch_norm=False)), batch)
        if isinstance(out, tuple) and len(out) == 2 and hasattr(out[0], "model"):
            return out[0].replace(model=model), out[1]
        return out

    return step
