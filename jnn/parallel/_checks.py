"""Errors a user can cause when spreading a step over devices, raised before anything compiles.

The checks run on the slow path only: the parallel steps call the compiled function directly and,
if JAX refuses the arguments, ask `diagnose_*` what the user got wrong and raise a `ValueError`
that names the batch size, the device count and the fix. The fast path pays nothing.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

PyTree = Any


def _leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _name(path: str, what: str) -> str:
    return f"{what}{path}" if path else what


def check_data_axis(mesh: Mesh, data_axis: str, *, where: str) -> None:
    """Raises if `data_axis` is not an axis of `mesh`."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"{where}: expected a jax.sharding.Mesh, got {type(mesh).__name__}. "
                         f"Fix: build one with jnn.parallel.make_mesh().")
    if data_axis not in mesh.axis_names:
        raise ValueError(
            f"{where}: the mesh has axes {tuple(mesh.axis_names)} (shape {dict(mesh.shape)}); there "
            f"is no axis {data_axis!r} to split the batch over. Fix: pass data_axis= one of "
            f"{tuple(mesh.axis_names)}, or build the mesh with jnn.parallel.make_mesh(), whose "
            f"batch axis is 'data'.")


def _suggest(batch_size: int, n: int) -> str:
    lower = batch_size - batch_size % n
    upper = lower + n
    sizes = [s for s in (lower, upper) if s > 0]
    return " or ".join(str(s) for s in sizes)


def check_batch_divisible(batch: PyTree, n: int, axis_name: str, *, where: str) -> None:
    """Raises unless every leaf's leading axis divides evenly over `n` devices."""
    sizes = {}
    for path, leaf in _leaves_with_paths(batch):
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(
                f"{where}: {_name(path, 'batch')} is a scalar; every batch entry needs a leading "
                f"batch axis to split over the {n} devices of mesh axis {axis_name!r}.")
        sizes[path] = shape[0]
        if shape[0] % n:
            raise ValueError(
                f"{where}: global batch size {shape[0]} ({_name(path, 'batch')} has shape "
                f"{tuple(shape)}) does not divide evenly over the {n} devices of mesh axis "
                f"{axis_name!r}. Fix: use a batch size that is a multiple of {n} (e.g. "
                f"{_suggest(shape[0], n)}), or pad the last batch and weigh the padding 0 with "
                f"batch['mask'].")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where}: batch entries have different leading sizes {sizes}; expected one "
                         f"batch size for all. Fix: pass one label (and mask) per example.")


def _devices_str(devices) -> str:
    ids = sorted(d.id for d in devices)
    return f"{len(ids)} device(s) {ids if len(ids) <= 16 else ids[:16] + ['...']}"


def diagnose_sharded_batch(batch: PyTree, mesh: Mesh, data_axis: str, *, where: str) -> None:
    """Explains why a batch was refused by a sharded-jit step; returns quietly if it finds nothing."""
    n = mesh.shape[data_axis]
    check_batch_divisible(batch, n, data_axis, where=where)
    want = NamedSharding(mesh, jax.sharding.PartitionSpec(data_axis))
    mesh_devices = set(mesh.devices.flat)
    for path, leaf in _leaves_with_paths(batch):
        if not isinstance(leaf, jax.Array) or not leaf.committed:
            continue  # host data: jit places it
        got = leaf.sharding
        batch_size = leaf.shape[0]
        if set(got.device_set) != mesh_devices:
            raise ValueError(
                f"{where}: {_name(path, 'batch')} (global batch size {batch_size}) lives on "
                f"{_devices_str(got.device_set)}, but the step runs on the {mesh.size} devices of "
                f"its mesh ({n} on axis {data_axis!r}: {_devices_str(mesh_devices)}). Fix: place the "
                f"batch with jnn.parallel.shard_batch(batch, mesh), or pass host (numpy) arrays.")
        if not got.is_equivalent_to(want, leaf.ndim):
            raise ValueError(
                f"{where}: {_name(path, 'batch')} (global batch size {batch_size}) is laid out as "
                f"{got}, but the step expects its leading axis split over the {n} devices of mesh "
                f"axis {data_axis!r} ({want.spec}). Fix: place the batch with "
                f"jnn.parallel.shard_batch(batch, mesh), or pass host (numpy) arrays.")


def diagnose_stacked(state: PyTree, batch: PyTree, n_devices: int, devices, *, where: str,
                     shard_fix: str, replicate_fix: str) -> None:
    """Explains why a pmap step refused its arguments; returns quietly if it finds nothing."""
    for what, tree, fix in (("state", state, replicate_fix), ("batch", batch, shard_fix)):
        for path, leaf in _leaves_with_paths(tree):
            shape = np.shape(leaf)
            if not shape or shape[0] != n_devices:
                got = shape[0] if shape else "no leading axis"
                raise ValueError(
                    f"{where}: {_name(path, what)} has shape {tuple(shape)}; pmap expects a leading "
                    f"device axis of size {n_devices} (the number of devices), got {got}. Fix: "
                    f"{fix}.")
    device_set = set(devices)
    for path, leaf in _leaves_with_paths(batch):
        if isinstance(leaf, jax.Array) and leaf.committed and set(leaf.sharding.device_set) != device_set:
            raise ValueError(
                f"{where}: {_name(path, 'batch')} (shape {leaf.shape}: {n_devices} devices x "
                f"{leaf.shape[1] if leaf.ndim > 1 else '?'} examples) lives on "
                f"{_devices_str(leaf.sharding.device_set)}, but the step runs on "
                f"{_devices_str(device_set)}. Fix: {shard_fix}.")


def call_or_explain(fn: Callable, state: PyTree, batch: PyTree, explain: Callable[[], None]):
    """`fn(state, batch)`; when it raises, `explain()` raises a `ValueError` that says what the
    caller got wrong (chained to the original error), or the original error propagates. The
    diagnosis costs nothing on the normal path."""
    try:
        return fn(state, batch)
    except Exception as e:  # slow path only
        try:
            explain()
        except ValueError as diagnosis:
            raise diagnosis from e
        raise
