"""Running one train step on many devices, and proving every way computes the same thing.

Three ways to spread `make_train_step` over devices, all equal to single-device training on the
global batch:

- `data_parallel(step, mesh)`: sharded `jax.jit` (the default). The batch is split over the mesh's
  "data" axis, the state replicated or, with `fsdp=True`, sharded over it.
- `pmap_train_step(...)`: classic `jax.pmap` with a leading device axis (`pmap_replicate`,
  `pmap_shard_batch`, `pmap_unreplicate`).
- `shard_map_train_step(...)`: `jax.shard_map` with explicit collectives, same layout as sharded jit.

Multi-process runs: `initialize()` first, then `shard_batch` builds global batches from each
process's part (`data_shard(mesh)` says which part). `launch_local` runs N processes on one machine;
`stop_all_on_failure` makes a failed process exit at once with one line instead of hanging.

Each name is imported on first use (PEP 562, as in `jnn`): `launch_local` (the launcher of
`jnn train --processes N`) comes without JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jnn import _lazy

# public name -> the module that defines it
_NAMES = {
    **dict.fromkeys(("PEER_EXIT_CODE", "initialize", "stop_all_on_failure"), "jnn.parallel._distributed"),
    "free_port": "jnn.parallel._launch", "launch_local": "jnn.parallel._launch",
    "DataParallelStep": "jnn.parallel._jit", "data_parallel": "jnn.parallel._jit",
    **dict.fromkeys(("DATA_AXIS", "MODEL_AXIS", "batch_sharding", "data_shard", "fsdp_spec", "make_mesh",
                     "process_count", "process_index", "replicate", "replicated", "shard_batch", "shard_state",
                     "state_sharding", "to_host"), "jnn.parallel._mesh"),
    **dict.fromkeys(("PMAP_AXIS", "PmapStep", "pmap_replicate", "pmap_shard_batch", "pmap_train_step",
                     "pmap_unreplicate"), "jnn.parallel._pmap"),
    "ShardMapStep": "jnn.parallel._shard_map", "shard_map_train_step": "jnn.parallel._shard_map",
}

if TYPE_CHECKING:  # what static tools see: the eager imports
    from jnn.parallel._distributed import PEER_EXIT_CODE, initialize, stop_all_on_failure  # noqa: F401
    from jnn.parallel._jit import DataParallelStep, data_parallel  # noqa: F401
    from jnn.parallel._launch import free_port, launch_local  # noqa: F401
    from jnn.parallel._mesh import (DATA_AXIS, MODEL_AXIS, batch_sharding, data_shard, fsdp_spec,  # noqa: F401
                                    make_mesh, process_count, process_index, replicate, replicated,
                                    shard_batch, shard_state, state_sharding, to_host)
    from jnn.parallel._pmap import (PMAP_AXIS, PmapStep, pmap_replicate, pmap_shard_batch,  # noqa: F401
                                    pmap_train_step, pmap_unreplicate)
    from jnn.parallel._shard_map import ShardMapStep, shard_map_train_step  # noqa: F401


__getattr__ = _lazy.attributes(__name__, _NAMES, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_NAMES)
