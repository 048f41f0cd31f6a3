"""GPT-2's output head and loss alone: which form of the slice and the cross-entropy is fastest.

  python -m benchmarks.studies.lm_head [--tiny] [--steps 20] [--out results/studies/lm_head.json]

The head of G1 (GPT-2 small, batch 16 x 1024, vocabulary 50,257 padded to 50,304) is one matmul
and a softmax over 50,257 classes, forward and backward: the part of the step the 2026-12-04 H200
profile found in its reductions (17%) and a 1.2 ms pad. Each variant computes the mean loss of
(h @ W.T) and its gradients for h and W, compiled alone, timed in interleaved rounds:

  slice         logits[..., :V] in bfloat16, cast to float32, optax's integer cross-entropy
                (jnn's GPT(vocab_multiple=128) with jnn's "cross_entropy": what G1 runs today)
  slice_fused   the same logits, `jnn.losses.fused_cross_entropy`
  bf16_fused    logits[..., :V] left in bfloat16, `fused_cross_entropy` (upcasts in its reductions)
  online_fused  as bf16_fused, the log-normaliser in one pass (a variadic reduce of max and sum)
  mask          padded logits, the padding set to -inf (no slice, so no pad in the backward)
  mask_fused    the same, `fused_cross_entropy`
  unpadded      W with 50,257 rows (no padding at all)

Then the whole G1 step (jnn's, as the harness builds it) with "cross_entropy" and
"fused_cross_entropy", unless --no-step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jnn
from jnn import losses


def online_lse(x):
    """log-sum-exp in one pass over x: a variadic reduce of (running max, sum of exp(x - max))."""
    def combine(a, b):
        (m1, s1), (m2, s2) = a, b
        m = jnp.maximum(m1, m2)
        return m, (jnp.where(m1 == -jnp.inf, 0.0, s1 * jnp.exp(m1 - m))
                   + jnp.where(m2 == -jnp.inf, 0.0, s2 * jnp.exp(m2 - m)))
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0.0, x.dtype))
    m, total = jax.lax.reduce((x, jnp.ones_like(x)), init, combine, (x.ndim - 1,))
    return jnp.log(total) + m


@jax.custom_vjp
def online_ce(logits, labels):
    return online_ce_fwd(logits, labels)[0]


def online_ce_fwd(logits, labels):
    x = logits.astype(jnp.float32)
    lse = online_lse(x)
    return lse - jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0], (logits, labels, lse)


online_ce.defvjp(online_ce_fwd, losses._fused_ce_bwd)


def variants(v: int):
    def ce(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def head(h, w):
        return h @ w.astype(jnp.bfloat16).T

    return {
        "slice": lambda h, w, y: ce(head(h, w)[..., :v].astype(jnp.float32), y),
        "slice_fused": lambda h, w, y: losses.fused_cross_entropy(head(h, w)[..., :v].astype(jnp.float32), y).mean(),
        "bf16_fused": lambda h, w, y: losses.fused_cross_entropy(head(h, w)[..., :v], y).mean(),
        "online_fused": lambda h, w, y: online_ce(head(h, w)[..., :v], y).mean(),
        "mask_fused": lambda h, w, y: losses.fused_cross_entropy(
            jnp.where(jnp.arange(w.shape[0]) < v, head(h, w), -jnp.inf), y).mean(),
        "mask": lambda h, w, y: ce(jnp.where(jnp.arange(w.shape[0]) < v, head(h, w), -jnp.inf).astype(jnp.float32), y),
        "unpadded": lambda h, w, y: ce(head(h, w[:v]).astype(jnp.float32), y),
    }


def timed(fn, args, steps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps * 1e3


def head_study(tiny: bool, steps: int, rounds: int) -> dict:
    n, c, v, rows = (256, 64, 1000, 1024) if tiny else (16 * 1024, 768, 50257, 50304)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (n, c), jnp.bfloat16)
    w = jax.random.normal(k2, (rows, c), jnp.float32) * 0.02
    y = jax.random.randint(k3, (n,), 0, v)
    fns = {name: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for name, f in variants(v).items()}
    ref = None
    result = {}
    for name, fn in fns.items():
        loss, (gh, gw) = fn(h, w, y)
        mem = fn.lower(h, w, y).compile().memory_analysis()
        if ref is None:
            ref = (loss, gh, gw[:v])
        result[name] = {"loss": float(loss),
                        "max_grad_h_diff": float(jnp.max(jnp.abs(gh.astype(jnp.float32) - ref[1].astype(jnp.float32)))),
                        "max_grad_w_diff": float(jnp.max(jnp.abs(gw[:v] - ref[2]))),
                        "temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20, "ms": []}
    for _ in range(rounds):
        for name, fn in fns.items():
            result[name]["ms"].append(timed(fn, (h, w, y), steps))
    for name, r in result.items():
        r["ms_median"] = statistics.median(r["ms"])
        print(f"head {name:12s} {r['ms_median']:8.3f} ms  temp {r['temp_mb']:8.1f} MB  loss {r['loss']:.6f}  "
              f"grad diff h {r['max_grad_h_diff']:.2e} w {r['max_grad_w_diff']:.2e}", flush=True)
    return result


def step_study(tiny: bool, steps: int, rounds: int) -> dict:
    from benchmarks import gpu, workloads as wl

    w = gpu.workloads(tiny)["G1"]
    host = wl.make_batches(w)
    device = [jax.device_put(b) for b in host]
    state = jnn.create_train_state(w.model(), optax.adam(wl.LR), host[0]["inputs"][:1], 0, precision=w.precision)
    fns = {name: jnn.jit(jnn.make_train_step(name, metrics=("loss", "accuracy"), on_nonfinite="apply"))
           for name in ("cross_entropy", "fused_cross_entropy")}
    result = {name: {"ms": [], "first_loss": float(fn(state, device[0])[1]["loss"])} for name, fn in fns.items()}
    for _ in range(rounds):
        for name, fn in fns.items():
            s = state
            _, m = fn(s, device[0])
            jax.block_until_ready(m)
            start = time.perf_counter()
            for i in range(steps):
                s, m = fn(s, device[i % len(device)])
            jax.block_until_ready((s, m))
            result[name]["ms"].append((time.perf_counter() - start) / steps * 1e3)
    for name, r in result.items():
        r["ms_median"] = statistics.median(r["ms"])
        print(f"G1 step {name:20s} {r['ms_median']:8.3f} ms  first loss {r['first_loss']:.6f}", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--out", default=None, help="a JSON file for the results")
    args = p.parse_args(argv)
    print(jax.devices(), jax.__version__, flush=True)
    result = {"devices": str(jax.devices()), "jax": jax.__version__, "head": head_study(args.tiny, args.steps, args.rounds)}
    if not args.no_step:
        result["step"] = step_study(args.tiny, max(args.steps // 2, 2), args.rounds)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
