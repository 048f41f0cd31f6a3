"""Overhead of jnn's parallel wrappers vs the same step written by hand, on N (fake) devices.

  python benchmarks/parallel.py                 # 8 fake CPU devices, writes benchmarks/results/
  python benchmarks/parallel.py --devices 4 --rounds 15 --steps 30

Variants, all on the same model, optimizer and global batch:
  hand_jit        jax.jit + NamedSharding of a hand-written raw JAX + optax step (no metrics)
  core_jit        jax.jit + NamedSharding of jnn.make_train_step (the core step, wrapped by hand)
  jnn_jit         jnn.parallel.data_parallel(jnn.make_train_step(loss), mesh)
  hand_pmap       jax.pmap of a hand-written raw step with psum/pmean
  core_pmap       jax.pmap of jnn.make_train_step(loss, axis_name="batch")
  jnn_pmap        jnn.parallel.pmap_train_step(loss_fn=loss)
Each round runs every variant for --steps steps in turn (interleaved, so load drifts hit all
alike); a variant's time is the median over rounds, and each ratio is the median of the per-round
ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=512, help="global batch")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jnn
    from jnn import parallel

    class MLP(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(self.width)(x))
            x = nn.relu(nn.Dense(self.width)(x))
            return nn.Dense(10)(x)

    loss_fn = optax.softmax_cross_entropy_with_integer_labels
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.normal(size=(args.batch_size, 784)).astype(np.float32),
             "labels": rng.integers(0, 10, args.batch_size).astype(np.int32)}
    model, tx = MLP(args.width), optax.adam(1e-3)
    state0 = jnn.create_train_state(model, tx, batch["inputs"][:1], jax.random.key(0))
    n = args.devices

    def fresh(tree):  # private buffers: placing may alias device 0's buffer, and steps donate
        return jax.tree.map(jnp.copy, tree)

    mesh = parallel.make_mesh()
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def raw_step(params, opt_state, batch, axis_name=None):
        def loss(p):
            return jnp.mean(loss_fn(model.apply({"params": p}, batch["inputs"]), batch["labels"]))
        value, grads = jax.value_and_grad(loss)(params)
        if axis_name is not None:
            grads, value = jax.lax.pmean((grads, value), axis_name)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    variants = {}
    # --- sharded jit -----------------------------------------------------------------------
    hand_jit = jax.jit(raw_step, in_shardings=(rep, rep, split), out_shardings=rep, donate_argnums=(0, 1))
    variants["hand_jit"] = (lambda s, b: hand_jit(*s, b)[:2],
                            jax.device_put(fresh((state0.params, state0.opt_state)), rep), jax.device_put(batch, split))
    core_jit = jax.jit(jnn.make_train_step(loss_fn), in_shardings=(rep, split), out_shardings=rep,
                       donate_argnums=0)
    variants["core_jit"] = (lambda s, b: core_jit(s, b)[0], jax.device_put(fresh(state0), rep), jax.device_put(batch, split))
    dp = parallel.data_parallel(jnn.make_train_step(loss_fn), mesh)
    variants["jnn_jit"] = (lambda s, b: dp(s, b)[0], dp.shard_state(fresh(state0)), dp.shard_batch(batch))
    # --- pmap ------------------------------------------------------------------------------
    pbatch = parallel.pmap_shard_batch(batch)
    hand_pmap = jax.pmap(lambda p, o, b: raw_step(p, o, b, "batch"), axis_name="batch", donate_argnums=(0, 1))
    variants["hand_pmap"] = (lambda s, b: hand_pmap(*s, b)[:2],
                             parallel.pmap_replicate(fresh((state0.params, state0.opt_state))), pbatch)
    core_pmap = jax.pmap(jnn.make_train_step(loss_fn, axis_name="batch"), axis_name="batch", donate_argnums=0)
    variants["core_pmap"] = (lambda s, b: core_pmap(s, b)[0], parallel.pmap_replicate(fresh(state0)), pbatch)
    pm = parallel.pmap_train_step(loss_fn=loss_fn)
    variants["jnn_pmap"] = (lambda s, b: pm(s, b)[0], pm.replicate(fresh(state0)), pbatch)

    states = {name: s for name, (_, s, _) in variants.items()}
    for name, (fn, _, b) in variants.items():  # compile + warm up
        for _ in range(3):
            states[name] = fn(states[name], b)
        jax.block_until_ready(states[name])

    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (fn, _, b) in variants.items():
            s = states[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                s = fn(s, b)
            jax.block_until_ready(s)
            times[name].append((time.perf_counter() - start) / args.steps)
            states[name] = s

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ratios = {
        "jnn_jit / hand_jit": ratio("jnn_jit", "hand_jit"),
        "jnn_jit / core_jit": ratio("jnn_jit", "core_jit"),
        "core_jit / hand_jit": ratio("core_jit", "hand_jit"),
        "jnn_pmap / hand_pmap": ratio("jnn_pmap", "hand_pmap"),
        "jnn_pmap / core_pmap": ratio("jnn_pmap", "core_pmap"),
        "core_pmap / hand_pmap": ratio("core_pmap", "hand_pmap"),
    }
    result = {
        "benchmark": "parallel",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
                    "device_kind": jax.devices()[0].device_kind, "devices": n,
                    "load_average": os.getloadavg()},
        "config": vars(args),
        "median_step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "step_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
        "ratios": ratios,
        "limit": 1.05,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"parallel-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Parallel wrapper overhead ({result['date']})", "",
             f"jax {jax.__version__}, {jax.default_backend()} x {n} devices "
             f"({result['machine']['device_kind']}), {os.cpu_count()} CPU cores, load average "
             f"{result['machine']['load_average'][0]:.1f}; MLP 784-{args.width}-{args.width}-10, Adam, "
             f"global batch {args.batch_size}; median of {args.rounds} interleaved rounds of "
             f"{args.steps} steps.", "",
             "| variant | median step (ms) |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["median_step_ms"].items()]
    lines += ["", "| ratio (median of per-round ratios) | value | limit |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {'1.05' if k.startswith('jnn') and 'hand' in k else ''} |"
              for k, v in ratios.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
