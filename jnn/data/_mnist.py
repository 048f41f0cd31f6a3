"""MNIST from a local directory of the four standard IDX files (gzipped or not)."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from jnn.data._errors import DIGITS_HINT, DataError, MissingDataError, data_dir_or_raise
from jnn.data._splits import Splits, make_splits

# IDX magic number: two zero bytes, a type code, and the number of dimensions.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims (N, rows, cols)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim (N,)

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_URL = (
    "https://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"
)
# Layouts other tools leave behind; the directory given is searched first.
_SUBDIRS = ("", "mnist", "MNIST", os.path.join("MNIST", "raw"))


def read_idx(path: str, expected_magic: int | None = None) -> np.ndarray:
    """Reads one IDX file (optionally gzipped) into an array of its declared shape.

    Args:
      path: the file; names ending in ".gz" are decompressed.
      expected_magic: if given, the file's magic number must equal it (e.g. `IMAGES_MAGIC`).

    Returns:
      The array, in native byte order.

    Raises:
      DataError: bad magic number, unknown type code, or a size that disagrees with the header.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(
            f"{path}: truncated IDX file: expected a 4-byte magic number, got {len(raw)} bytes."
        )
    magic = int.from_bytes(raw[:4], "big")
    zeros, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{path}: bad magic number: expected 0x{expected_magic:08X}, got 0x{magic:08X}. "
            "Is this the right file, and decompressed only once?"
        )
    if zeros != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: bad magic number 0x{magic:08X}: not an IDX file.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header: expected {header} bytes, got {len(raw)}.")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        shape = "x".join(str(d) for d in dims[1:])
        what = f"{dims[0]} {shape} images" if shape else f"{dims[0]} labels"
        raise DataError(
            f"{path}: truncated or corrupt IDX file: expected {expected} bytes for {what}, "
            f"got {len(raw)}. Download it again."
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip file ({e}). Download it again.") from e


def find_mnist_files(data_dir: str | os.PathLike | None) -> dict[str, str]:
    """Finds the four MNIST IDX files in `data_dir` (or its mnist/, MNIST/raw/ subfolders).

    Each file may be raw or gzipped, and named with "-idx" or ".idx" (both spellings circulate).

    Returns:
      `{"train_images": path, "train_labels": path, "test_images": path, "test_labels": path}`.

    Raises:
      MissingDataError: the directory or some files are missing; says which and where to get them.
    """
    expected = ", ".join(f"{name}[.gz]" for name in FILES.values())
    fix = f"Download MNIST's four IDX files from {MNIST_URL} into {{dir}}. {DIGITS_HINT}"
    data_dir = data_dir_or_raise(data_dir, "mnist", "MNIST", expected, fix)
    found, missing = {}, []
    for key, base in FILES.items():
        names = (
            base,
            base + ".gz",
            base.replace("-idx", ".idx"),
            base.replace("-idx", ".idx") + ".gz",
        )
        paths = [os.path.join(data_dir, sub, n) for sub in _SUBDIRS for n in names]
        path = next((p for p in paths if os.path.isfile(p)), None)
        if path is None:
            missing.append(base)
        else:
            found[key] = path
    if missing:
        raise MissingDataError(
            f"MNIST files missing in {data_dir!r}: {', '.join(missing)} (each raw or .gz); "
            f"expected {expected}. " + fix.format(dir=repr(data_dir))
        )
    return found


def load_mnist(
    data_dir: str | os.PathLike | None, *, val_fraction: float = 1 / 12, seed: int = 0
) -> Splits:
    """Loads MNIST from its IDX files: the official test split, val carved from train.

    Args:
      data_dir: directory holding the four IDX files (see `find_mnist_files`).
      val_fraction: share of the 60,000 training images held out (default 5,000).
      seed: chooses the validation split (stratified by label).

    Returns:
      `Splits` with inputs (N, 28, 28, 1) float32 in [0, 1] and int32 labels 0..9.

    Raises:
      MissingDataError: files missing. DataError: a file is corrupt or the pair sizes disagree.
    """
    paths = find_mnist_files(data_dir)
    parts = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], IMAGES_MAGIC)
        labels = read_idx(paths[f"{split}_labels"], LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(
                f"MNIST {split}: {paths[f'{split}_images']} holds {len(images)} images but "
                f"{paths[f'{split}_labels']} holds {len(labels)} labels; expected equal counts."
            )
        inputs = (images.astype(np.float32) / 255.0)[..., None]  # (N, 28, 28, 1)
        parts[split] = {"inputs": inputs, "labels": labels.astype(np.int32)}
    return make_splits(
        "mnist",
        parts["train"],
        parts["test"],
        val_fraction=val_fraction,
        seed=seed,
        num_classes=10,
        info={"files": paths},
    )
