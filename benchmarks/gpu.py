"""The GPU suite: `python -m benchmarks --suite gpu` (one command, sized for ~8 minutes on one H200).

  G1  GPT-2 small (124M, context 1024) trained under `jnn.precision` "mixed_bf16": tokens/s and MFU
      against the device's dense bf16 peak, vs a nanoGPT-style PyTorch model under `torch.compile`
      with bf16 autocast (`benchmarks/torch_peer.py`).
  G2  ResNet-50 (224x224) under "mixed_bf16" vs PyTorch channels-last bf16 autocast under
      `torch.compile`.
  G3  The default `jnn train` (the digits) in a fresh process, persistent compilation cache off.

`--tiny` shrinks every model and batch (and G3 to `jnn train --debug`) so the suite's code paths run
on a CPU in seconds: what the tests run. Nothing here imports JAX at import time: the CLI's parent
process stays light, and the workloads are built in the harness's worker processes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

# Dense (no sparsity) bf16 peak TFLOP/s by device kind, first match wins (vendor data sheets).
DENSE_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / NVL
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v6", 918.0),
)


def dense_bf16_peak(device_kind: str) -> float | None:
    """The dense bf16 peak FLOP/s of a device kind from `DENSE_BF16_PEAK_TFLOPS`, or None."""
    for name, tflops in DENSE_BF16_PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def gpt_config(tiny: bool) -> dict:
    """GPT-2 small, its vocabulary padded to a multiple of 128 on both sides (50,257 -> 50,304 rows, as
    nanoGPT does); the logits are sliced back, so the loss is the unpadded model's. Tiny: 100 -> 128."""
    if tiny:
        return dict(vocab_size=100, block_size=32, num_layers=1, num_heads=2, embed_dim=64, vocab_multiple=128)
    return dict(vocab_size=50257, block_size=1024, num_layers=12, num_heads=12, embed_dim=768, vocab_multiple=128)


def workloads(tiny: bool = False) -> dict:
    """G1 and G2 as `benchmarks.workloads.Workload`s (imports JAX)."""
    import jnn
    from benchmarks.workloads import Workload, gpt_flops

    gpt = gpt_config(tiny)
    v, t, n_layer, c = gpt["vocab_size"], gpt["block_size"], gpt["num_layers"], gpt["embed_dim"]
    batch = 2 if tiny else 16
    # Parameters without the position table, as nanoGPT counts them for its MFU.
    params = v * c + n_layer * (12 * c * c + 13 * c) + 2 * c
    # Tiny: one bottleneck block, whose width change still takes the projection shortcut.
    resnet = (dict(stage_sizes=(1,), widths=(8,), num_classes=10) if tiny else
              dict(stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512), num_classes=1000))
    image = 32 if tiny else 224
    return {w.name: w for w in (
        Workload("G1", "GPT-2 small" + (" (tiny)" if tiny else ""), lambda: jnn.models.GPT(**gpt), batch, (t,), v,
                 tokens=True, torch_model="gpt", torch_kwargs=gpt, precision="mixed_bf16", torch_amp="bfloat16",
                 model_flops=gpt_flops(params, n_layer, c, t, batch * t), jnn_losses=("fused_cross_entropy",)),
        Workload("G2", "ResNet-50" + (" (tiny)" if tiny else ""),
                 lambda: jnn.models.ResNet(block="bottleneck", **resnet), 4 if tiny else 128, (image, image, 3),
                 resnet["num_classes"], torch_model="resnet",
                 torch_kwargs=dict(block="bottleneck", **{k: list(x) if isinstance(x, tuple) else x
                                                          for k, x in resnet.items()}),
                 precision="mixed_bf16", torch_amp="bfloat16", channels_last=True),
    )}


def default_run(tiny: bool, repeats: int = 1, timeout: float | None = None) -> dict:
    """G3: wall seconds of `jnn train` (the digits default; `--debug` when tiny) in fresh processes.

    A process that outlives `timeout` seconds is killed and recorded with exit code "timeout".
    """
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, JNN_COMPILATION_CACHE="")  # a first run on a fresh machine
    walls, codes = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="jnn-bench-train-") as tmp:
            cmd = [sys.executable, "-m", "jnn.cli", "train", "--run-dir", os.path.join(tmp, "run")] + \
                  (["--debug"] if tiny else [])
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                common.kill_group(proc.pid)  # its children too
                proc.communicate()
                codes.append("timeout")
                print(f"G3: `jnn train` killed after {timeout:.0f} s", file=sys.stderr)
                break  # a second try would most likely hang as long
            walls.append(time.perf_counter() - start)
            codes.append(proc.returncode)
            if proc.returncode:
                print(err[-2000:], file=sys.stderr)
    if not walls:
        return {"error": f"no `jnn train` process finished (exit codes {codes})"}
    return {"kind": "default_run", "title": "default `jnn train` (digits) in a fresh process",
            "command": "jnn train" + (" --debug" if tiny else ""), "wall_s": common.spread(walls),
            "exit_codes": codes}
