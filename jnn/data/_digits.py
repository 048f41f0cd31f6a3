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
    from sklearn import datasets  # deferred: importing scikit-learn takes ~1 s

    bunch = datasets.load_digits()
    images = (bunch.images / _MAX_PIXEL).astype(np.float32)[..., None]  # (N, 8, 8, 1)
    labels = bunch.target.astype(np.int32)
    return make_splits(
        "digits",
        {"inputs": images, "labels": labels},
        None,
        val_fraction=val_fraction,
        seed=seed,
        num_classes=10,
        info={"source": "sklearn.datasets.load_digits"},
    )
