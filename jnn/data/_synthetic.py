"""Random arrays of any shape, deterministic by seed: for benchmarks and smoke tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jnn.data._splits import Arrays, Splits, make_splits


def synthetic_arrays(
    num_examples: int,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    dtype: str | np.dtype = "float32",
    label_shape: Sequence[int] = (),
    seed: int = 0,
) -> Arrays:
    """Returns random inputs and labels.

    Float inputs are uniform in [0, 1); integer inputs (e.g. tokens) uniform in [0, num_classes).

    Args:
      num_examples: N.
      input_shape: shape of one example, e.g. (28, 28, 1) or (T,) for tokens.
      num_classes: labels are uniform in [0, num_classes).
      dtype: inputs' dtype.
      label_shape: shape of one example's labels; () for classification, (T,) for sequences.
      seed: same seed, same arrays.

    Returns:
      `{"inputs": (N, *input_shape) dtype, "labels": (N, *label_shape) int32}`.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    shape = (num_examples, *input_shape)
    if np.issubdtype(dtype, np.floating):
        inputs = rng.random(shape, dtype=np.float32).astype(dtype, copy=False)
    else:
        inputs = rng.integers(0, num_classes, shape).astype(dtype)
    labels = rng.integers(0, num_classes, (num_examples, *label_shape), dtype=np.int32)
    return {"inputs": inputs, "labels": labels}


def load_synthetic(
    *,
    num_examples: int = 2048,
    num_test: int = 512,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    dtype: str | np.dtype = "float32",
    label_shape: Sequence[int] = (),
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """Random `Splits` of the given shapes (e.g. MNIST's) for throughput benchmarks.

    Args:
      num_examples: train + val examples.
      num_test: test examples.
      input_shape: shape of one example.
      num_classes: number of classes.
      dtype: inputs' dtype.
      label_shape: shape of one example's labels.
      val_fraction: share of `num_examples` used for val.
      seed: same seed, same data.

    Returns:
      `Splits` named "synthetic".
    """
    kwargs = dict(input_shape=tuple(input_shape), num_classes=num_classes, dtype=dtype,
                  label_shape=tuple(label_shape))  # fmt: skip
    num_val = int(round(num_examples * val_fraction))
    train = synthetic_arrays(num_examples - num_val, seed=seed, **kwargs)
    # Distinct seeds per split; the sequence form keeps them independent of `seed`'s value.
    val = synthetic_arrays(num_val, seed=np.random.SeedSequence([seed, 1]), **kwargs)
    test = synthetic_arrays(num_test, seed=np.random.SeedSequence([seed, 2]), **kwargs)
    return make_splits(
        "synthetic", train, test, val=val, val_fraction=val_fraction, seed=seed,
        num_classes=num_classes, info={"seed": seed},
    )  # fmt: skip
