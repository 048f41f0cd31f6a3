"""Sharded-jit data parallelism: one `jax.jit` with `NamedSharding`s, the default path.

The batch is split over the mesh's "data" axis and the state is replicated (or FSDP-sharded); the
compiler inserts the gradient all-reduce (or reduce-scatter / all-gather under FSDP) itself, so the
step is the plain single-device `make_train_step(loss)` and BatchNorm sees the global batch.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh

from jnn import compiler
from jnn.parallel import _mesh
from jnn.parallel._checks import call_or_explain, check_data_axis, diagnose_sharded_batch
from jnn.parallel._steps import check_unmapped_step, step_kind

PyTree = Any


class DataParallelStep:
    """A train step compiled once for a mesh; call it as `step(state, batch)`.

    Attributes:
      mesh: the device mesh.
      data_axis: the mesh axis the batch is split over.
      fsdp: whether parameters and optimizer state are sharded over `data_axis`.
    """

    def __init__(self, train_step: Callable, mesh: Mesh, *, fsdp: bool, data_axis: str,
                 donate: bool, fsdp_min_size: int):
        self.mesh, self.data_axis, self.fsdp = mesh, data_axis, fsdp
        self.kind = step_kind(train_step)
        self._fsdp_min_size = fsdp_min_size
        self._step = train_step
        self._donate = (0,) if donate else ()
        # Replicated: the shardings are pytree prefixes, one compiled step for any state. FSDP: the
        # shardings are per leaf, so one compiled step per state structure, built on first sight.
        self._replicated = None if fsdp else self._compile(_mesh.replicated(mesh))
        self._by_structure: dict[Any, Callable] = {}

    def _compile(self, state_shardings: PyTree) -> Callable:
        rep = _mesh.replicated(self.mesh)
        in_shardings = (state_shardings, _mesh.batch_sharding(self.mesh, self.data_axis))
        if not self.fsdp:
            return compiler.jit(self._step, in_shardings=in_shardings, out_shardings=rep, donate_argnums=self._donate)
        # A train step's new state keeps the FSDP layout and its metrics are replicated; an eval
        # step returns metrics only (the Step's kind says which).
        out_shardings = (state_shardings, rep) if self.kind == "train" else rep
        return compiler.jit(self._step, in_shardings=in_shardings, out_shardings=out_shardings,
                       donate_argnums=self._donate)

    def _jitted_for(self, state: PyTree) -> Callable:
        if self._replicated is not None:
            return self._replicated
        structure = jax.tree.structure(state)
        jitted = self._by_structure.get(structure)
        if jitted is None:
            jitted = self._by_structure[structure] = self._compile(self.state_sharding(state))
        return jitted

    def state_sharding(self, state: PyTree) -> PyTree:
        """The per-leaf shardings this step keeps `state` in."""
        return _mesh.state_sharding(state, self.mesh, fsdp=self.fsdp, data_axis=self.data_axis,
                                    fsdp_min_size=self._fsdp_min_size)

    def shard_state(self, state: PyTree) -> PyTree:
        """Places a copy of `state` the way this step keeps it (replicated or FSDP-sharded).

        A copy: the step donates its input, and a buffer shared with the caller's `state` would
        be deleted with it.
        """
        return _mesh.place(state, self.state_sharding(state)) if jax.process_count() == 1 else \
            _mesh.shard_state(state, self.mesh, fsdp=self.fsdp, data_axis=self.data_axis,
                              fsdp_min_size=self._fsdp_min_size)

    def shard_batch(self, batch: PyTree) -> PyTree:
        """`jnn.parallel.shard_batch(batch, self.mesh)`."""
        return _mesh.shard_batch(batch, self.mesh, data_axis=self.data_axis)

    def __call__(self, state: PyTree, batch: PyTree):
        return call_or_explain(self._jitted_for(state), state, batch, lambda: diagnose_sharded_batch(
            batch, self.mesh, self.data_axis, where="data_parallel step"))

    def lower(self, state: PyTree, batch: PyTree):
        """`jax.jit(...).lower(state, batch)`, to inspect the compiled program."""
        return self._jitted_for(state).lower(state, batch)


def data_parallel(train_step: Callable, mesh: Mesh | None = None, *, fsdp: bool = False,
                  data_axis: str = _mesh.DATA_AXIS, donate: bool = True,
                  fsdp_min_size: int = 0) -> DataParallelStep:
    """Compiles `train_step` for data parallelism over `mesh` with sharded jit.

    The global batch is split over `data_axis` on its leading axis; the state is replicated, or
    with `fsdp=True` each parameter and optimizer-state array is split over `data_axis` along its
    largest evenly divisible axis (FSDP / ZeRO-3: a model need not fit on one device). The state
    argument is donated. The result equals single-device training on the global batch.

    Example:
      >>> mesh = jnn.parallel.make_mesh()
      >>> step = jnn.parallel.data_parallel(jnn.make_train_step("cross_entropy"), mesh)
      >>> state = step.shard_state(state)
      >>> state, metrics = step(state, jnn.parallel.shard_batch(batch, mesh))

    Args:
      train_step: `make_train_step(loss)` (without `axis_name`), or any pure
        `(state, batch) -> (state, metrics)`; or an eval step such as `make_eval_step(loss)` (pass
        `donate=False`), FSDP-sharded states included. A plain function is taken as a train step;
        wrap your own eval function as `jnn.Step(fn, "eval")`.
      mesh: the device mesh (default `make_mesh()`: all devices on "data").
      fsdp: shard parameters and optimizer state over `data_axis`.
      data_axis: the mesh axis the batch (and FSDP state) is split over.
      donate: donate the state argument (its buffers are reused for the new state).
      fsdp_min_size: under FSDP, arrays with fewer elements stay replicated.

    Returns:
      A `DataParallelStep`, called as `step(state, batch)`; it also has `shard_state(state)`,
      `shard_batch(batch)` and `lower(state, batch)`. Host (numpy) batches are placed
      automatically on one process; on several, use `shard_batch`.

    Raises:
      ValueError: if `data_axis` is not an axis of the mesh or the step reduces over a named axis;
        on call, if the batch does not divide over the devices or lives on other devices.
    """
    mesh = _mesh.make_mesh() if mesh is None else mesh
    check_data_axis(mesh, data_axis, where="data_parallel")
    mesh = _mesh.auto_axes(mesh)
    check_unmapped_step(train_step, where="data_parallel")
    return DataParallelStep(train_step, mesh, fsdp=fsdp, data_axis=data_axis, donate=donate,
                            fsdp_min_size=fsdp_min_size)
