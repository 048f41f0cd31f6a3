"""The PyTorch peer of one benchmark workload, run as its own process (never imports JAX).

  python benchmarks/torch_peer.py '{"model": "mlp", "kwargs": {"sizes": [784, 128, 64, 10]}, ...}'

The harness (`benchmarks/harness.py`) starts one of these per PyTorch candidate, so PyTorch and
JAX never share a process (two OpenMP/thread pools and two allocators in one process would
measure neither), and talks to it over stdin/stdout, one JSON object per line:

  <- {"ready": true, "first_step_s": ..., "threads": 2, "torch": "2.13.0", "params": ...}
  -> {"run": 20}                                   (20 steps, then wait for them)
  <- {"wall": seconds, "cpu": seconds, "loss": ...}  (this process's CPU time, all threads)
  -> {"exit": true}
  <- {"max_rss_mb": ..., "device_peak_mb": ...}

so its blocks of steps interleave with the JAX candidates' blocks in the harness's rounds. The
models are hand-written twins of jnn's (same layer sizes; PyTorch's own initialisation), trained
with Adam on synthetic batches of the same shapes, computing the loss and the accuracy as the JAX
candidates do. A spec that fails (no torch, torch.compile cannot build) answers
`{"error": "..."}` and exits 1.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time


def build_models(torch):
    """name -> constructor(**kwargs) of the PyTorch twins of the benchmark models."""
    from torch import nn
    from torch.nn import functional as F

    def mlp(sizes):
        layers = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        return nn.Sequential(*layers)

    def keras_cnn(num_classes=10, hidden=512):  # conv32-pool-conv64-pool-512-10 on 28x28x1
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 5 * 5, hidden), nn.ReLU(),
                             nn.Linear(hidden, num_classes))

    class Block(nn.Module):
        """Basic (two 3x3) or bottleneck (1x1-3x3-1x1, stride on the 3x3) residual block."""

        def __init__(self, cin, width, stride, bottleneck, shortcut):
            super().__init__()
            cout = width * 4 if bottleneck else width
            if bottleneck:
                convs = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
            else:
                convs = [(cin, width, 3, stride), (width, width, 3, 1)]
            self.convs = nn.ModuleList(nn.Conv2d(a, b, k, s, padding=k // 2, bias=False) for a, b, k, s in convs)
            self.bns = nn.ModuleList(nn.BatchNorm2d(b) for _, b, _, _ in convs)
            self.stride, self.pad = stride, cout - cin
            self.proj = None
            if (stride != 1 or cin != cout) and shortcut == "B":
                self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = x
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
                y = bn(conv(y))
                y = F.relu(y) if i < len(self.convs) - 1 else y
            if self.proj is not None:
                x = self.proj(x)
            elif self.stride != 1 or self.pad:  # option A: subsample, zero-pad the channels
                x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(y + x)

    def resnet(stage_sizes, widths, block="basic", stem="imagenet", shortcut="B", num_classes=1000):
        bottleneck = block == "bottleneck"
        if stem == "cifar":
            layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        else:
            layers = [nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
                      nn.MaxPool2d(3, 2, 1)]
        cin = widths[0]
        for i, (size, width) in enumerate(zip(stage_sizes, widths)):
            for j in range(size):
                layers.append(Block(cin, width, 2 if i > 0 and j == 0 else 1, bottleneck, shortcut))
                cin = width * 4 if bottleneck else width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        return nn.Sequential(*layers)

    class GPTBlock(nn.Module):
        def __init__(self, c, heads):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
            self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.fc, self.out = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

        def forward(self, x):  # (B, T, C)
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, N, T, H)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        """nanoGPT's model: learned positions, pre-LN blocks, tied output head."""

        def __init__(self, vocab_size, block_size, num_layers, num_heads, embed_dim, vocab_multiple=1):
            super().__init__()
            self.vocab_size = vocab_size  # the table has `rows` (padded, as jnn's GPT(vocab_multiple=...))
            rows = -(-vocab_size // vocab_multiple) * vocab_multiple
            self.wte, self.wpe = nn.Embedding(rows, embed_dim), nn.Embedding(block_size, embed_dim)
            self.blocks = nn.ModuleList(GPTBlock(embed_dim, num_heads) for _ in range(num_layers))
            self.ln_f = nn.LayerNorm(embed_dim)
            for p in self.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, 0.0, 0.02)
            for blk in self.blocks:
                for p in (blk.proj.weight, blk.out.weight):
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * num_layers))

        def forward(self, idx):  # (B, T)
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for blk in self.blocks:
                x = blk(x)
            return (self.ln_f(x) @ self.wte.weight.t())[..., :self.vocab_size]  # (B, T, V)

    class LSTM(nn.Module):
        def __init__(self, vocab_size, embed_dim, hidden_size, num_layers):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, embed_dim)
            self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True)
            self.head = nn.Linear(hidden_size, vocab_size)

        def forward(self, idx):  # (B, T)
            return self.head(self.lstm(self.embed(idx))[0])  # (B, T, V)

    return {"mlp": mlp, "keras_cnn": keras_cnn, "resnet": resnet, "gpt": GPT, "lstm": LSTM}


def synthetic_batches(torch, spec, device, count=4):
    """`count` (inputs, labels) pairs of the workload's shapes, placed on the device once."""
    import numpy as np

    rng = np.random.default_rng(spec.get("seed", 0))
    b, shape, k = spec["batch_size"], tuple(spec["input_shape"]), spec["num_classes"]
    out = []
    for _ in range(count):
        if spec["tokens"]:
            x = torch.from_numpy(rng.integers(0, k, (b, *shape)))  # (B, T)
            y = torch.from_numpy(rng.integers(0, k, (b, *shape)))  # (B, T)
        else:
            x = rng.random((b, *shape), dtype=np.float32)
            if x.ndim == 4:
                x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW, PyTorch's layout
            x = torch.from_numpy(np.ascontiguousarray(x))
            y = torch.from_numpy(rng.integers(0, k, b))  # (B,)
        x, y = x.to(device), y.to(device)
        if spec.get("channels_last") and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, y))
    return out


class Peer:
    """A model, its Adam optimizer and batches; `run(n)` times n train steps."""

    def __init__(self, spec):
        import torch

        self.torch, self.spec = torch, spec
        torch.set_num_threads(spec["threads"])  # before any work: inductor bakes it into its kernels
        torch.manual_seed(0)
        self.device = torch.device(spec.get("device", "cpu"))
        model = build_models(torch)[spec["model"]](**spec["kwargs"]).to(self.device).train()
        if spec.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        self.params = sum(p.numel() for p in model.parameters())
        self.opt = torch.optim.Adam(model.parameters(), lr=spec.get("lr", 1e-3))
        self.net = torch.compile(model) if spec.get("compile") else model
        self.amp = getattr(torch, spec["amp"]) if spec.get("amp") else None
        self.batches = synthetic_batches(torch, spec, self.device)
        self.i = 0

    def step(self):
        torch = self.torch
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.net(x)
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        self.opt.step()
        accuracy = (logits.detach().argmax(-1) == y).float().mean()
        return loss.detach(), accuracy

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def run(self, n: int) -> dict:
        self.sync()
        c0, start = time.process_time(), time.perf_counter()
        loss = None
        for _ in range(n):
            loss, _ = self.step()
        self.sync()
        return {"wall": time.perf_counter() - start, "cpu": time.process_time() - c0, "loss": float(loss)}


def serve(spec: dict, inp=sys.stdin, out=sys.stdout) -> int:
    def send(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        import torch

        peer = Peer(spec)
        first = peer.run(1)  # torch.compile compiles here (forward and backward)
    except Exception as err:  # noqa: BLE001 - any failure (no torch, inductor cannot build) skips the peer
        send({"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"})
        return 1
    send({"ready": True, "first_step_s": first["wall"], "loss": first["loss"], "threads": torch.get_num_threads(),
          "torch": torch.__version__, "params": peer.params,
          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})
    for line in inp:
        cmd = json.loads(line)
        if "run" in cmd:
            send(peer.run(int(cmd["run"])))
        else:
            break
    peak = torch.cuda.max_memory_allocated() / 2**20 if peer.device.type == "cuda" else None
    send({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "device_peak_mb": peak})
    return 0


if __name__ == "__main__":
    sys.exit(serve(json.loads(sys.argv[1])))
