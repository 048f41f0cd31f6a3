"""CIFAR-10 from a local directory of the python-pickle or binary batches."""

from __future__ import annotations

import os
import pickle

import numpy as np

from jnn.data._errors import DIGITS_HINT, DataError, MissingDataError, data_dir_or_raise
from jnn.data._splits import Splits, make_splits

CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
_PIXELS = 3 * 32 * 32  # one image, channel-major (3, 32, 32)
_RECORD = 1 + _PIXELS  # binary format: 1 label byte, then the pixels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a tampered batch file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module, name):
        # numpy 2 renamed numpy.core to numpy._core; the official files name the old module.
        module = module.replace("numpy._core", "numpy.core")
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core")
        return super().find_class(module, name)


def find_cifar10_dir(data_dir: str | os.PathLike | None) -> tuple[str, str]:
    """Finds the CIFAR-10 batches in `data_dir` itself or in its cifar-10-batches-{py,bin} child.

    Returns:
      `(directory, format)` with format "py" or "bin"; python batches win when both exist.

    Raises:
      MissingDataError: no batches found; says which files were expected and where to get them.
    """
    expected = (
        "cifar-10-batches-py/ (data_batch_1..5, test_batch) or "
        "cifar-10-batches-bin/ (data_batch_1..5.bin, test_batch.bin)"
    )
    fix = (
        f"Download the CIFAR-10 python (or binary) version from {CIFAR_URL} and extract it into "
        f"{{dir}}. {DIGITS_HINT}"
    )
    data_dir = data_dir_or_raise(data_dir, "cifar10", "CIFAR-10", expected, fix)
    for directory in (data_dir, os.path.join(data_dir, "cifar-10-batches-py"),
                      os.path.join(data_dir, "cifar-10-batches-bin")):  # fmt: skip
        for fmt, suffix in (("py", ""), ("bin", ".bin")):
            names = [b + suffix for b in (*TRAIN_BATCHES, TEST_BATCH)]
            present = [n for n in names if os.path.isfile(os.path.join(directory, n))]
            if len(present) == len(names):
                return directory, fmt
            if present:
                missing = sorted(set(names) - set(present))
                raise MissingDataError(
                    f"CIFAR-10 batches missing in {directory!r}: {', '.join(missing)}. "
                    + fix.format(dir=repr(data_dir))
                )
    raise MissingDataError(
        f"no CIFAR-10 batches in {data_dir!r}: expected {expected}. "
        + fix.format(dir=repr(data_dir))
    )


def read_python_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one pickled batch: a dict with b"data" (N, 3072) uint8 and b"labels" (N ints).

    Returns:
      `(images (N, 32, 32, 3) uint8, labels (N,) int32)`.
    """
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: corrupt CIFAR-10 python batch ({e}). Download it again.") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with keys b'data' and b'labels', got {got}.")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(
            f"{path}: expected b'data' of shape (N, {_PIXELS}) uint8, "
            f"got {data.shape} {data.dtype}."
        )
    if labels.shape != (len(data),):
        raise DataError(f"{path}: expected {len(data)} labels, got {labels.shape}.")
    return _to_nhwc(data), _checked_labels(path, labels)


def read_binary_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one binary batch: records of 1 label byte + 3072 channel-major pixel bytes.

    Returns:
      `(images (N, 32, 32, 3) uint8, labels (N,) int32)`.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD:
        raise DataError(
            f"{path}: truncated or corrupt CIFAR-10 binary batch: expected a multiple of {_RECORD} "
            f"bytes (1 label + {_PIXELS} pixels per image), got {raw.size}. Download it again."
        )
    records = raw.reshape(-1, _RECORD)  # (N, 3073)
    return _to_nhwc(records[:, 1:]), _checked_labels(path, records[:, 0])


def _checked_labels(path: str, labels: np.ndarray) -> np.ndarray:
    """The labels as int32, or a DataError naming the file, the record and the value."""
    bad = np.flatnonzero((labels < 0) | (labels >= 10))
    if bad.size:
        raise DataError(
            f"{path}: record {int(bad[0])} has label {int(labels[bad[0]])}; CIFAR-10 labels lie in 0..9 "
            f"({bad.size} record(s) out of range). The file is corrupt or not a CIFAR-10 batch: "
            f"download it again.")
    return labels.astype(np.int32)


def _to_nhwc(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 3072) -> (N, 32, 32, 3)


def _class_names(directory: str, fmt: str) -> tuple[str, ...]:
    """Reads label names from batches.meta(.txt) when present; the standard names otherwise."""
    try:
        if fmt == "py":
            with open(os.path.join(directory, "batches.meta"), "rb") as f:
                meta = _NumpyOnlyUnpickler(f, encoding="bytes").load()
            names = tuple(n.decode() for n in meta[b"label_names"])
        else:
            with open(os.path.join(directory, "batches.meta.txt")) as f:
                names = tuple(line.strip() for line in f if line.strip())
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError):
        return CLASS_NAMES
    return names if len(names) == 10 else CLASS_NAMES


def load_cifar10(
    data_dir: str | os.PathLike | None, *, val_fraction: float = 0.1, seed: int = 0
) -> Splits:
    """Loads CIFAR-10: the official test batch, val carved from the five training batches.

    Args:
      data_dir: `cifar-10-batches-py` / `cifar-10-batches-bin` or the directory holding it.
      val_fraction: share of the 50,000 training images held out (default 5,000).
      seed: chooses the validation split (stratified by label).

    Returns:
      `Splits` with inputs (N, 32, 32, 3) float32 in [0, 1] and int32 labels 0..9.

    Raises:
      MissingDataError: batches missing. DataError: a batch is corrupt or truncated.
    """
    directory, fmt = find_cifar10_dir(data_dir)
    read, suffix = (read_python_batch, "") if fmt == "py" else (read_binary_batch, ".bin")

    def read_all(names):
        parts = [read(os.path.join(directory, name + suffix)) for name in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return {"inputs": images.astype(np.float32) / np.float32(255.0), "labels": labels}

    return make_splits(
        "cifar10",
        read_all(TRAIN_BATCHES),
        read_all([TEST_BATCH]),
        val_fraction=val_fraction,
        seed=seed,
        num_classes=10,
        class_names=_class_names(directory, fmt),
        info={"directory": directory, "format": fmt},
    )
