import os

import numpy as np
import pytest

import jnn.data as jd
from tests.data._formats import MNIST_FILES, idx_bytes, write_file, write_mnist


@pytest.mark.parametrize("gz", [False, True])
def test_reads_idx_files_exactly(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    splits = jd.load_mnist(tmp_path, val_fraction=0.2, seed=0)
    assert splits.train["inputs"].shape[1:] == (28, 28, 1)
    assert splits.train["inputs"].dtype == np.float32 and splits.train["labels"].dtype == np.int32
    np.testing.assert_array_equal(
        splits.test["inputs"][..., 0], arrays["test_images"] / np.float32(255)
    )
    np.testing.assert_array_equal(splits.test["labels"], arrays["test_labels"])
    # Train + val is a partition of the official train file.
    assert len(splits.train["labels"]) + len(splits.val["labels"]) == 30
    assert len(splits.val["labels"]) == 6
    train_val = np.concatenate([splits.train["inputs"], splits.val["inputs"]])
    got = sorted(map(bytes, (train_val * 255).round().astype(np.uint8)))
    assert got == sorted(map(bytes, arrays["train_images"][..., None]))


def test_read_idx_roundtrip_shape_and_dtype(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_file(tmp_path / "x-idx3-ubyte", idx_bytes(data), gz=True)
    np.testing.assert_array_equal(jd.read_idx(path), data)


def test_load_by_name_and_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    splits = jd.load("mnist", tmp_path, val_fraction=0.1)
    assert (len(splits.train["labels"]), len(splits.val["labels"]), len(splits.test["labels"])) == (
        27,
        3,
        10,
    )


@pytest.mark.parametrize("make_dir", [False, True])
def test_missing_or_empty_dir_says_what_and_where(tmp_path, make_dir):
    directory = tmp_path / "mnist"
    if make_dir:
        directory.mkdir()
    with pytest.raises(jd.MissingDataError) as e:
        jd.load("mnist", directory)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert str(directory) in msg and "http" in msg and "digits" in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_no_data_dir(tmp_path):
    with pytest.raises(jd.MissingDataError, match="data_dir"):
        jd.load("mnist")


def test_one_file_missing_is_named(tmp_path):
    write_mnist(tmp_path)
    os.remove(tmp_path / MNIST_FILES["test_labels"])
    with pytest.raises(jd.MissingDataError, match="t10k-labels-idx1-ubyte") as e:
        jd.load_mnist(tmp_path)
    assert "train-images-idx3-ubyte," not in str(e.value).split("expected")[0]


def test_truncated_file_names_file_and_sizes(tmp_path):
    write_mnist(tmp_path, n_train=10)
    path = tmp_path / MNIST_FILES["train_images"]
    path.write_bytes(path.read_bytes()[:123])
    with pytest.raises(jd.DataError) as e:
        jd.load_mnist(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "expected 7856 bytes for 10 28x28 images, got 123" in msg


def test_bad_magic_number(tmp_path):
    write_mnist(tmp_path)
    # A labels file where images are expected: valid IDX, wrong magic.
    labels = (tmp_path / MNIST_FILES["train_labels"]).read_bytes()
    (tmp_path / MNIST_FILES["train_images"]).write_bytes(labels)
    with pytest.raises(
        jd.DataError, match=r"bad magic number: expected 0x00000803, got 0x00000801"
    ):
        jd.load_mnist(tmp_path)


def test_corrupt_gzip_is_named(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / (MNIST_FILES["train_labels"] + ".gz")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(jd.DataError, match="corrupt gzip") as e:
        jd.load_mnist(tmp_path)
    assert str(path) in str(e.value)


def test_count_mismatch_between_images_and_labels(tmp_path):
    write_mnist(tmp_path, n_train=20)
    write_file(tmp_path / MNIST_FILES["train_labels"], idx_bytes(np.zeros(19, np.uint8)), gz=False)
    with pytest.raises(jd.DataError, match="20 images but .* 19 labels"):
        jd.load_mnist(tmp_path)


def test_labels_out_of_range(tmp_path):
    write_mnist(tmp_path)
    write_file(
        tmp_path / MNIST_FILES["test_labels"], idx_bytes(np.full(10, 12, np.uint8)), gz=False
    )
    with pytest.raises(jd.DataError, match="out of range"):
        jd.load_mnist(tmp_path)
