"""Writers of tiny data sets in the exact on-disk formats jnn.data reads (IDX, CIFAR-10 batches)."""

import gzip
import os
import pickle

import numpy as np

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian uint32 dims, data."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.tobytes()


def write_file(path, data: bytes, gz: bool) -> str:
    path = os.fspath(path) + (".gz" if gz else "")
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return path


def write_mnist(directory, *, n_train=30, n_test=10, gz=False, seed=0):
    """Writes the four MNIST IDX files; returns the uint8 arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    os.makedirs(directory, exist_ok=True)
    for key, name in MNIST_FILES.items():
        write_file(os.path.join(directory, name), idx_bytes(arrays[key]), gz)
    return arrays


def _cifar_arrays(num_batches, per_batch, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_batches, per_batch, 3072), dtype=np.uint8)  # channel-major
    labels = rng.integers(0, 10, (num_batches, per_batch)).astype(np.uint8)
    return images, labels


def write_cifar_python(directory, *, per_batch=4, seed=0):
    """Writes cifar-10-batches-py with 5 train batches + test_batch; returns (images, labels)."""
    os.makedirs(directory, exist_ok=True)
    images, labels = _cifar_arrays(6, per_batch, seed)
    for i, name in enumerate([*CIFAR_TRAIN, "test_batch"]):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(y) for y in labels[i]],
            b"data": images[i],
            b"filenames": [f"{name}_{j}.png".encode() for j in range(per_batch)],
        }
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {b"label_names": [f"class{c}".encode() for c in range(10)], b"num_vis": 3072}
    with open(os.path.join(directory, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return images, labels


def write_cifar_binary(directory, *, per_batch=4, seed=0):
    """Writes cifar-10-batches-bin: records of 1 label byte + 3072 pixel bytes."""
    os.makedirs(directory, exist_ok=True)
    images, labels = _cifar_arrays(6, per_batch, seed)
    for i, name in enumerate([*CIFAR_TRAIN, "test_batch"]):
        records = np.concatenate([labels[i][:, None], images[i]], axis=1)  # (N, 3073)
        records.tofile(os.path.join(directory, name + ".bin"))
    return images, labels


def to_nhwc(images):
    """(..., 3072) channel-major uint8 -> (N, 32, 32, 3) float32 in [0, 1], as jnn.data returns."""
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
