"""Data parallelism with `jax.shard_map`: the per-device program with explicit collectives.

The same mesh and the same array layout as sharded jit (batch split over "data", state
replicated), but the step body sees its device's shard of the batch and reduces with the `psum`s
that `make_train_step(loss, axis_name="data")` writes, as under pmap.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jnn import compiler
from jnn.parallel import _mesh
from jnn.parallel._checks import call_or_explain, check_data_axis, diagnose_sharded_batch
from jnn.parallel._steps import resolve_mapped_step, with_batch_norm_sync

PyTree = Any


class ShardMapStep:
    """A shard_mapped, jitted train step; call it as `step(state, batch)` like `data_parallel`."""

    def __init__(self, train_step: Callable, mesh: Mesh, data_axis: str, donate: bool,
                 sync_batch_stats: bool):
        self.mesh, self.data_axis = mesh, data_axis
        step = with_batch_norm_sync(train_step, sync_batch_stats)
        # check_vma=False: the step's own psums make the outputs replicated, exactly as under pmap.
        # With check_vma=True, JAX would also insert a psum when transposing the implicit
        # broadcast of the replicated params, and the step's psum would count gradients twice.
        mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(data_axis)), out_specs=(P(), P()),
                               check_vma=False)
        rep = _mesh.replicated(mesh)
        self._jitted = compiler.jit(mapped, in_shardings=(rep, _mesh.batch_sharding(mesh, data_axis)),
                               out_shardings=(rep, rep), donate_argnums=(0,) if donate else ())

    def shard_state(self, state: PyTree) -> PyTree:
        """`jnn.parallel.replicate(state, self.mesh)`."""
        return _mesh.replicate(state, self.mesh)

    def shard_batch(self, batch: PyTree) -> PyTree:
        """`jnn.parallel.shard_batch(batch, self.mesh)`."""
        return _mesh.shard_batch(batch, self.mesh, data_axis=self.data_axis)

    def __call__(self, state: PyTree, batch: PyTree):
        return call_or_explain(self._jitted, state, batch, lambda: diagnose_sharded_batch(
            batch, self.mesh, self.data_axis, where="shard_map_train_step"))


def shard_map_train_step(train_step: Callable | str | None = None, mesh: Mesh | None = None, *,
                         loss_fn: Any = None, data_axis: str = _mesh.DATA_AXIS, donate: bool = True,
                         sync_batch_stats: bool = True) -> ShardMapStep:
    """Compiles a train step with `jax.shard_map` over the `data_axis` of `mesh`, then `jax.jit`.

    Example:
      >>> mesh = jnn.parallel.make_mesh()
      >>> step = jnn.parallel.shard_map_train_step(jnn.make_train_step(loss, axis_name="data"), mesh)
      >>> state, metrics = step(step.shard_state(state), step.shard_batch(batch))

    Args:
      train_step: a step built with `make_train_step(loss, axis_name=data_axis)` (or your own step
        that reduces over `data_axis`); a string is taken as a loss name.
      mesh: the device mesh (default `make_mesh()`).
      loss_fn: instead of `train_step`: the loss, and the step is built here.
      data_axis: the mesh axis the batch is split over and the step reduces over.
      donate: donate the state argument.
      sync_batch_stats: average BatchNorm statistics over `data_axis` in the forward pass (any flax
        BatchNorm); False keeps per-device statistics.

    Returns:
      A `ShardMapStep` taking and returning the same layouts as `data_parallel`.

    Raises:
      ValueError: if `data_axis` is not a mesh axis, or the step reduces over no axis or another
        one; on call, if the batch does not divide over the devices or lives elsewhere.
    """
    mesh = _mesh.make_mesh() if mesh is None else mesh
    check_data_axis(mesh, data_axis, where="shard_map_train_step")
    mesh = _mesh.auto_axes(mesh)
    step, _ = resolve_mapped_step(train_step, loss_fn, data_axis, where="shard_map_train_step",
                                  default_axis=data_axis, axis_from_mesh=True)
    return ShardMapStep(step, mesh, data_axis, donate, sync_batch_stats)
