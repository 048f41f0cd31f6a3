"""scikit-learn's bundled 8x8 handwritten digits: real data that needs no download."""

from __future__ import annotations

import numpy as np

from jnn.data._splits import Splits, make_splits

# Raw digits pixels are counts of set pixels in 4x4 blocks of a 32x32 bitmap: integers 0..16.
_MAX_PIXEL = 16.0


def load_digits(*, val_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Loads the 1,797 bundled 8x8 digits with stratified train/val/test splits.

    The test split is a fixed stratified 20% (always the same 360 images); val is a stratified
    `val_fraction` of the rest, chosen by `seed`.

    Args:
      val_fraction: share of the non-test examples held out for validation.
      seed: chooses the validation split.

    Returns:
      `Splits` with inputs (N, 8, 8, 1) float32 in [0, 1] and int32 labels 0..9.
    """
    pixels, target, source = _read_bundled()
    images = (pixels.reshape(-1, 8, 8) / _MAX_PIXEL).astype(np.float32)[..., None]  # (N, 8, 8, 1)
    labels = target.astype(np.int32)
    return make_splits(
        "digits",
        {"inputs": images, "labels": labels},
        None,
        val_fraction=val_fraction,
        seed=seed,
        num_classes=10,
        info={"source": source},
    )


def _read_bundled() -> tuple[np.ndarray, np.ndarray, str]:
    """(N, 64) pixels and (N,) labels of scikit-learn's bundled digits file, and where they came from.

    The file (`sklearn/datasets/data/digits.csv.gz`: 64 pixel columns, then the label) is read
    directly: importing scikit-learn to call `load_digits` costs more than a second at start-up.
    If the file is not where scikit-learn keeps it, `sklearn.datasets.load_digits` reads it.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)  # (1797, 65)
            return table[:, :-1], table[:, -1], path
    from sklearn import datasets

    bunch = datasets.load_digits()
    return bunch.data, bunch.target, "sklearn.datasets.load_digits"
