"""Meshes and placement: where the state and the batch live for sharded-jit data parallelism.

The state is replicated (every device holds a copy) or, with FSDP, each array's largest axis that
divides evenly is split over the "data" axis. The batch is split over "data" on its leading axis.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jnn.parallel._checks import check_batch_divisible, check_data_axis

PyTree = Any

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(data: int | None = None, model: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, model)` device mesh with axis names "data" and "model" and Auto axis types.

    Auto axis types let the compiler propagate shardings from the inputs (the batch split over
    "data") through the step; `jax.make_mesh` defaults to Explicit types since jax 0.9.

    Example:
      >>> mesh = jnn.parallel.make_mesh()          # all devices on "data"
      >>> mesh = jnn.parallel.make_mesh(data=4)    # the first 4 devices
      >>> mesh = jnn.parallel.make_mesh(model=2)   # n/2 on "data" x 2 on "model"

    Args:
      data: devices on the "data" axis; None uses all devices not taken by `model`.
      model: devices on the "model" axis (1 for pure data parallelism: the axis still exists, with
        size 1, so code that names it runs unchanged).
      devices: the devices to use (default `jax.devices()`, all processes).

    Returns:
      A `jax.sharding.Mesh` of shape `(data, model)`.

    Raises:
      ValueError: if the sizes do not fit the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(
            f"make_mesh: model={model} must be a positive divisor of the {n} available devices. "
            f"Fix: pick model from {_divisors(n)}.")
    if data is None:
        data = n // model
    if data < 1 or data * model > n:
        raise ValueError(
            f"make_mesh: data={data} x model={model} needs {data * model} devices, but {n} are "
            f"available. Fix: use data <= {n // model}, or start with more devices "
            f"(XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU).")
    return jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: data * model])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def auto_axes(mesh: Mesh) -> Mesh:
    """`mesh` with Auto axis types (the same devices and names).

    jnn's steps let the compiler propagate shardings (Auto axes). `jax.make_mesh` makes Explicit
    axes by default since jax 0.9, under which ops such as an embedding lookup on a sharded batch
    must name their output sharding; jnn runs every mesh it is given as Auto instead.
    """
    if not isinstance(mesh, Mesh) or all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that puts a full copy on every device of `mesh`."""
    return NamedSharding(auto_axes(mesh), P())


def batch_sharding(mesh: Mesh, data_axis: str = DATA_AXIS) -> NamedSharding:
    """The sharding that splits the leading (batch) axis over `data_axis`."""
    check_data_axis(mesh, data_axis, where="batch_sharding")
    return NamedSharding(auto_axes(mesh), P(data_axis))


def fsdp_spec(shape: tuple[int, ...], n: int, data_axis: str = DATA_AXIS, min_size: int = 0) -> P:
    """FSDP/ZeRO partition spec: the largest axis divisible by `n` split over `data_axis`.

    Arrays smaller than `min_size` elements, scalars and arrays with no divisible axis stay
    replicated. Ties go to the leading axis.
    """
    if n <= 1 or not shape or int(np.prod(shape)) < max(min_size, 1):
        return P()
    candidates = [(size, -axis) for axis, size in enumerate(shape) if size % n == 0]
    if not candidates:
        return P()
    _, neg_axis = max(candidates)
    return P(*([None] * -neg_axis + [data_axis]))


def state_sharding(state: PyTree, mesh: Mesh, *, fsdp: bool = False, data_axis: str = DATA_AXIS,
                   fsdp_min_size: int = 0) -> PyTree:
    """Per-leaf `NamedSharding`s for a state: replicated, or FSDP-sharded over `data_axis`.

    Args:
      state: any pytree of arrays (a `TrainState`, params, an optimizer state).
      mesh: the mesh.
      fsdp: shard each array's largest divisible axis over `data_axis` (see `fsdp_spec`).
      data_axis: the mesh axis for FSDP.
      fsdp_min_size: arrays with fewer elements stay replicated.

    Returns:
      A pytree of `NamedSharding` with the structure of `state`.
    """
    check_data_axis(mesh, data_axis, where="state_sharding")
    mesh = auto_axes(mesh)
    if not fsdp:
        return jax.tree.map(lambda _: replicated(mesh), state)
    n = mesh.shape[data_axis]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), n, data_axis, fsdp_min_size)), state)


def _is_multiprocess() -> bool:
    return jax.process_count() > 1


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """`jax.device_put`, but multi-process safe for committed single-process arrays."""
    if not _is_multiprocess():
        # A compiled copy, not `device_put`: device_put onto a replicated sharding reuses the
        # caller's buffer on the first device (even with may_alias=False, jax 0.10.2), and a
        # donating step would then delete the caller's own arrays.
        # device_put first: arrays committed to one device (e.g. restored from a checkpoint)
        # cannot enter a computation over the whole mesh.
        return jax.jit(lambda t: t, out_shardings=shardings)(jax.device_put(tree, shardings))
    # device_put of a host value onto a global sharding is allowed (every process holds the same
    # value); a committed local array or a typed PRNG key is not, so go through host numpy.
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, sharding):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            x = np.asarray(x)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree, shardings)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Puts a full copy of every array of `tree` on every device of `mesh` (sharded-jit layout).

    For the stacked layout that `jax.pmap` wants, see `pmap_replicate`.
    """
    return place(tree, replicated(mesh))


def shard_state(state: PyTree, mesh: Mesh, *, fsdp: bool = False, data_axis: str = DATA_AXIS,
                fsdp_min_size: int = 0) -> PyTree:
    """Places a state on `mesh`: replicated, or FSDP-sharded (see `state_sharding`)."""
    return place(state, state_sharding(state, mesh, fsdp=fsdp, data_axis=data_axis,
                                      fsdp_min_size=fsdp_min_size))


def shard_batch(batch: PyTree, mesh: Mesh, *, data_axis: str = DATA_AXIS) -> PyTree:
    """Splits a batch over the `data_axis` of `mesh` on its leading axis.

    Single process: `batch` is the global batch (host numpy or device arrays). Multi-process:
    `batch` is this process's part of the global batch (rows `data_shard(mesh)` of it, see
    `jnn.parallel.data_shard`), and the global batch is assembled with
    `jax.make_array_from_process_local_data` without moving data between processes.

    Raises:
      ValueError: if `data_axis` is not a mesh axis, or the batch size does not divide evenly over
        the devices of `data_axis` (naming the batch size, the device count and the fix).
    """
    sharding = batch_sharding(mesh, data_axis)
    if not _is_multiprocess():
        check_batch_divisible(batch, mesh.shape[data_axis], data_axis, where="shard_batch")
        return jax.device_put(batch, sharding)
    _, count = data_shard(mesh, data_axis)
    local_devices = mesh.shape[data_axis] // count
    check_batch_divisible(batch, local_devices, data_axis, where="shard_batch (this process's part)")
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def data_shard(mesh: Mesh | None = None, data_axis: str = DATA_AXIS) -> tuple[int, int]:
    """Which block of each global batch this process loads: `(index, count)`.

    Each process feeds `global_batch[index * B // count : (index + 1) * B // count]` to
    `shard_batch`; a data pipeline takes the same pair as its shard index/count. With no mesh this
    is `(jax.process_index(), jax.process_count())`; with a mesh it is derived from where this
    process's devices sit on `data_axis`, so it is right whatever order the mesh lists devices in.

    Raises:
      ValueError: if this process's devices are not one contiguous block of `data_axis`.
    """
    if mesh is None or not _is_multiprocess():
        return jax.process_index(), jax.process_count()
    check_data_axis(mesh, data_axis, where="data_shard")
    axis = mesh.axis_names.index(data_axis)
    me = jax.process_index()
    positions = sorted({idx[axis] for idx, d in np.ndenumerate(mesh.devices) if d.process_index == me})
    n, width = mesh.shape[data_axis], len(positions)
    if not positions or n % width or positions != list(range(positions[0], positions[0] + width)) \
            or positions[0] % width:
        raise ValueError(
            f"data_shard: process {me} holds positions {positions} of mesh axis {data_axis!r} "
            f"(size {n}); expected one contiguous, evenly sized block per process. Fix: build the "
            f"mesh with jnn.parallel.make_mesh(), which keeps each process's devices together.")
    return positions[0] // width, n // width


def process_index() -> int:
    """This process's index among `process_count()` (0 when not distributed)."""
    return jax.process_index()


def process_count() -> int:
    """How many processes take part (1 when not distributed)."""
    return jax.process_count()


def to_host(tree: PyTree) -> PyTree:
    """Full numpy copies of every array in `tree`, gathering shards across processes if needed.

    For reading FSDP-sharded parameters (checksums, export); replicated arrays are read from the
    local copy without communication.
    """
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.is_fully_addressable or x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_shards[0].data) if x.sharding.is_fully_replicated \
                else np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)
