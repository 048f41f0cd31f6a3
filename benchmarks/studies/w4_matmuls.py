"""Why W4 (the compute-bound MLP) cannot be 1.3x faster than PyTorch here: its matrix products.

  python -m benchmarks.studies.w4_matmuls     # ~2 min; --rounds 7

W4's step (1024-2048x4-1024 MLP, batch 1024, Adam) is 15 matrix products: per Dense layer the
forward (B, I) @ (I, O), the input gradient (B, O) @ (O, I) and the kernel gradient (I, B) @ (B, O).
This script times those products alone, float32, in XLA (compiled with `jnn.jit`, as jnn's step is)
and in PyTorch at 1 and 2 threads (`torch.mm`, in its own process: PyTorch in the same process as
JAX slows both), interleaved over rounds, and sums them per step. If PyTorch's products alone take
about what XLA's do, no train step built on XLA's products can be 1.3x faster than PyTorch's: the
rest of the step (Adam, ReLU, softmax) is a few percent of it.

Writes `results/studies/w4_matmuls-<date>.json` and `.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common

BATCH = 1024
WIDTHS = (1024, 2048, 2048, 2048, 2048, 1024)

_TORCH = r"""
import json, sys, time, torch
shapes, threads = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
for a, b in mats:
    torch.mm(a, b)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    n = json.loads(line)["run"]
    start = time.perf_counter()
    for _ in range(n):
        for a, b in mats:
            torch.mm(a, b)
    print(json.dumps({"wall": time.perf_counter() - start}), flush=True)
"""


def step_shapes() -> list[tuple[int, int, int]]:
    """(m, k, n) of every product of one W4 train step: forward, input and kernel gradients."""
    shapes = []
    for i, o in zip(WIDTHS[:-1], WIDTHS[1:]):
        shapes += [(BATCH, i, o), (BATCH, o, i), (i, BATCH, o)]
    return shapes


class _TorchMatmuls:
    def __init__(self, shapes, threads):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, "-c", _TORCH, json.dumps(shapes), str(threads)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def run(self, n):
        self.proc.stdin.write(json.dumps({"run": n}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["wall"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results/studies)")
    args = parser.parse_args(argv)

    import importlib.util

    import jax

    import jnn

    env = common.environment()
    shapes = step_shapes()
    keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
    mats = [(jax.random.normal(keys[2 * j], (m, k)), jax.random.normal(keys[2 * j + 1], (k, n)))
            for j, (m, k, n) in enumerate(shapes)]
    products = jnn.jit(lambda ms: [a @ b for a, b in ms])
    jax.block_until_ready(products(mats))

    def xla(n):
        start = time.perf_counter()
        for _ in range(n):
            out = products(mats)
        jax.block_until_ready(out)
        return time.perf_counter() - start

    runs = {"xla": xla}
    peers = []
    if importlib.util.find_spec("torch") is not None:
        for threads in (1, 2):
            peer = _TorchMatmuls(shapes, threads)
            peers.append(peer)
            runs[f"torch_{threads}t"] = peer.run
    else:
        print("PyTorch not installed: XLA only (pip install -e '.[bench]')")
    wall, _ = common.interleave(runs, rounds=args.rounds, steps=2, warmup=1)
    for peer in peers:
        peer.close()
    flops = sum(2.0 * m * k * n for m, k, n in shapes)
    if len(runs) > 1:
        wall["torch_best"] = [min(wall[k][r] for k in runs if k != "xla") for r in range(args.rounds)]
    body = {"shapes": shapes, "flops_per_step": flops,
            "ms_per_step": {k: common.spread([1e3 * t for t in v]) for k, v in wall.items()},
            "gflops": {k: flops / common.spread(v)["median"] / 1e9 for k, v in wall.items()},
            "ratios": {f"xla / {k}": common.ratio(wall, "xla", k) for k in wall if k != "xla"}}
    common.publish("w4_matmuls", env, args, body, markdown)
    return 0


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"## W4's matrix products alone: XLA (`jnn.jit`) vs PyTorch ({env['date']})", "",
             common.env_line(env), "",
             f"The 15 float32 products of one W4 step ({result['flops_per_step'] / 1e9:.1f} GFLOP), median of "
             f"{result['config']['rounds']} interleaved rounds; `torch_best` is, per round, the faster thread count:",
             "", "| candidate | ms per step's products | GFLOP/s |", "|---|---|---|"]
    for k, v in result["ms_per_step"].items():
        lines.append(f"| {k} | {v['median']:.1f} | {result['gflops'][k]:.1f} |")
    lines += ["", "| ratio | median [min, max] |", "|---|---|"]
    for k, v in result["ratios"].items():
        lines.append(f"| {k} | {v['median']:.3f} [{v['min']:.3f}, {v['max']:.3f}] |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
