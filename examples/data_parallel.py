"""Data-parallel training of an MLP on scikit-learn's digits: one script, 1 device to N processes.

The same global batches, seed and step run everywhere, so every command below prints the same
parameter checksum (up to float32 reduction order, ~1e-6 relative):

  python examples/data_parallel.py                               # 1 device
  python examples/data_parallel.py --devices 8                   # 8 fake CPU devices, 1 process
  python examples/data_parallel.py --devices 2 --processes 2     # 2 processes x 2 devices, localhost
  python examples/data_parallel.py --devices 8 --mode pmap       # or shard_map, fsdp

On a GPU/TPU cluster, run the same script once per host (without --devices/--processes) with
JNN_COORDINATOR=<host0>:<port> JNN_NUM_PROCESSES=<hosts> JNN_PROCESS_ID=<i>, or under SLURM /
Open MPI / a TPU pod with --auto-detect; every host loads only its block of each batch.
"""
from __future__ import annotations

import argparse
import os
import sys

MODES = ("jit", "fsdp", "shard_map", "pmap")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=None,
                   help="fake CPU devices per process (sets XLA_FLAGS before JAX starts)")
    p.add_argument("--processes", type=int, default=1, help="processes to launch on this machine")
    p.add_argument("--mode", choices=MODES, default="jit", help="how the step is spread over devices")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=60, help="seconds to wait for peer processes")
    p.add_argument("--auto-detect", action="store_true", help="read the cluster's own variables")
    p.add_argument("--save", default=None, help="write the final parameters to this .npz")
    return p.parse_args(argv)


def configure_devices(devices: int | None) -> None:
    """Fake CPU devices must be requested before JAX initialises its backend."""
    if devices is not None:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"


def load_digits():
    """(1797, 64) float32 pixels in [0, 1] and (1797,) int32 labels."""
    import numpy as np
    from sklearn.datasets import load_digits as sk_load

    digits = sk_load()
    return (digits.images.reshape(len(digits.images), -1) / 16.0).astype(np.float32), \
        digits.target.astype(np.int32)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int):
    """The global batch of `step`: the same on every process and in every mode."""
    import numpy as np

    epoch, pos = divmod(step * batch_size, num_examples - num_examples % batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[pos: pos + batch_size]


def make_model():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(128)(x))
            x = nn.relu(nn.Dense(64)(x))
            return nn.Dense(10)(x)

    return MLP()


def train(args: argparse.Namespace, mesh=None):
    """Trains `args.steps` steps; returns the final parameters as host numpy arrays."""
    import jax
    import optax

    import jnn
    from jnn import parallel

    x, y = load_digits()
    state = jnn.create_train_state(make_model(), optax.adam(args.lr), x[:1], jax.random.key(args.seed))
    loss = optax.softmax_cross_entropy_with_integer_labels
    mesh = parallel.make_mesh() if mesh is None else mesh
    shard, shards = parallel.data_shard(mesh)  # this process's block of each global batch
    local = args.batch_size // shards
    if args.mode == "pmap":
        step = parallel.pmap_train_step(loss_fn=loss)
        state, place = step.replicate(state), step.shard_batch
    else:
        if args.mode == "shard_map":
            step = parallel.shard_map_train_step(loss_fn=loss, mesh=mesh)
        else:
            step = parallel.data_parallel(jnn.make_train_step(loss), mesh, fsdp=args.mode == "fsdp")
        state, place = step.shard_state(state), step.shard_batch
    for i in range(args.steps):
        idx = batch_indices(len(x), args.batch_size, i, args.seed)[shard * local: (shard + 1) * local]
        state, metrics = step(state, place({"inputs": x[idx], "labels": y[idx]}))
        if parallel.process_index() == 0 and (i % 20 == 0 or i == args.steps - 1):
            loss_value = metrics["loss"].addressable_shards[0].data.reshape(-1)[0]
            print(f"step {i:4d}  loss {float(loss_value):.4f}", flush=True)
    params = parallel.pmap_unreplicate(state.params) if args.mode == "pmap" else state.params
    return parallel.to_host(params)


def checksum(params) -> float:
    import jax
    import numpy as np

    return float(sum(np.abs(np.asarray(p, np.float64)).sum() for p in jax.tree.leaves(params)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.processes > 1 and "JNN_PROCESS_ID" not in os.environ:
        from jnn.parallel import launch_local  # the launcher: owns the children, kills all on failure

        child = [sys.executable, os.path.abspath(__file__)] + [
            a for a in (argv if argv is not None else sys.argv[1:])]
        return launch_local(child, args.processes, devices_per_process=args.devices or 1,
                            timeout_s=args.timeout + 10 * args.steps)
    configure_devices(args.devices)
    from jnn import parallel

    parallel.initialize(timeout_s=args.timeout, auto_detect=args.auto_detect)
    import jax

    with parallel.stop_all_on_failure("data_parallel.py"):  # a lost peer: one line, exit, no hang
        params = train(args)
    if jax.process_index() == 0:
        print(f"{jax.process_count()} process(es) x {jax.local_device_count()} device(s), "
              f"mode {args.mode}: params checksum {checksum(params):.6f}", flush=True)
        if args.save:
            import numpy as np
            np.savez(args.save, **{jax.tree_util.keystr(k): v for k, v in
                                   jax.tree_util.tree_leaves_with_path(params)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
