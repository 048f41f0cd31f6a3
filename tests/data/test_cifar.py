import os
import pickle

import numpy as np
import pytest

import jnn.data as jd
from tests.data._formats import to_nhwc, write_cifar_binary, write_cifar_python


@pytest.mark.parametrize("layout", ["py-dir", "py-parent", "bin-dir", "bin-parent"])
def test_reads_batches_exactly(tmp_path, layout):
    fmt, where = layout.split("-")
    child = tmp_path / f"cifar-10-batches-{fmt}"
    write = write_cifar_python if fmt == "py" else write_cifar_binary
    images, labels = write(child, per_batch=4)
    splits = jd.load("cifar10", child if where == "dir" else tmp_path, val_fraction=0.25)
    assert splits.input_shape == (32, 32, 3) and splits.num_classes == 10
    np.testing.assert_array_equal(splits.test["inputs"], to_nhwc(images[5]))
    np.testing.assert_array_equal(splits.test["labels"], labels[5])
    assert len(splits.train["labels"]) == 15 and len(splits.val["labels"]) == 5
    # Train + val together are exactly the five training batches.
    got = np.concatenate([splits.train["inputs"], splits.val["inputs"]])
    want = to_nhwc(images[:5])
    assert sorted(map(bytes, got)) == sorted(map(bytes, want))
    if fmt == "py":
        assert splits.class_names[0] == "class0"  # read from batches.meta
    else:
        assert splits.class_names[0] == "airplane"


def test_nhwc_layout_is_channel_major_source(tmp_path):
    images, _ = write_cifar_binary(tmp_path, per_batch=1)
    test = jd.load_cifar10(tmp_path).test["inputs"][0]
    # Byte 0 of the record's pixels is red (0, 0); byte 1024 is green (0, 0); byte 33 is red (1, 1).
    assert test[0, 0, 0] == images[5, 0, 0] / np.float32(255)
    assert test[0, 0, 1] == images[5, 0, 1024] / np.float32(255)
    assert test[1, 1, 0] == images[5, 0, 33] / np.float32(255)


@pytest.mark.parametrize("make_dir", [False, True])
def test_missing_or_empty_dir(tmp_path, make_dir):
    directory = tmp_path / "cifar"
    if make_dir:
        directory.mkdir()
    with pytest.raises(jd.MissingDataError) as e:
        jd.load_cifar10(directory)
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "test_batch" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg and "digits" in msg
    assert str(directory) in msg


def test_missing_batch_is_named(tmp_path):
    write_cifar_python(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(jd.MissingDataError, match="data_batch_3"):
        jd.load_cifar10(tmp_path)


def test_truncated_binary_batch(tmp_path):
    write_cifar_binary(tmp_path, per_batch=2)
    path = tmp_path / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(jd.DataError) as e:
        jd.load_cifar10(tmp_path)
    assert str(path) in str(e.value) and "multiple of 3073 bytes" in str(e.value)
    assert "got 5000" in str(e.value)


def test_corrupt_python_batch(tmp_path):
    write_cifar_python(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(jd.DataError, match="corrupt CIFAR-10 python batch") as e:
        jd.load_cifar10(tmp_path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("layout", ["python", "binary"])
def test_an_out_of_range_label_names_the_file_and_the_record(tmp_path, layout):
    if layout == "python":
        write_cifar_python(tmp_path)
        path = tmp_path / "data_batch_4"
        with open(path, "rb") as f:
            batch = pickle.load(f)
        batch[b"labels"][2] = 12
        with open(path, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    else:
        write_cifar_binary(tmp_path)
        path = tmp_path / "data_batch_4.bin"
        raw = bytearray(path.read_bytes())
        raw[2 * 3073] = 12  # the label byte of record 2
        path.write_bytes(bytes(raw))
    with pytest.raises(jd.DataError, match=r"record 2 has label 12; CIFAR-10 labels lie in 0..9") as e:
        jd.load_cifar10(tmp_path)
    assert str(path) in str(e.value)


def test_wrong_data_shape(tmp_path):
    write_cifar_python(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(
        jd.DataError, match=r"expected b'data' of shape \(N, 3072\) uint8, got \(2, 100\)"
    ):
        jd.load_cifar10(tmp_path)


def test_pickle_cannot_run_code(tmp_path):
    write_cifar_python(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(jd.DataError, match="refusing to load"):
        jd.load_cifar10(tmp_path)
