"""The `Splits` container every source returns, and the deterministic split helpers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jnn.data._errors import DataError

Arrays = dict[str, np.ndarray]

# The held-out test split of sources without an official one (digits, npz without test keys) uses
# this fixed seed, so the test set is the same whatever `seed` a run uses for shuffling and val.
TEST_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Splits:
    """Train, validation and test arrays of one data set, plus its metadata.

    Attributes:
      name: the data set's name, e.g. "digits".
      train: `{"inputs": (N, ...) array, "labels": (N, ...) int32 array}`.
      val: same keys; may hold 0 examples when `val_fraction=0`.
      test: same keys.
      num_classes: labels lie in `[0, num_classes)`.
      class_names: one name per class (for text: one character per token id).
      input_shape: the shape of one example's inputs, e.g. `(8, 8, 1)`.
      info: source-specific extras (e.g. the files read, the text vocabulary).
    """

    name: str
    train: Arrays
    val: Arrays
    test: Arrays
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise DataError(
                f"{self.name}: expected {self.num_classes} class names, "
                f"got {len(self.class_names)}."
            )
        for split in ("train", "val", "test"):
            arrays = getattr(self, split)
            check_arrays(arrays, self.num_classes, where=f"{self.name} {split} split")
            got = tuple(arrays["inputs"].shape[1:])
            if got != tuple(self.input_shape):
                raise DataError(
                    f"{self.name} {split} split: expected inputs of shape "
                    f"(N, *{self.input_shape}), "
                    f"got {arrays['inputs'].shape}."
                )

    def split(self, name: str) -> Arrays:
        """Returns the arrays of split `name` ("train", "val" or "test")."""
        if name not in ("train", "val", "test"):
            raise DataError(f"expected split 'train', 'val' or 'test', got {name!r}.")
        return getattr(self, name)

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{s}={len(getattr(self, s)['labels'])}" for s in ("train", "val", "test")
        )
        return (
            f"Splits(name={self.name!r}, {sizes}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )


def check_arrays(arrays: Mapping[str, np.ndarray], num_classes: int | None, *, where: str) -> None:
    """Checks one split: `inputs` and integer `labels` of equal length, labels in range.

    Args:
      arrays: a mapping with at least "inputs" and "labels".
      num_classes: labels must lie in `[0, num_classes)`; None checks only `>= 0`.
      where: names the split (or file) in error messages.

    Raises:
      DataError: a key is missing, lengths differ, labels are not integers or out of range.
    """
    for key in ("inputs", "labels"):
        if key not in arrays:
            raise DataError(f"{where}: expected keys 'inputs' and 'labels', got {sorted(arrays)}.")
    inputs, labels = arrays["inputs"], arrays["labels"]
    if len(inputs) != len(labels):
        raise DataError(
            f"{where}: inputs and labels must have the same length, got {len(inputs)} inputs and "
            f"{len(labels)} labels."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: expected integer class labels, got dtype {labels.dtype}. "
            "Fix: store class indices, e.g. labels.astype(np.int32)."
        )
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise DataError(
            f"{where}: labels out of range: expected labels in {bound}, "
            f"got min {low} and max {high}. "
            "Fix: relabel classes as 0..num_classes-1 (or pass the right num_classes)."
        )


def take(arrays: Mapping[str, np.ndarray], indices: np.ndarray) -> Arrays:
    """Returns `{key: array[indices]}` for every array."""
    return {key: value[indices] for key, value in arrays.items()}


def split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits `range(len(labels))` into (kept, held_out), stratified by label when possible.

    The split is scikit-learn's `train_test_split(indices, test_size=..., random_state=seed,
    stratify=...)`, reproduced exactly. Stratification keeps class proportions in both parts; it
    needs at least 2 examples per class and at least one held-out slot per class, and falls back to
    a plain seeded random split otherwise (e.g. on tiny test files).

    Args:
      labels: (N,) integer labels (or (N, ...) for sequence data, which is never stratified).
      fraction: share of examples held out, in [0, 1).
      seed: makes the split deterministic.

    Returns:
      Two sorted int64 index arrays that are disjoint and together cover `range(N)`.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"expected a split fraction in [0, 1), got {fraction}.")
    n = len(labels)
    num_held = int(round(n * fraction))
    indices = np.arange(n)
    if num_held == 0:
        return indices, indices[:0]
    if num_held >= n:
        raise DataError(f"a split fraction of {fraction} of {n} examples leaves none to train on.")
    rng = np.random.RandomState(seed)
    if labels.ndim == 1:
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if counts.min() >= 2 and len(counts) <= num_held <= n - len(counts):
            return _stratified_split(inverse.reshape(-1), counts, n - num_held, num_held, rng)
    held = rng.permutation(n)[:num_held]
    return np.setdiff1d(indices, held), np.sort(held)


def _stratified_split(inverse, counts, num_kept, num_held, rng):
    """scikit-learn's `StratifiedShuffleSplit`, draw for draw, without importing scikit-learn.

    Importing `sklearn.model_selection` pulls in scipy, which costs more at start-up than the
    rest of loading the digits. This makes the same random draws in the same order, so the
    splits are exactly scikit-learn's (`tests/data/test_sources.py` compares them).
    """
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    kept_per_class = _approximate_mode(counts, num_kept, rng)
    held_per_class = _approximate_mode(counts - kept_per_class, num_held, rng)
    kept, held = [], []
    for members, k, h in zip(by_class, kept_per_class, held_per_class):
        members = members.take(rng.permutation(len(members)), mode="clip")
        kept.append(members[:k])
        held.append(members[k:k + h])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def _approximate_mode(counts, draws, rng):
    """scikit-learn's `utils.extmath._approximate_mode`: per-class draws, ties broken by `rng`."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (candidates,) = np.where(remainder == value)
            add = min(len(candidates), need)
            floored[rng.choice(candidates, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def make_splits(
    name: str,
    train: Arrays,
    test: Arrays | None,
    *,
    val_fraction: float,
    seed: int,
    num_classes: int,
    class_names: tuple[str, ...] | None = None,
    test_fraction: float = 0.2,
    val: Arrays | None = None,
    info: Mapping[str, Any] | None = None,
) -> Splits:
    """Builds `Splits`, carving test (if absent) and val (if absent) out of `train`.

    The test split is carved with the fixed `TEST_SPLIT_SEED`; val with `seed`.
    """
    if test is None:
        kept, held = split_indices(train["labels"], test_fraction, TEST_SPLIT_SEED)
        train, test = take(train, kept), take(train, held)
    if val is None:
        kept, held = split_indices(train["labels"], val_fraction, seed)
        train, val = take(train, kept), take(train, held)
    return Splits(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        class_names=class_names or tuple(str(c) for c in range(num_classes)),
        input_shape=tuple(train["inputs"].shape[1:]),
        info=dict(info or {}),
    )
