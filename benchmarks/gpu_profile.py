"""Where the GPU suite's jnn step spends its device time: `python -m benchmarks.gpu_profile G1 G2 --out DIR`.

For each workload: builds jnn's candidate exactly as the harness does, warms it up, lists the
library calls in the compiled program (cuBLAS / cuDNN custom calls: is attention cuDNN's fused
kernel?), traces a few steps with `jax.profiler` (a perfetto trace) and sums the device time per
kernel and per kind of kernel (matrix products, attention, convolutions, fused elementwise, copies).
Writes DIR/profile-gpu-<date>.json and prints a table. `--tiny` runs the G workloads' toy sizes
(on a CPU the trace holds host events only: it checks the code paths).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

KINDS = (  # first match wins; matched against the lower-cased kernel name
    ("attention", ("fmha", "flash", "sdpa", "attn", "dot_do_o", "dq_to_16bits")),
    ("convolution", ("fprop", "dgrad", "wgrad", "implicit_gemm", "implicitgemm", "convolution")),
    ("matmul (Triton gemm fusion)", ("gemm_fusion", "triton_gemm")),
    ("matmul (cuBLAS / CUTLASS)", ("gemm", "nvjet", "cutlass", "xmma", "matmul")),
    ("copy / transpose", ("memcpy", "memset", "copy", "transpose")),
    ("reduction", ("reduce", "reduction", "scatter")),
    ("fused elementwise", ("fusion", "convert", "loop_", "input_", "kernel")),
)


def kind_of(name: str) -> str:
    from benchmarks import common

    return common.kind_of(name, KINDS)


def device_times(trace_path: Path) -> tuple[dict[str, float], str]:
    """Microseconds by event name on the device's stream tracks of a perfetto trace (the kernels; not the
    "XLA Ops" / "XLA Modules" summary tracks, which would count them twice). On a CPU: the host tracks."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    meta = [e for e in events if e.get("ph") == "M"]
    processes = {e["pid"]: e.get("args", {}).get("name", "") for e in meta if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in meta
               if e.get("name") == "thread_name"}
    gpu = {pid for pid, n in processes.items() if "gpu" in n.lower()}
    streams = {k for k, n in threads.items() if k[0] in gpu and "stream" in n.lower()}
    if streams:
        keep, scope = (lambda e: (e.get("pid"), e.get("tid")) in streams), "device streams"
    elif gpu:
        keep, scope = (lambda e: e.get("pid") in gpu), "device (all tracks)"
    else:
        keep, scope = (lambda e: True), "host (no device track)"
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and "dur" in e and keep(e):
            totals[e["name"]] += float(e["dur"])
    return dict(totals), scope


def profile(name: str, tiny: bool, steps: int, candidate: str = "jnn") -> dict:
    import jax

    from benchmarks import gpu, harness

    w = gpu.workloads(tiny)[name]
    cand = harness.build_jax_candidates(w, ["jnn"], False)[candidate]
    loss = cand.first_step()
    cand.run(5)
    wall = cand.run(steps) / steps
    hlo = cand.step.lower(cand.carry, cand.batches[0]).compile().as_text()
    calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
    with tempfile.TemporaryDirectory(prefix="jnn-gpu-profile-") as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            cand.run(steps)
        (trace,) = Path(tmp).rglob("perfetto_trace.json.gz")
        totals, scope = device_times(trace)
    per_step = {k: v / steps / 1e3 for k, v in totals.items()}  # ms per step
    by_kind: dict[str, float] = collections.defaultdict(float)
    for k, ms in per_step.items():
        by_kind[kind_of(k)] += ms
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:40]
    return {"workload": name, "candidate": candidate, "title": w.title, "batch_size": w.batch_size, "first_step_loss": loss,
            "wall_ms_per_step": 1e3 * wall, "trace_scope": scope, "busy_ms_per_step": sum(per_step.values()),
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])), "top_kernels_ms": dict(top),
            "custom_calls": dict(calls), "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_profile", description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="+", choices=("G1", "G2"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--candidate", default="jnn", help="jnn, or jnn_<loss> for a workload's `jnn_losses`")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from benchmarks import common

    env = common.environment(("jax", "jaxlib", "flax", "optax", "numpy"))
    results = {}
    for name in args.workloads:
        start = time.perf_counter()
        r = results[name] = profile(name, args.tiny, args.steps, args.candidate)
        print(f"{name} ({r['title']}): {r['wall_ms_per_step']:.2f} ms/step wall, {r['busy_ms_per_step']:.2f} ms "
              f"{r['trace_scope']} time per step ({time.perf_counter() - start:.0f} s)", flush=True)
        print("  custom calls: " + ", ".join(f"{k} x{v}" for k, v in r["custom_calls"].items()), flush=True)
        for kind, ms in r["by_kind_ms"].items():
            print(f"  {kind:20s} {ms:8.3f} ms  {100 * ms / max(r['busy_ms_per_step'], 1e-9):5.1f}%", flush=True)
        for k, ms in list(r["top_kernels_ms"].items())[:15]:
            print(f"    {ms:8.3f} ms  {k[:110]}", flush=True)
    common.finish(env)
    result = {"benchmark": "profile-gpu" + ("-tiny" if args.tiny else ""), "environment": env, "workloads": results}
    if args.out:
        path = Path(args.out) / f"{result['benchmark']}-{env['date'][:10]}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
