"""Input-pipeline throughput: examples/s of jnn.data.Pipeline on digits, MNIST and CIFAR shapes.

Compare the numbers with the train step's examples/s: the pipeline must never be the bottleneck.

Run:
  python -m benchmarks.studies.pipeline   # ~1 s per row; writes benchmarks/results/studies/pipeline-<date>.json
  python -m benchmarks.studies.pipeline --seconds 0.2 --no-save   # quick look

Rows: digits (real data, 8x8x1), MNIST-shaped (28x28x1) and CIFAR-shaped (32x32x3) synthetic data,
batch 128, with and without augmentation, through grain (the default path, with 0 or more
prefetch threads), through the grain-free numpy iterator, and, for reference, through a
per-example grain pipeline (shuffle -> batch of single examples), which shows why jnn batches
whole index ranges instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import grain

import jnn.data as jd
from benchmarks import common

BATCH_SIZE = 128


def _per_example_grain(data):
    """The textbook grain pipeline, one element per example: the reference jnn avoids."""

    class Source:
        def __len__(self):
            return len(data["labels"])

        def __getitem__(self, i):
            return {"inputs": data["inputs"][i], "labels": data["labels"][i]}

    ds = grain.MapDataset.source(Source()).shuffle(seed=0).repeat(None)
    ds = ds.batch(BATCH_SIZE, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def measure(iterator, seconds: float, min_batches: int = 20) -> dict:
    """Pulls batches for about `seconds` after a warm-up; returns examples/s and ms/batch."""
    for _ in range(10):  # warm-up: thread start, first permutation, prefetch buffer fill
        next(iterator)
    count, start = 0, time.perf_counter()
    while count < min_batches or time.perf_counter() - start < seconds:
        batch = next(iterator)
        count += 1
    elapsed = time.perf_counter() - start
    n = len(batch["labels"])
    return {
        "examples_per_s": count * n / elapsed,
        "ms_per_batch": 1e3 * elapsed / count,
        "batches": count,
    }


def workloads():
    digits = jd.load("digits").train
    mnist = jd.synthetic_arrays(60_000, (28, 28, 1), 10, seed=0)
    cifar = jd.synthetic_arrays(50_000, (32, 32, 3), 10, seed=0)
    mean1, std1 = (0.5,), (0.25,)
    mean3, std3 = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    return [
        ("digits 8x8x1", digits, None, "none"),
        ("digits 8x8x1", digits, [jd.RandomCrop(1), jd.Normalize(mean1, std1)], "crop(pad 1)+norm"),
        ("mnist 28x28x1", mnist, None, "none"),
        ("mnist 28x28x1", mnist, [jd.RandomCrop(2), jd.Normalize(mean1, std1)], "crop(pad 2)+norm"),
        ("cifar 32x32x3", cifar, None, "none"),
        ("cifar 32x32x3", cifar, [jd.RandomCrop(4), jd.RandomFlip(), jd.Normalize(mean3, std3)],
         "crop(pad 4)+flip+norm"),
    ]  # fmt: skip


# (label, Pipeline keyword arguments, iterator): the default path first.
PATHS = [
    ("grain threads=1 (default)", {}, "grain"),
    ("grain threads=2", {"num_threads": 2, "prefetch": 8}, "grain"),
    ("grain threads=0 (sync)", {"num_threads": 0, "prefetch": 0}, "grain"),
    ("numpy iterator", {}, "numpy"),
]


def run(seconds: float) -> list[dict]:
    rows = []
    for shape, data, augment, aug_name in workloads():
        iterators = []
        for label, kwargs, kind in PATHS:
            pipe = jd.Pipeline(
                data, BATCH_SIZE, augment=augment, shard_index=0, shard_count=1, **kwargs
            )
            iterators.append((label, pipe, kind))
        if augment is None and shape.startswith("digits"):
            iterators.append(("grain per-example (reference)", data, "per-example"))
        for label, source, kind in iterators:
            if kind == "grain":
                iterator = iter(source)
            elif kind == "numpy":
                iterator = source.numpy_iterator()
            else:
                iterator = _per_example_grain(source)
            result = measure(iterator, seconds)
            iterator.close()
            row = {"shape": shape, "batch_size": BATCH_SIZE, "augment": aug_name, "path": label}
            rows.append({**row, **result})
            print(
                f"{shape:14s} {aug_name:22s} {label:30s} {result['examples_per_s']:>12,.0f} ex/s "
                f"{result['ms_per_batch']:8.3f} ms/batch",
                flush=True,
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per row")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/studies/pipeline-<date>.json)"
    )
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    env = common.environment(("jax", "jaxlib", "grain", "numpy", "flax"))
    print(f"jnn.data pipeline throughput, batch {BATCH_SIZE}; {common.env_line(env)}")
    rows = run(args.seconds)
    common.finish(env)
    if args.no_save:
        return
    out = args.out or os.path.join(common.STUDY_RESULTS, f"pipeline-{datetime.date.today()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({**env, "seconds_per_row": args.seconds, "rows": rows}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
