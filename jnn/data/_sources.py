"""`load(name)`: one entry point over every data source."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from jnn.data._cifar import load_cifar10
from jnn.data._digits import load_digits
from jnn.data._errors import DataError
from jnn.data._mnist import load_mnist
from jnn.data._npz import load_npz
from jnn.data._splits import Splits
from jnn.data._synthetic import load_synthetic
from jnn.data._text import load_text

# name -> (loader, whether its first argument is the path / directory)
_SOURCES: dict[str, tuple[Callable[..., Splits], bool]] = {
    "digits": (load_digits, False),
    "mnist": (load_mnist, True),
    "cifar10": (load_cifar10, True),
    "npz": (load_npz, True),
    "synthetic": (load_synthetic, False),
    "text": (load_text, True),
}
NAMES = ("digits", "mnist", "cifar10", "npz:<path>", "synthetic", "text[:<path>]")


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_fraction: float | None = None,
    seed: int = 0,
    **options: Any,
) -> Splits:
    """Loads a data set by name with deterministic train/val/test splits.

    Names:

    - "digits": scikit-learn's bundled 8x8 digits (no files needed).
    - "mnist": IDX files in `data_dir`. "cifar10": batches in `data_dir`.
    - "npz:<path>" (or "npz" with `data_dir` the file): see `load_npz` for keys and `options`.
    - "synthetic": random data; `options` such as `input_shape=(28, 28, 1)`, `num_examples`.
    - "text" / "text:<path>" (or `data_dir` the file): characters as tokens; `seq_len` option.
      Without a path, the Python standard library's source is the text.

    Args:
      name: one of the names above.
      data_dir: directory (mnist, cifar10) or file (npz, text) to read.
      val_fraction: share of train held out for validation; None keeps each source's default
        (digits, cifar10, npz, synthetic, text 0.1; mnist 1/12, i.e. 5,000 of 60,000).
      seed: chooses the validation split (and synthetic data); the test split never depends on it.
      **options: source-specific keyword arguments of the `load_*` function.

    Returns:
      `Splits` with `.train`, `.val`, `.test` (`{"inputs", "labels"}` dicts), `num_classes`,
      `class_names` and `input_shape`.

    Raises:
      DataError: unknown name or option. MissingDataError: files missing. DataError: bad files.

    Example:
      >>> splits = load("digits", seed=0)
      >>> splits.train["inputs"].shape[1:]
      (8, 8, 1)
    """
    base, _, path = name.partition(":")
    if base not in _SOURCES:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(NAMES)}.")
    loader, takes_path = _SOURCES[base]
    if path and data_dir is not None:
        raise DataError(f"{name!r} already names a path; expected data_dir=None, got {data_dir!r}.")
    location = path or data_dir
    if location is not None and not takes_path:
        raise DataError(f"{base!r} reads no files; expected data_dir=None, got {location!r}.")
    if base == "npz" and location is None:
        raise DataError("npz needs a file: load('npz:/path/to/data.npz') or data_dir='/path/...'.")

    params = inspect.signature(loader).parameters
    if "seed" in params:
        options["seed"] = seed
    if val_fraction is not None:
        options["val_fraction"] = val_fraction
    accepted = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(f"{base} does not take option(s) {unknown}; expected some of {accepted}.")
    return loader(location, **options) if takes_path else loader(**options)
