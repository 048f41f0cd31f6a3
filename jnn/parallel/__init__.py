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
"""
from jnn.parallel._distributed import (PEER_EXIT_CODE, free_port, initialize, launch_local,
                                       stop_all_on_failure)
from jnn.parallel._jit import DataParallelStep, data_parallel
from jnn.parallel._mesh import (DATA_AXIS, MODEL_AXIS, batch_sharding, data_shard, fsdp_spec,
                                make_mesh, process_count, process_index, replicate, replicated,
                                shard_batch, shard_state, state_sharding, to_host)
from jnn.parallel._pmap import (PMAP_AXIS, PmapStep, pmap_replicate, pmap_shard_batch,
                                pmap_train_step, pmap_unreplicate)
from jnn.parallel._shard_map import ShardMapStep, shard_map_train_step

__all__ = [
    "DATA_AXIS", "MODEL_AXIS", "PEER_EXIT_CODE", "PMAP_AXIS",
    "DataParallelStep", "PmapStep", "ShardMapStep",
    "batch_sharding", "data_parallel", "data_shard", "free_port", "fsdp_spec", "initialize",
    "launch_local", "make_mesh", "pmap_replicate", "pmap_shard_batch", "pmap_train_step",
    "pmap_unreplicate", "process_count", "process_index", "replicate", "replicated",
    "shard_batch", "shard_map_train_step", "shard_state", "state_sharding", "stop_all_on_failure",
    "to_host",
]
