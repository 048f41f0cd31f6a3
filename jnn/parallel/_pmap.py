"""The classic path: `jax.pmap` over local devices, with a stacked (leading device axis) layout.

Since jax 0.8 `jax.pmap` is `jit(shard_map)` over a one-axis mesh; its inputs are arrays of shape
`(n_devices, ...)` sharded over that axis. `pmap_replicate` builds exactly that layout from one
copy per device (`jax.make_array_from_single_device_arrays`), so pmap never reshards, and
`pmap_unreplicate` reads one device's copy (`addressable_shards[0]`) instead of gathering all.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jnn.parallel._checks import call_or_explain, check_batch_divisible, diagnose_stacked
from jnn.parallel._steps import resolve_mapped_step, with_batch_norm_sync

PyTree = Any

PMAP_AXIS = "batch"


def _local_devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    return list(jax.local_devices() if devices is None else devices)


def _stacked_sharding(devices: Sequence[jax.Device], axis_name: str) -> NamedSharding:
    # The sharding pmap itself builds for in_axes=0 (jax/_src/pmap.py), so inputs are not moved.
    return NamedSharding(Mesh(np.asarray(devices), (axis_name,)), P(axis_name))


def pmap_replicate(tree: PyTree, devices: Sequence[jax.Device] | None = None, *,
                   axis_name: str = PMAP_AXIS) -> PyTree:
    """Stacks one copy of every array per device: shape `(n_devices, *x.shape)`, for `jax.pmap`.

    Each device receives one transfer of the array; nothing is concatenated on the host.

    Args:
      tree: a pytree of arrays (e.g. a `TrainState`).
      devices: the devices (default: this process's local devices, as pmap uses).
      axis_name: the pmap axis name (must match the step's, default "batch").
    """
    devices = _local_devices(devices)
    sharding = _stacked_sharding(devices, axis_name)

    def stack(x):
        x = jax.numpy.asarray(x) if not isinstance(x, jax.Array) else x
        copies = [jax.device_put(x[None], d) for d in devices]  # (1, ...) on each device
        return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, copies)

    return jax.tree.map(stack, tree)


def pmap_unreplicate(tree: PyTree) -> PyTree:
    """One device's copy of a pmap-replicated tree, without gathering the other copies."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)


def pmap_shard_batch(batch: PyTree, devices: Sequence[jax.Device] | None = None, *,
                     axis_name: str = PMAP_AXIS) -> PyTree:
    """Reshapes a (per-process) batch `(B, ...)` to `(n_devices, B // n_devices, ...)` on the devices.

    Raises:
      ValueError: if B does not divide evenly over the devices (with the batch size, the device
        count and the fix).
    """
    devices = _local_devices(devices)
    n = len(devices)
    check_batch_divisible(batch, n, axis_name, where="pmap_shard_batch")
    sharding = _stacked_sharding(devices, axis_name)
    # (B, ...) -> (n, B / n, ...): device i gets examples [i * B / n, (i + 1) * B / n)
    return jax.tree.map(
        lambda x: jax.device_put(np.reshape(np.asarray(x), (n, -1) + np.shape(x)[1:]), sharding),
        batch)


class PmapStep:
    """A pmapped train step; call it as `step(state, batch)` on stacked arguments.

    Attributes:
      axis_name: the device axis the step reduces over.
      devices: the local devices it runs on.
    """

    def __init__(self, train_step: Callable, axis_name: str, devices: Sequence[jax.Device] | None,
                 donate: bool, sync_batch_stats: bool):
        self.axis_name = axis_name
        self.devices = _local_devices(devices)
        step = with_batch_norm_sync(train_step, sync_batch_stats)
        self._pmapped = jax.pmap(step, axis_name=axis_name, devices=devices,
                                 donate_argnums=(0,) if donate else ())

    def replicate(self, state: PyTree) -> PyTree:
        """`pmap_replicate(state)` on this step's devices."""
        return pmap_replicate(state, self.devices, axis_name=self.axis_name)

    def shard_batch(self, batch: PyTree) -> PyTree:
        """`pmap_shard_batch(batch)` on this step's devices."""
        return pmap_shard_batch(batch, self.devices, axis_name=self.axis_name)

    def __call__(self, state: PyTree, batch: PyTree):
        n = len(self.devices)
        return call_or_explain(self._pmapped, state, batch, lambda: diagnose_stacked(
            state, batch, n, self.devices, where="pmap_train_step",
            shard_fix=(f"reshape the global batch of B examples to ({n}, B // {n}, ...) with "
                       f"step.shard_batch(batch) (B must be a multiple of {n})"),
            replicate_fix="stack one copy per device with step.replicate(state)"))


def pmap_train_step(train_step: Callable | str | None = None, *, loss_fn: Any = None,
                    axis_name: str | None = None, devices: Sequence[jax.Device] | None = None,
                    donate: bool = True, sync_batch_stats: bool = True) -> PmapStep:
    """Compiles a train step with `jax.pmap`: one replica per local device.

    Gradients, the loss and metrics are summed over the device axis by the step
    (`make_train_step(..., axis_name=...)`), BatchNorm statistics are averaged over it in the
    forward pass (every flax BatchNorm, whatever its `axis_name`) and the running
    statistics are averaged after it. The result equals single-device training on the global batch.

    Example:
      >>> step = jnn.parallel.pmap_train_step(loss_fn="cross_entropy")
      >>> pstate = step.replicate(state)
      >>> pstate, metrics = step(pstate, step.shard_batch(batch))
      >>> state = jnn.parallel.pmap_unreplicate(pstate)

    Args:
      train_step: a step built with `make_train_step(loss, axis_name="batch")` (or your own step
        that reduces over the axis); a string is taken as a loss name.
      loss_fn: instead of `train_step`: the loss, and the step is built here.
      axis_name: the pmap axis; default the step's own `axis_name`, else "batch".
      devices: local devices to map over (default all).
      donate: donate the state argument.
      sync_batch_stats: average BatchNorm statistics over devices in the forward pass (any flax
        BatchNorm); False keeps per-device statistics.

    Returns:
      A `PmapStep`: `step(stacked_state, stacked_batch) -> (stacked_state, stacked_metrics)`, with
      `replicate(state)` and `shard_batch(batch)` helpers.

    Raises:
      ValueError: if the step was built without `axis_name` (it would not average gradients) or
        with another one; on call, if the arguments lack the leading device axis or live elsewhere.
    """
    step, axis = resolve_mapped_step(train_step, loss_fn, axis_name, where="pmap_train_step",
                                     default_axis=PMAP_AXIS, axis_from_mesh=False)
    return PmapStep(step, axis, devices, donate, sync_batch_stats)
