"""Where a CPU workload's train step spends its time, jnn's step beside PyTorch eager's, by kind of op.

  python -m benchmarks.studies.cpu_profile [--workload W5] [--steps 3] [--threads 2]

The harness says W5 (CIFAR ResNet-20, batch 128) runs at 1.28x PyTorch eager's step time on a
2-core CPU; this says where. Both steps are built as the harness builds them (jnn's candidate:
`jnn.jit(jnn.make_train_step(...))` with Adam; the PyTorch twin from `benchmarks/torch_peer.py`,
in its own process, at `--threads`). Each is warmed up, then `--steps` steps are traced:

  jnn      a `jax.profiler` trace; every XLA:CPU op event is matched to its instruction in the
           compiled program, and grouped by what it does: convolutions of the forward pass, of the
           input gradient and of the kernel gradient (told apart by the instruction's
           `op_name` metadata and operands), layout transposes and copies, elementwise fusions
           (forward and backward), reductions, the optimizer.
  PyTorch  `torch.profiler` self CPU time per aten op, grouped the same way.

Writes results/studies/cpu_profile-<workload>-<date>.json and .md.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

# PyTorch aten ops -> kind (first match on the lower-cased name wins).
TORCH_KINDS = (
    ("convolution: kernel gradient", ("convolution_backward_weight",)),
    ("convolution: backward (input + kernel gradients)", ("convolution_backward",)),
    ("convolution: forward", ("convolution", "conv2d", "mkldnn_conv")),
    ("batch norm", ("batch_norm",)),
    ("optimizer (Adam)", ("_foreach", "adam", "addcdiv", "addcmul", "lerp")),
    ("matmul", ("addmm", "mm", "linear", "matmul")),
    ("layout transposes / copies", ("copy_", "contiguous", "clone", "to_dense", "reorder", "permute")),
    ("elementwise", ("relu", "threshold", "add", "mul", "div", "sub", "fill", "zero", "sqrt", "where", "pad",
                     "cat", "constant_pad", "neg", "exp", "log", "clamp")),
    ("reductions / loss", ("sum", "mean", "softmax", "nll", "cross_entropy", "argmax", "eq", "max")),
)


def torch_kind(name: str) -> str:
    return common.kind_of(name, TORCH_KINDS)


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """Instruction name -> {"opcode", "op_name", "operands"} of a compiled HLO module's text (every
    computation: fused computations' instructions too)."""
    out = {}
    pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*?\b([a-z][a-z\-]*)\((.*?)\)(?:, |$)(.*)$")
    for line in hlo_text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        name, opcode, operands, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        out[name] = {"opcode": opcode, "op_name": op_name.group(1) if op_name else "", "operands": operands,
                     "line": line.strip()}
    return out


def jax_kind(instruction: dict | None, name: str) -> str:
    """What an XLA:CPU op does, from its instruction (or its event name when not found)."""
    if instruction is None:
        low = name.lower()
        return ("convolution: other" if "convolution" in low else
                "layout transposes / copies" if ("transpose" in low or "copy" in low) else "other")
    opcode, op_name, line = instruction["opcode"], instruction["op_name"], instruction["line"]
    backward = "transpose(" in op_name
    in_model = "jvp(" in op_name  # the model's forward (jvp) and backward (transpose(jvp)) passes
    if opcode == "convolution" or "conv_general_dilated" in op_name:
        if not backward:
            return "convolution: forward"
        # The kernel gradient's result is a kernel (H, W, I, O: small equal spatial sizes first); the
        # input gradient's is an image batch.
        shape = re.search(r"= \w+\[(\d+),(\d+),\d+,\d+\]", line)
        if shape and shape.group(1) == shape.group(2) and int(shape.group(1)) <= 7:
            return "convolution: kernel gradient"
        return "convolution: input gradient"
    if "dot_general" in op_name or opcode == "dot":
        return "matmul"
    if opcode in ("transpose", "copy") or name.startswith(("transpose", "copy")):
        return "layout transposes / copies"
    if not in_model:
        return "optimizer, loss and metrics (outside the model)"
    if opcode in ("reduce", "reduce-window") or "reduce" in name:
        return "reductions (BatchNorm statistics, pooling)" + (" backward" if backward else "")
    if opcode == "fusion" or "fusion" in name:
        return "elementwise fusions" + (" (backward)" if backward else " (forward)")
    return "other"


def jnn_profile(workload: str, steps: int) -> dict:
    import jax

    from benchmarks import harness, workloads as wl

    w = wl.cpu_workloads()[workload]
    cand = harness.build_jax_candidates(w, ["jnn"], False)["jnn"]
    cand.first_step()
    cand.run(2)
    wall = cand.run(steps) / steps
    instructions = hlo_instructions(cand.step.lower(cand.carry, cand.batches[0]).compile().as_text())
    with tempfile.TemporaryDirectory(prefix="jnn-cpu-profile-") as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            cand.run(steps)
        (trace,) = Path(tmp).rglob("perfetto_trace.json.gz")
        with gzip.open(trace, "rt") as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e["name"]
        if name not in instructions:  # python frames, thunk executors, the module: not XLA ops
            continue
        ms = float(e["dur"]) / 1e3 / steps
        by_kind[jax_kind(instructions[name], name)] += ms
        by_op[name] += ms
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:25]
    return {"wall_ms": 1e3 * wall, "ops_ms": sum(by_kind.values()),
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_ops_ms": {k: {"ms": v, "kind": jax_kind(instructions[k], k), "op_name": instructions[k]["op_name"][-120:]}
                           for k, v in top}}


TORCH_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from benchmarks.torch_peer import Peer
import torch
spec, steps = json.loads(sys.argv[1]), int(sys.argv[3])
peer = Peer(spec)
peer.run(3)
wall = peer.run(steps)["wall"] / steps
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    peer.run(steps)
ops = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
print(json.dumps({"wall_ms": 1e3 * wall, "threads": torch.get_num_threads(), "torch": torch.__version__, "ops_ms": ops}))
"""


def torch_profile(workload: str, steps: int, threads: int) -> dict:
    import os

    from benchmarks import harness, workloads as wl

    w = wl.cpu_workloads()[workload]
    spec = harness.torch_spec(w, False, threads, "cpu")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", TORCH_CHILD, json.dumps(spec), str(root), str(steps)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, ms in r["ops_ms"].items():
        by_kind[torch_kind(name)] += ms
    top = sorted(r["ops_ms"].items(), key=lambda kv: -kv[1])[:25]
    return {"wall_ms": r["wall_ms"], "threads": r["threads"], "torch": r["torch"], "ops_ms": sum(by_kind.values()),
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_ops_ms": {k: {"ms": v, "kind": torch_kind(k)} for k, v in top}}


def markdown(result: dict) -> str:
    env, w = result["environment"], result["workload"]
    j, t = result["jnn"], result.get("torch")
    lines = [f"# Where {w}'s train step goes on this CPU: jnn vs PyTorch eager ({env['date'][:10]})", "",
             common.env_line(env), "",
             f"Step wall time, {result['steps']} traced steps after warm-up: jnn {j['wall_ms']:.1f} ms"
             + (f", PyTorch eager ({t['threads']} threads) {t['wall_ms']:.1f} ms: ratio "
                f"{j['wall_ms'] / t['wall_ms']:.2f}" if t else "") + ". The op times below are summed "
             "over threads (XLA:CPU runs some ops in parallel, PyTorch's ops use intra-op threads), so "
             "their total can differ from the wall time.", "",
             "| kind | jnn ms/step | PyTorch ms/step |", "|---|---|---|"]
    kinds = list(dict.fromkeys(list(j["by_kind_ms"]) + (list(t["by_kind_ms"]) if t else [])))
    for k in kinds:
        a, b = j["by_kind_ms"].get(k), (t["by_kind_ms"].get(k) if t else None)
        lines.append(f"| {k} | {'' if a is None else f'{a:.1f}'} | {'' if b is None else f'{b:.1f}'} |")
    lines.append(f"| total of the ops | {j['ops_ms']:.1f} | {t['ops_ms']:.1f} |" if t else
                 f"| total of the ops | {j['ops_ms']:.1f} | |")
    lines += ["", "jnn's 25 slowest ops:", "", "| op | kind | ms/step | op_name (end) |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['kind']} | {v['ms']:.1f} | `{v['op_name']}` |" for k, v in j["top_ops_ms"].items()]
    if t:
        lines += ["", "PyTorch's 25 slowest ops (self CPU time):", "", "| op | kind | ms/step |", "|---|---|---|"]
        lines += [f"| {k} | {v['kind']} | {v['ms']:.1f} |" for k, v in t["top_ops_ms"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.cpu_profile", description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="W5")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="PyTorch's intra-op threads")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--single-thread", action="store_true",
                   help="XLA without Eigen's thread pool and PyTorch at 1 thread: every op runs to completion "
                        "inside its own trace event (multi-threaded, XLA:CPU's convolutions finish in Eigen's "
                        "pool after their event ends, so the trace under-counts them)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/studies)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.single_thread:  # before JAX starts
        import os

        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        args.threads = 1
    env = common.environment(("jax", "jaxlib", "flax", "optax", "numpy", "torch"))
    start = time.perf_counter()
    result = {"benchmark": f"cpu_profile-{args.workload}" + ("-1thread" if args.single_thread else ""),
              "workload": args.workload, "steps": args.steps, "single_thread": args.single_thread,
              "environment": env, "jnn": jnn_profile(args.workload, args.steps)}
    if not args.no_torch and common.version("torch"):
        result["torch"] = torch_profile(args.workload, args.steps, args.threads)
    common.finish(env)
    md = markdown(result)
    print(md, flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")
    if not args.no_save:
        print(f"wrote {common.write_results(result['benchmark'], result, md, args.out or common.STUDY_RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
