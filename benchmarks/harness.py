"""One workload of `python -m benchmarks`, measured in its own process: jnn's step and its peers.

  python -m benchmarks.harness W3 --out w3.json --rounds 9       # what the CLI runs per workload

Each workload runs in a fresh process, so its peak memory (max RSS) is its own and one workload's
compiled programs and allocator state do not slow the next. Steps:

1. Build the candidates on the same synthetic batches: `jnn` (`jnn.jit(jnn.make_train_step(loss,
   metrics=("loss", "accuracy")))` on `jnn.create_train_state`), `jnn_jax_jit` (the same step under
   plain `jax.jit`, as a user compiles it), `jnn_default` (jnn's default
   metrics and `jnn.make_optimizer`, full mode), `raw` and `flax` (`benchmarks/workloads.py`),
   and each PyTorch peer in its own process (`benchmarks/torch_peer.py`, eager and `torch.compile`).
2. Run every candidate's first step on the same batch: its wall time is the time to first step
   (trace + compile + run), reported apart from the step time. The JAX candidates start from the
   same parameters, so their losses must agree (`loss_check.check_same_loss`): a peer that trains
   another model fails the run here, before anything is timed.
3. Warm up, size each candidate's block of steps to about `--block-seconds`, then interleave the
   blocks over `--rounds` rounds (`common.interleave`, order reversed every other round), waiting
   for the results (`jax.block_until_ready`, `torch.cuda.synchronize`) before every clock read.
4. Report per candidate the median step time, steps/s, examples/s or tokens/s, CPU time per step,
   FLOP/s from XLA's cost analysis of the compiled step, and memory; per pair the per-round ratios.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.loss_check import LossMismatchError, check_same_loss

JAX_PEERS = ("jnn", "jnn_jax_jit", "jnn_default", "raw", "flax")
# PyTorch eager at one thread per core (its default) and at 1 thread: on a busy machine its OpenMP
# threads wait on each other and one thread is often faster, so both are run and `torch_eager_best`
# is, round by round, the faster of the two.
TORCH_PEERS = ("torch_eager", "torch_eager_1t", "torch_compile")
PAIRS = (("jnn", "raw"), ("jnn", "flax"), ("flax", "raw"), ("jnn_default", "jnn"), ("jnn", "torch_eager_best"),
         ("jnn_jax_jit", "torch_eager_best"), ("jnn_jax_jit", "jnn"),
         ("jnn", "torch_eager"), ("jnn", "torch_eager_1t"), ("jnn", "torch_compile"), ("raw", "torch_eager_best"),
         ("torch_compile", "torch_eager"))
TORCH_PEER_SCRIPT = Path(__file__).resolve().parent / "torch_peer.py"


# ------------------------------------------------------------------------------ candidates


class JaxCandidate:
    """`step(carry, batch) -> (carry, metrics)`, jitted with the carry donated."""

    def __init__(self, step, carry, batches):
        self.step, self.carry, self.batches, self.i = step, carry, batches, 0
        self.first_step_s = None

    def first_step(self) -> float:
        """Runs one step on batch 0 (compiling it) and returns its loss; records the wall time."""
        import jax

        start = time.perf_counter()
        self.carry, out = self.step(self.carry, self.batches[0])
        jax.block_until_ready((self.carry, out))
        self.first_step_s = time.perf_counter() - start
        self.i = 1
        return float(out["loss"])

    def run(self, n: int) -> float:
        import jax

        start = time.perf_counter()
        out = None
        for _ in range(n):
            self.carry, out = self.step(self.carry, self.batches[self.i % len(self.batches)])
            self.i += 1
        jax.block_until_ready((self.carry, out))
        return time.perf_counter() - start

    def compiled_stats(self) -> dict:
        """FLOPs per step (XLA's cost analysis) and the compiled program's memory, from the cache."""
        compiled = self.step.lower(self.carry, self.batches[0]).compile()  # cached: the step already ran
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of dicts before jax 0.4.30
        out = {"flops": float(cost.get("flops", 0.0)) if cost else None}
        mem = compiled.memory_analysis()
        if mem is not None:
            out["temp_mb"] = mem.temp_size_in_bytes / 2**20
            out["argument_mb"] = mem.argument_size_in_bytes / 2**20
        return out


class TorchCandidate:
    """A PyTorch peer in its own process (`torch_peer.py`), driven one block at a time."""

    def __init__(self, spec: dict):
        self.spec = spec
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        # A fresh inductor cache: torch.compile's first step is a cold compile, as JAX's is.
        self._cache = tempfile.TemporaryDirectory(prefix="jnn-bench-inductor-")
        env["TORCHINDUCTOR_CACHE_DIR"] = self._cache.name
        start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(TORCH_PEER_SCRIPT), json.dumps(spec)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()
        # Process start + `import torch` + model + the first step (which compiles under torch.compile).
        self.start_s = time.perf_counter() - start
        self.first_step_s = self.info.get("first_step_s")
        if "error" in self.info:
            self.proc.wait()
            self._cache.cleanup()

    @property
    def ok(self) -> bool:
        return "error" not in self.info

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"error": f"exited with code {self.proc.wait()}"}

    def _send(self, obj) -> dict:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, n: int) -> tuple[float, float]:
        out = self._send({"run": n})
        return out["wall"], out["cpu"]

    def close(self) -> dict:
        out = self._send({"exit": True}) if self.ok else {}
        self.proc.wait()
        self._cache.cleanup()
        return out


def torch_installed() -> bool:
    """Whether PyTorch can be imported (checked without importing it into this JAX process)."""
    return importlib.util.find_spec("torch") is not None


def build_jax_candidates(w, peers, full: bool) -> dict:
    """name -> JaxCandidate for the JAX peers of workload `w`, all from jnn's initial parameters."""
    import jax
    import optax

    import jnn
    from benchmarks import workloads as wl

    host = wl.make_batches(w)
    device = [jax.device_put(b) for b in host]
    model, example = w.model(), host[0]["inputs"][:1]
    tx = optax.adam(wl.LR)
    state = jnn.create_train_state(model, tx, example, 0, precision=w.precision)
    # jnn compiles its steps with `jnn.jit` (jax.jit plus the XLA options in jnn/compiler.py), as
    # fit and `jnn train` do; the raw and flax peers use plain jax.jit, as their users write it.
    bare = jnn.make_train_step(wl.loss_fn, metrics=("loss", "accuracy"), on_nonfinite="apply")
    cands = {"jnn": JaxCandidate(jnn.jit(bare, donate_argnums=0), wl.copy(state), device)}
    for name in w.jnn_losses:  # the same step with another of jnn's losses (e.g. G1's fused cross-entropy)
        step = jnn.make_train_step(name, metrics=("loss", "accuracy"), on_nonfinite="apply")
        cands[f"jnn_{name}"] = JaxCandidate(jnn.jit(step, donate_argnums=0), wl.copy(state), device)
    if "jnn_jax_jit" in peers:  # the same step as a user compiles it (jnn's XLA option: `import jnn`'s default)
        cands["jnn_jax_jit"] = JaxCandidate(jax.jit(bare, donate_argnums=0), wl.copy(state), device)
    if full and "jnn_default" in peers:  # jnn's defaults: inject_hyperparams optimizer, every metric
        default = state.replace(tx=jnn.make_optimizer(jnn.OptimConfig("adam", wl.LR)))
        default = default.replace(opt_state=default.tx.init(default.params))
        cands["jnn_default"] = JaxCandidate(jnn.jit(jnn.make_train_step(wl.loss_fn), donate_argnums=0),
                                            wl.copy(default), device)
    if w.precision is None:  # the hand-written peers compute in float32 only
        stats = state.model_state.get("batch_stats", {})
        if "raw" in peers:
            params = wl.copy(state.params)
            cands["raw"] = JaxCandidate(wl.make_raw_step(model, tx), (params, tx.init(params), wl.copy(stats)), device)
        if "flax" in peers:
            flax_state = wl.FlaxState.create(apply_fn=model.apply, params=wl.copy(state.params), tx=tx,
                                             batch_stats=wl.copy(stats))
            cands["flax"] = JaxCandidate(wl.make_flax_step(), flax_state, device)
    return cands


def torch_spec(w, compile_: bool, threads: int, device: str) -> dict:
    return {"model": w.torch_model, "kwargs": w.torch_kwargs, "batch_size": w.batch_size,
            "input_shape": list(w.input_shape), "num_classes": w.num_classes, "tokens": w.tokens,
            "threads": threads, "compile": compile_, "amp": w.torch_amp, "channels_last": w.channels_last,
            "device": device, "lr": 1e-3}


def compile_times(cands: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of `rounds` cold compiles (trace + lower + compile) of each JAX candidate's step.

    The candidates alternate (A B C, C B A, ...) and every compile starts from empty caches
    (`jax.clear_caches()`), so none profits from a compile that ran before it; a single
    first-step time is at the mercy of the load of the moment.
    """
    import jax

    names = [k for k, c in cands.items() if isinstance(c, JaxCandidate)]
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            jax.clear_caches()
            start = time.perf_counter()
            cands[k].step.lower(cands[k].carry, cands[k].batches[0]).compile()
            times[k].append(time.perf_counter() - start)
    jax.clear_caches()
    return times


def first_steps(cands: dict) -> dict:
    """Runs every JAX candidate's first step (compiling it); checks that their losses agree."""
    losses = {k: c.first_step() for k, c in cands.items() if isinstance(c, JaxCandidate)}
    print("  first-step losses: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()), flush=True)
    check_same_loss(losses, reference="jnn")
    return losses


def start_torch_peers(w, args, backend: str, skipped: list[str]) -> dict:
    """name -> TorchCandidate for the PyTorch peers asked for (a line in `skipped` for each missing one)."""
    wanted = [p for p in TORCH_PEERS if p in args.peers]
    if not (w.torch_model and wanted):
        return {}
    if not torch_installed():
        skipped.append(f"{w.name}: PyTorch not installed: its peers are skipped (pip install torch==2.13.0)")
        return {}
    peers = {}
    for name in wanted:
        one_thread = name.endswith("_1t")
        if one_thread and (args.torch_threads == 1 or backend != "cpu"):  # the same as torch_eager
            continue
        spec = torch_spec(w, name == "torch_compile", 1 if one_thread else args.torch_threads,
                          "cuda" if backend == "gpu" else "cpu")
        cand = TorchCandidate(spec)
        if cand.ok:
            peers[name] = cand
        else:
            skipped.append(f"{w.name}: {name} skipped: {cand.info['error']}")
    return peers


def size_blocks(cands: dict, block_seconds: float) -> tuple[dict, dict]:
    """Runs a warm-up step of each candidate, which also sizes its block to about `block_seconds`.

    Returns (steps per block, seconds per step) by candidate.
    """
    def wall(out):
        return out[0] if isinstance(out, tuple) else out

    steps, per_step = {}, {}
    for k, c in cands.items():
        per_step[k] = wall(c.run(1))
        if per_step[k] < block_seconds / 4:  # a quick step: size the block on a few more
            per_step[k] = wall(c.run(4)) / 4
        steps[k] = max(1, min(500, round(block_seconds / max(per_step[k], 1e-9))))
    return steps, per_step


def candidate_row(w, wall: list[float], cpu: list[float], flops: float | None) -> dict:
    """One candidate's line of the results: step time, throughput, FLOP/s."""
    s = common.spread(wall)
    return {
        "wall_ms": {q: (1e3 * x if q != "n" else x) for q, x in s.items()},
        "cpu_ms": 1e3 * common.spread(cpu)["median"],
        "steps_per_s": 1 / s["median"],
        "items_per_s": w.items_per_step / s["median"],
        "flops_per_step": flops,
        "flops_per_s": flops / s["median"] if flops else None,
        "model_flops_per_s": w.model_flops / s["median"] if w.model_flops else None,
    }


def measure(w, args, skipped: list[str]) -> dict:
    """Builds, checks and times every candidate of workload `w`; returns its result record."""
    import jax

    print(f"{w.name}: {w.title}, batch {w.batch_size}", flush=True)
    t0 = time.perf_counter()
    cands = build_jax_candidates(w, args.peers, args.full)
    compiles = compile_times(cands, args.compile_rounds)
    losses = first_steps(cands)  # compiles; fails here if a peer computes another loss
    stats = {k: c.compiled_stats() for k, c in cands.items()}
    torch_peers = start_torch_peers(w, args, jax.default_backend(), skipped)
    cands.update(torch_peers)
    for line in skipped:
        print("  " + line, flush=True)
    steps, per_step = size_blocks(cands, args.block_seconds)
    print(f"  set-up + compile {time.perf_counter() - t0:.1f} s; steps per block {steps}", flush=True)
    # A warm-up round where the blocks are short; a slow step is warm after one step.
    warmup = 1 if max(per_step.values()) < args.block_seconds else 0
    wall, cpu = common.interleave({k: c.run for k, c in cands.items()}, args.rounds, steps, warmup=warmup)
    eager = [k for k in ("torch_eager", "torch_eager_1t") if k in wall]
    if eager:  # round by round, the faster thread count
        best = [min(eager, key=lambda k: wall[k][i]) for i in range(args.rounds)]
        wall["torch_eager_best"] = [wall[k][i] for i, k in enumerate(best)]
        cpu["torch_eager_best"] = [cpu[k][i] for i, k in enumerate(best)]
    rows = {}
    for k, c in cands.items():
        # PyTorch rows use jnn's FLOP count: the same model, the same math.
        rows[k] = {**candidate_row(w, wall[k], cpu[k], stats.get(k, stats["jnn"])["flops"]),
                   "first_step_s": c.first_step_s, "steps_per_block": steps[k]}
        if k in stats:
            rows[k].update({"xla_" + q: v for q, v in stats[k].items() if q != "flops"})
        else:
            rows[k].update(c.close(), threads=c.info.get("threads"), process_start_s=c.start_s)
    ratios = {f"{a} / {b}": {"wall": common.ratio(wall, a, b), "cpu": common.ratio(cpu, a, b)}
              for a, b in PAIRS if a in wall and b in wall}
    for k, r in rows.items():
        print(f"  {k:14s} {r['wall_ms']['median']:9.3f} ms  cpu {r['cpu_ms']:9.3f} ms  "
              f"{r['items_per_s']:>12,.0f} {w.unit}/s  first step {r['first_step_s']:.2f} s", flush=True)
    for k, r in ratios.items():
        print(f"  {k:28s} wall {r['wall']['median']:.3f} [{r['wall']['min']:.3f}, {r['wall']['max']:.3f}]  "
              f"cpu {r['cpu']['median']:.3f}", flush=True)
    first = {k: c.first_step_s for k, c in cands.items()}
    return {
        "kind": "step", "title": w.title, "batch_size": w.batch_size, "unit": w.unit,
        "items_per_step": w.items_per_step, "precision": w.precision, "rounds": args.rounds,
        "first_step_losses": losses, "candidates": rows, "ratios": ratios,
        "compile_ratio": {f"{a} / raw": first[a] / first["raw"] for a in ("jnn", "flax")
                          if a in first and "raw" in first},
        "compile_s": {k: common.spread(v) for k, v in compiles.items() if v},
        "compile_rounds_ratio": {f"{a} / raw": common.ratio(compiles, a, "raw") for a in ("jnn", "flax")
                                 if compiles.get(a) and compiles.get("raw")},
        "torch": {k: {q: v for q, v in c.info.items() if q != "ready"} for k, c in torch_peers.items()},
        "per_round_wall_ms": {k: [1e3 * t for t in v] for k, v in wall.items()},
        "seconds": time.perf_counter() - t0,
    }


def matmul_peak(n: int | None = None, dtype: str = "float32", repeats: int = 5) -> dict:
    """FLOP/s of one large (n, n) @ (n, n) matmul in `dtype`: the machine's practical peak."""
    import jax

    backend = jax.default_backend()
    n = n or (8192 if backend != "cpu" else 2048)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    inner = 1 if backend == "cpu" else 20
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(inner):
            out = f(a)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / inner)
    return {"n": n, "dtype": dtype, "seconds": best, "flops_per_s": 2 * n ** 3 / best}


# ------------------------------------------------------------------------------ worker entry point


def load_workload(name: str, suite: str, tiny: bool):
    if suite == "gpu":
        from benchmarks import gpu

        return gpu.workloads(tiny)[name]
    from benchmarks import workloads

    return workloads.cpu_workloads()[name]


def run(args) -> dict:
    """The work of one worker process, as a JSON-ready dict."""
    import jax

    backend = jax.default_backend()
    # The machine's practical peak, measured in this process just before the workload.
    dtypes = ["float32"] + (["bfloat16"] if backend != "cpu" else [])
    info = {"backend": backend, "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "matmul": {d: matmul_peak(512 if args.tiny else None, d) for d in dtypes}}
    skipped: list[str] = []
    if args.workload == "W2":
        from benchmarks import digits_tta

        result = digits_tta.measure(args, skipped)
    else:
        result = measure(load_workload(args.workload, args.suite, args.tiny), args, skipped)
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    return {**info, **result, "skipped": skipped,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device_peak_mb": stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", help="W1, W3-W7 (cpu), W2 (digits time to accuracy), G1-G2 (gpu)")
    p.add_argument("--suite", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--tiny", action="store_true", help="the gpu suite's tiny sizes (a CPU smoke test)")
    p.add_argument("--full", action="store_true", help="also jnn_default (jnn's default metrics and optimizer)")
    p.add_argument("--peers", nargs="+", default=list(JAX_PEERS + TORCH_PEERS))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--compile-rounds", type=int, default=0, help="cold compiles per JAX candidate, interleaved")
    p.add_argument("--block-seconds", type=float, default=0.25)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--seeds", type=int, default=10, help="W2: seeds")
    p.add_argument("--max-steps", type=int, default=1000, help="W2: steps before giving up on a seed")
    p.add_argument("--out", required=True, help="JSON file to write")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jnn  # noqa: F401 - first, as a user's script imports it: its XLA option becomes the process default
    try:
        result = run(args)
    except LossMismatchError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
