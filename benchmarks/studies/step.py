"""Per-step cost of jnn's compiled train step vs what a user would write instead, in one run.

  python -m benchmarks.studies.step                # all workloads, ~4 min on 2 cores
  python -m benchmarks.studies.step --workloads digits_cnn mlp_mnist --rounds 5 --no-save

Candidates, all training the same flax model with Adam(1e-3) on the same synthetic batches:
  jnn              jax.jit(jnn.make_train_step(loss, on_nonfinite="apply"), donate_argnums=0), state from
                   jnn.create_train_state, optimizer jnn.make_optimizer(OptimConfig("adam", 1e-3))
  jnn_plain_adam   the same step with tx=optax.adam(1e-3): no `inject_hyperparams` wrapper
  jnn_bare         jnn_plain_adam with make_train_step(loss, metrics=("loss",)): raw's work
  jnn_skip         `jnn` with on_nonfinite="skip" (the default, fit's too): a NaN/Inf step keeps the state
  raw              hand-written raw JAX + optax: (params, opt_state, batch_stats, rng) tuples
                   (rng only for models with dropout), jax.value_and_grad, optax.adam(1e-3),
                   jit + donate, returns only the loss
  raw_metrics      `raw` that also returns what jnn's step returns: accuracy and grad norm
  flax_trainstate  flax.training.train_state.TrainState + a step as in the flax examples
                   (loss and accuracy)
  jnn_host         `jnn` fed host numpy batches, as a user's loop does (transfer included)
  raw_host         `raw` fed host numpy batches
  torch_eager      PyTorch eager, the same architecture written by hand (digits_cnn, mlp_mnist),
                   torch's default thread count (one per core)
  torch_eager_1thread   the same with torch.set_num_threads(1)
  torch_compile_1thread torch.compile of that module, 1 thread (skipped if torch.compile fails;
                   compiling takes ~50 s per model on 2 busy cores: --no-torch-compile skips it)
Device batches are placed beforehand and rotated (4 of them). Each round runs every candidate for
a block of steps in turn (interleaved, so load changes hit all alike) and waits for the block
with `jax.block_until_ready`; a candidate's time is the median over rounds, and a ratio is the
median of the per-round ratios, reported with its min and max. The process's CPU time per step
(user + system, all threads) is recorded beside the wall time: on a shared machine it is less
inflated by other processes, so its ratios are a second, steadier estimate.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import jnn
from benchmarks import common

# name -> (batch size, number of classes / vocabulary). resnet20 runs at batch 32, not the
# preset's 128: one step at 128 takes ~0.5 s on 2 cores, which would make the run ~15 min.
WORKLOADS = {
    "digits_cnn": (64, 10),
    "mlp_mnist": (128, 10),
    "resnet20": (32, 10),
    "gpt_char_tiny": (32, 65),
}
NUM_BATCHES = 4
LR = 1e-3
loss_fn = optax.softmax_cross_entropy_with_integer_labels


def make_batches(name: str, batch_size: int, num_classes: int, seed: int = 0) -> list[dict]:
    spec = jnn.models.spec(name)
    model = jnn.models.get(name)
    shape = spec.input_shape(model)
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(NUM_BATCHES):
        if spec.input_kind == "tokens":
            x = rng.integers(0, num_classes, (batch_size, *shape)).astype(np.int32)  # (B, T)
            y = rng.integers(0, num_classes, (batch_size, *shape)).astype(np.int32)  # (B, T)
        else:
            x = rng.random((batch_size, *shape), dtype=np.float32)  # (B, H, W, C)
            y = rng.integers(0, num_classes, batch_size).astype(np.int32)  # (B,)
        batches.append({"inputs": x, "labels": y})
    return batches


def copy(tree):
    """Private buffers for one candidate (steps donate their inputs)."""
    return jax.tree.map(jnp.copy, tree)


class JaxCandidate:
    """`run(n)`: n steps of `step(carry, batch) -> (carry, out)`, then wait; returns seconds."""

    def __init__(self, step, carry, batches):
        self.step, self.carry, self.batches, self.i = step, carry, batches, 0
        self.first_call_s = None

    def run(self, n: int) -> float:
        start = time.perf_counter()
        out = None
        for _ in range(n):
            self.carry, out = self.step(self.carry, self.batches[self.i % NUM_BATCHES])
            self.i += 1
        jax.block_until_ready((self.carry, out))
        elapsed = time.perf_counter() - start
        if self.first_call_s is None:
            self.first_call_s = elapsed
        return elapsed


# ------------------------------------------------------------------------------ hand-written JAX


def make_raw_step(model, uses_dropout: bool, with_metrics: bool):
    """The step a user writes by hand with jax + optax: tuples in, tuples out."""
    tx = optax.adam(LR)

    def step(carry, batch):
        params, opt_state, batch_stats, rng = carry  # rng is None for models without dropout
        x, y = batch["inputs"], batch["labels"]
        rngs = {}
        if uses_dropout:
            rng, dropout_rng = jax.random.split(rng)
            rngs = {"dropout": dropout_rng}

        def compute_loss(p):
            if batch_stats:
                logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                              rngs=rngs, mutable=["batch_stats"])
                new_stats = updates["batch_stats"]
            else:
                logits, new_stats = model.apply({"params": p}, x, train=True, rngs=rngs), batch_stats
            return loss_fn(logits, y).mean(), (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        out = loss
        if with_metrics:
            out = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
                   "grad_norm": optax.tree.norm(grads)}
        return (params, opt_state, new_stats, rng), out

    return jax.jit(step, donate_argnums=0), tx


# ------------------------------------------------------------------------------ flax TrainState


class FlaxState(train_state.TrainState):
    """flax's TrainState plus the fields the flax examples add (batch_stats, dropout key)."""

    batch_stats: dict
    key: jax.Array


def make_flax_step(uses_dropout: bool):
    def step(state: FlaxState, batch):
        x, y = batch["inputs"], batch["labels"]
        rngs = {"dropout": jax.random.fold_in(state.key, state.step)} if uses_dropout else {}

        def compute_loss(params):
            if state.batch_stats:
                logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                                 train=True, rngs=rngs, mutable=["batch_stats"])
                return loss_fn(logits, y).mean(), (logits, updates["batch_stats"])
            logits = state.apply_fn({"params": params}, x, train=True, rngs=rngs)
            return loss_fn(logits, y).mean(), (logits, state.batch_stats)

        (loss, (logits, stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=stats)
        return state, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

    return jax.jit(step, donate_argnums=0)


# ------------------------------------------------------------------------------ PyTorch peers


def torch_modules():
    """Hand-written PyTorch twins of digits_cnn and mlp_mnist (same layer sizes), or {}."""
    try:
        import torch
        from torch import nn as tnn
    except ImportError:
        return {}
    return {
        "digits_cnn": lambda: tnn.Sequential(
            tnn.Conv2d(1, 32, 3, padding=1), tnn.ReLU(), tnn.Conv2d(32, 64, 3, padding=1), tnn.ReLU(),
            tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(64 * 4 * 4, 128), tnn.ReLU(), tnn.Dropout(0.25),
            tnn.Linear(128, 10)),
        "mlp_mnist": lambda: tnn.Sequential(
            tnn.Flatten(), tnn.Linear(784, 128), tnn.ReLU(), tnn.Linear(128, 64), tnn.ReLU(),
            tnn.Linear(64, 10)),
        "_torch": torch,
        "_threads": torch.get_num_threads(),
    }


class TorchCandidate:
    def __init__(self, torch, module, batches, compile_: bool, threads: int):
        self.torch, self.threads = torch, threads
        torch.set_num_threads(threads)  # inductor bakes the thread count into its kernels
        self.module = module.train()
        self.net = torch.compile(module) if compile_ else module
        self.opt = torch.optim.Adam(module.parameters(), lr=LR)
        self.loss = torch.nn.CrossEntropyLoss()
        # NHWC -> NCHW, contiguous, made once: only the step is timed.
        self.batches = [(torch.from_numpy(np.ascontiguousarray(b["inputs"].transpose(0, 3, 1, 2))),
                         torch.from_numpy(b["labels"].astype(np.int64))) for b in batches]
        self.i, self.first_call_s = 0, None

    def run(self, n: int) -> float:
        self.torch.set_num_threads(self.threads)
        start = time.perf_counter()
        for _ in range(n):
            x, y = self.batches[self.i % NUM_BATCHES]
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss(self.net(x), y)
            loss.backward()
            self.opt.step()
            self.i += 1
        elapsed = time.perf_counter() - start
        if self.first_call_s is None:
            self.first_call_s = elapsed
        return elapsed


# ------------------------------------------------------------------------------ one workload


def build_candidates(name: str, batch_size: int, num_classes: int, args) -> dict:
    host = make_batches(name, batch_size, num_classes)
    device = [jax.device_put(b) for b in host]
    model = jnn.models.get(name)
    uses_dropout = getattr(model, "dropout_rate", 0.0) > 0
    example = host[0]["inputs"][:1]
    tx = jnn.make_optimizer(jnn.OptimConfig("adam", LR))
    state = jnn.create_train_state(model, tx, example, 0)

    jnn_step = jax.jit(jnn.make_train_step(loss_fn, on_nonfinite="apply"), donate_argnums=0)
    plain_state = jnn.create_train_state(model, optax.adam(LR), example, 0)
    plain_step = jax.jit(jnn.make_train_step(loss_fn, on_nonfinite="apply"), donate_argnums=0)
    bare_step = jax.jit(jnn.make_train_step(loss_fn, metrics=("loss",), on_nonfinite="apply"),
                        donate_argnums=0)  # raw's work
    skip_step = jax.jit(jnn.make_train_step(loss_fn), donate_argnums=0)  # the default (skip), as fit builds it

    raw_step, raw_tx = make_raw_step(model, uses_dropout, with_metrics=False)
    raw_m_step, _ = make_raw_step(model, uses_dropout, with_metrics=True)

    def raw_carry():
        params = copy(state.params)
        return (params, raw_tx.init(params), copy(state.model_state.get("batch_stats", {})),
                jax.random.key(1) if uses_dropout else None)

    flax_state = FlaxState.create(apply_fn=model.apply, params=copy(state.params), tx=optax.adam(LR),
                                  batch_stats=copy(state.model_state.get("batch_stats", {})),
                                  key=jax.random.key(1))
    cands = {
        "jnn": JaxCandidate(jnn_step, copy(state), device),
        "jnn_plain_adam": JaxCandidate(plain_step, plain_state, device),
        "jnn_bare": JaxCandidate(bare_step, copy(plain_state), device),
        "jnn_skip": JaxCandidate(skip_step, copy(state), device),
        "raw": JaxCandidate(raw_step, raw_carry(), device),
        "raw_metrics": JaxCandidate(raw_m_step, raw_carry(), device),
        "flax_trainstate": JaxCandidate(make_flax_step(uses_dropout), flax_state, device),
        "jnn_host": JaxCandidate(jnn_step, copy(state), host),
        "raw_host": JaxCandidate(raw_step, raw_carry(), host),
    }
    peers = torch_modules() if not args.no_torch else {}
    if name in peers:
        torch = peers["_torch"]
        torch.manual_seed(0)
        threads = peers["_threads"]
        cands["torch_eager"] = TorchCandidate(torch, peers[name](), host, compile_=False, threads=threads)
        # On a busy machine torch's OpenMP threads spin-wait on each other: one thread is often
        # much faster than the default (one per core), so both are measured.
        cands["torch_eager_1thread"] = TorchCandidate(torch, peers[name](), host, compile_=False, threads=1)
        if not args.no_torch_compile:
            t0 = time.perf_counter()
            cand = TorchCandidate(torch, peers[name](), host, compile_=True, threads=1)
            try:
                cand.run(2)  # compiles forward and backward; fails here if inductor cannot build
                cands["torch_compile_1thread"] = cand
                print(f"  torch.compile: {time.perf_counter() - t0:.1f} s to compile", flush=True)
            except Exception as err:  # noqa: BLE001 - any compile failure means "skip the column"
                print(f"  torch.compile skipped: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return cands


def bench_workload(name: str, args) -> dict:
    batch_size, num_classes = WORKLOADS[name]
    print(f"{name}: batch {batch_size}", flush=True)
    t0 = time.perf_counter()
    cands = build_candidates(name, batch_size, num_classes, args)
    for cand in cands.values():  # compile (first call) and warm up
        cand.run(1)
        cand.run(2)
    first_call = {k: c.first_call_s for k, c in cands.items()}
    steps = {}
    for k, cand in cands.items():  # blocks of about --block-seconds for every candidate
        probe = min(cand.run(2) / 2 for _ in range(2))
        steps[k] = max(3, min(500, round(args.block_seconds / probe)))
    print(f"  set-up + compile {time.perf_counter() - t0:.1f} s; steps per block {steps}", flush=True)
    wall, cpu = common.interleave({k: c.run for k, c in cands.items()}, args.rounds, steps, warmup=1)
    pairs = [("jnn_bare", "raw"), ("jnn", "raw"), ("jnn_skip", "jnn"), ("jnn", "raw_metrics"), ("raw_metrics", "raw"), ("jnn_plain_adam", "raw_metrics"),
             ("jnn", "jnn_plain_adam"), ("flax_trainstate", "raw"), ("jnn", "flax_trainstate"),
             ("jnn_host", "raw_host"), ("jnn_host", "jnn"), ("jnn", "torch_eager"),
             ("jnn", "torch_eager_1thread"), ("jnn", "torch_compile_1thread"), ("raw", "torch_eager_1thread")]
    ratios = {f"{a} / {b}": {"wall": common.ratio(wall, a, b), "cpu": common.ratio(cpu, a, b)}
              for a, b in pairs if a in wall and b in wall}
    for k in cands:
        s, c = common.spread(wall[k]), common.spread(cpu[k])
        print(f"  {k:22s} {1e3 * s['median']:9.3f} ms  (IQR {1e3 * s['q1']:.3f}-{1e3 * s['q3']:.3f})  "
              f"cpu {1e3 * c['median']:9.3f} ms  {batch_size / s['median']:>10,.0f} ex/s  "
              f"first call {first_call[k]:.2f} s", flush=True)
    for k, r in ratios.items():
        w, c = r["wall"], r["cpu"]
        print(f"  {k:36s} wall {w['median']:.3f} [{w['min']:.3f}, {w['max']:.3f}]   "
              f"cpu {c['median']:.3f} [{c['min']:.3f}, {c['max']:.3f}]", flush=True)

    def ms(tree):
        return {k: (1e3 * x if k != "n" else x) for k, x in tree.items()}

    return {
        "batch_size": batch_size,
        "steps_per_block": steps,
        "rounds": args.rounds,
        "wall_ms": {k: ms(common.spread(v)) for k, v in wall.items()},
        "cpu_ms": {k: ms(common.spread(v)) for k, v in cpu.items()},
        "examples_per_s": {k: batch_size / statistics.median(v) for k, v in wall.items()},
        "first_call_s": first_call,
        "ratios": ratios,
        "per_round_wall_ms": {k: [1e3 * t for t in v] for k, v in wall.items()},
        "per_round_cpu_ms": {k: [1e3 * t for t in v] for k, v in cpu.items()},
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Train-step cost: jnn vs raw JAX, flax TrainState and PyTorch ({env['date'][:10]})", "",
             common.env_line(env), "",
             f"Median of {result['config']['rounds']} interleaved rounds per workload; the spread is the "
             "interquartile range of the rounds; a ratio is the median of the per-round ratios "
             "[min, max]. Synthetic batches of the real shapes, already on the device (except *_host). "
             "Adam(1e-3) everywhere.", ""]
    for name, w in result["workloads"].items():
        lines += [f"## {name}, batch {w['batch_size']}", "",
                  "| candidate | wall ms/step (median) | wall IQR | CPU ms/step (median) | examples/s | "
                  "first call (compile) s | steps/block |", "|---|---|---|---|---|---|---|"]
        for k, s in w["wall_ms"].items():
            lines.append(f"| {k} | {s['median']:.3f} | {s['q1']:.3f}-{s['q3']:.3f} | "
                         f"{w['cpu_ms'][k]['median']:.3f} | {w['examples_per_s'][k]:,.0f} | "
                         f"{w['first_call_s'][k]:.2f} | {w['steps_per_block'][k]} |")
        lines += ["", "| ratio | wall: median [min, max] | CPU time: median [min, max] |", "|---|---|---|"]
        for k, r in w["ratios"].items():
            a, c = r["wall"], r["cpu"]
            lines.append(f"| {k} | {a['median']:.3f} [{a['min']:.3f}, {a['max']:.3f}] | "
                         f"{c['median']:.3f} [{c['min']:.3f}, {c['max']:.3f}] |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--block-seconds", type=float, default=0.25, help="target time of one block of steps")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-torch-compile", action="store_true")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/studies)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    env = common.environment()
    peers = torch_modules()
    if "_torch" in peers:
        env["torch_threads"] = peers["_torch"].get_num_threads()
    else:
        print("torch not importable: skipping the PyTorch columns")
    env["jax_backend"] = jax.default_backend()
    print(common.env_line(env), flush=True)
    start = time.perf_counter()
    workloads = {name: bench_workload(name, args) for name in args.workloads}
    common.publish("step", env, args, {"seconds": time.perf_counter() - start, "workloads": workloads}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
