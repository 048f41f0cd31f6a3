"""digits, synthetic and text sources, the npz reader, and the `load` entry point."""

import numpy as np
import pytest

import jnn.data as jd


def _rows(arrays):
    return [bytes(row) for row in arrays["inputs"]]


def test_digits_shapes_range_and_partition():
    splits = jd.load("digits", val_fraction=0.1, seed=0)
    assert splits.input_shape == (8, 8, 1) and splits.num_classes == 10
    assert splits.train["inputs"].dtype == np.float32 and splits.train["labels"].dtype == np.int32
    sizes = [len(splits.split(s)["labels"]) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes[2] == 359 and sizes[1] == 144
    everything = np.concatenate([splits.split(s)["inputs"] for s in ("train", "val", "test")])
    assert everything.min() == 0.0 and everything.max() == 1.0
    # train + val + test is exactly the data set (as a multiset: digits has duplicate images).
    from sklearn.datasets import load_digits

    full = (load_digits().images / 16.0).astype(np.float32)[..., None]
    assert sorted(map(bytes, everything)) == sorted(map(bytes, full))


def test_digits_splits_are_stratified_deterministic_and_test_is_fixed():
    a, b = jd.load_digits(seed=0), jd.load_digits(seed=0)
    c = jd.load_digits(seed=1)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split(split)["inputs"], b.split(split)["inputs"])
    np.testing.assert_array_equal(a.test["inputs"], c.test["inputs"])  # test never moves
    assert _rows(a.val) != _rows(c.val)  # val follows the seed
    counts = np.bincount(a.test["labels"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~20% of each class (~180 per class)


def test_split_indices_disjoint_and_covering():
    labels = np.arange(100) % 7
    kept, held = jd._splits.split_indices(labels, 0.3, seed=3)
    assert len(np.intersect1d(kept, held)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(100))
    kept2, held2 = jd._splits.split_indices(labels, 0.3, seed=3)
    np.testing.assert_array_equal(held, held2)


@pytest.mark.parametrize("case", [
    ("digits-test", None, 0.2, 0), ("digits-val", None, 0.1, 0), ("digits-val", None, 0.1, 7),
    ("uneven", [50, 3, 17, 2, 90, 11], 0.25, 1),  # remainder ties broken by the rng
    ("ties", [5, 5, 5, 5, 4], 0.3, 2), ("two", [40, 2], 0.1, 3),
    ("unstratifiable", [30, 1], 0.2, 4),  # a class of 1: plain shuffle split
    ("sequences", None, 0.2, 5),
])
def test_split_indices_equal_scikit_learn(case):
    """The split reproduces scikit-learn's `train_test_split` draw for draw (no sklearn import)."""
    from sklearn.model_selection import train_test_split

    name, counts, fraction, seed = case
    if name.startswith("digits"):
        labels = jd._digits._read_bundled()[1].astype(np.int32)
        if name == "digits-val":
            labels = labels[jd._splits.split_indices(labels, 0.2, 0)[0]]
    elif name == "sequences":
        labels = np.random.RandomState(0).randint(0, 5, size=(60, 8))
    else:
        labels = np.random.RandomState(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    kept, held = jd._splits.split_indices(labels, fraction, seed)
    indices = np.arange(len(labels))
    stratify = labels if name not in ("unstratifiable", "sequences") else None
    want_kept, want_held = train_test_split(indices, test_size=len(held), random_state=seed, stratify=stratify)
    np.testing.assert_array_equal(held, np.sort(want_held))
    np.testing.assert_array_equal(kept, np.sort(want_kept))


def test_zero_val_fraction_gives_empty_val():
    splits = jd.load("digits", val_fraction=0.0)
    assert splits.val["inputs"].shape == (0, 8, 8, 1)


def test_synthetic_is_deterministic_by_seed():
    a = jd.synthetic_arrays(16, (28, 28, 1), 10, seed=5)
    b = jd.synthetic_arrays(16, (28, 28, 1), 10, seed=5)
    c = jd.synthetic_arrays(16, (28, 28, 1), 10, seed=6)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])
    assert a["inputs"].shape == (16, 28, 28, 1) and a["labels"].dtype == np.int32
    tokens = jd.synthetic_arrays(4, (12,), 50, dtype="int32", label_shape=(12,))
    assert tokens["inputs"].dtype == np.int32 and tokens["labels"].shape == (4, 12)
    assert tokens["inputs"].max() < 50


def test_load_synthetic_by_name():
    splits = jd.load("synthetic", input_shape=(4, 4, 3), num_examples=100, num_test=20, seed=1)
    assert splits.input_shape == (4, 4, 3)
    assert [len(splits.split(s)["labels"]) for s in ("train", "val", "test")] == [90, 10, 20]


def test_npz_inputs_labels_keys(tmp_path):
    x = np.random.default_rng(0).random((50, 3), dtype=np.float32)
    y = np.arange(50) % 5
    np.savez(tmp_path / "d.npz", inputs=x, labels=y)
    splits = jd.load(f"npz:{tmp_path / 'd.npz'}", val_fraction=0.2)
    assert splits.num_classes == 5 and splits.input_shape == (3,)
    assert [len(splits.split(s)["labels"]) for s in ("train", "val", "test")] == [32, 8, 10]
    got = np.concatenate([splits.split(s)["inputs"] for s in ("train", "val", "test")])
    assert sorted(map(bytes, got)) == sorted(map(bytes, x))


def test_npz_x_y_with_test_and_uint8_images(tmp_path):
    rng = np.random.default_rng(0)
    x, xt = (
        rng.integers(0, 256, (20, 4, 4, 1), dtype=np.uint8),
        rng.integers(0, 256, (6, 4, 4, 1), dtype=np.uint8),
    )
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 4, x_test=xt, y_test=np.arange(6) % 4)
    splits = jd.load("npz", tmp_path / "d.npz", val_fraction=0.25)
    np.testing.assert_array_equal(splits.test["inputs"], xt / np.float32(255))
    assert splits.train["inputs"].dtype == np.float32 and len(splits.val["labels"]) == 5


def test_npz_user_keys_and_val_arrays(tmp_path):
    np.savez(
        tmp_path / "d.npz",
        feats=np.ones((10, 2)), targets=np.arange(10) % 2,
        feats_val=np.zeros((3, 2)), targets_val=np.array([0, 1, 0]),
        feats_test=np.zeros((4, 2)), targets_test=np.array([1, 1, 0, 0]),
    )  # fmt: skip
    splits = jd.load_npz(tmp_path / "d.npz", inputs_key="feats", labels_key="targets")
    assert [len(splits.split(s)["labels"]) for s in ("train", "val", "test")] == [10, 3, 4]


def test_npz_labels_out_of_range(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 2)), labels=np.array([0, 1, 2, 7]))
    with pytest.raises(
        jd.DataError, match=r"labels out of range: expected labels in \[0, 5\), got min 0 and max 7"
    ):
        jd.load_npz(tmp_path / "d.npz", num_classes=5)
    np.savez(tmp_path / "n.npz", inputs=np.zeros((4, 2)), labels=np.array([0, -1, 2, 1]))
    with pytest.raises(jd.DataError, match="out of range"):
        jd.load_npz(tmp_path / "n.npz")


def test_npz_bad_inputs(tmp_path):
    np.savez(tmp_path / "f.npz", inputs=np.zeros((4, 2)), labels=np.array([0.0, 1.5, 2.0, 1.0]))
    with pytest.raises(jd.DataError, match="expected integer class labels, got dtype float64"):
        jd.load_npz(tmp_path / "f.npz")
    np.savez(tmp_path / "m.npz", inputs=np.zeros((4, 2)), labels=np.array([0, 1, 2]))
    with pytest.raises(jd.DataError, match="4 inputs and 3 labels"):
        jd.load_npz(tmp_path / "m.npz")
    np.savez(tmp_path / "k.npz", a=np.zeros((4, 2)), b=np.array([0, 1, 2, 3]))
    with pytest.raises(jd.DataError, match="inputs_key"):
        jd.load_npz(tmp_path / "k.npz")
    with pytest.raises(jd.MissingDataError, match="does not exist"):
        jd.load_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(jd.DataError, match="junk.npz"):
        jd.load_npz(tmp_path / "junk.npz")


def test_text_file_tokens_and_next_token_labels(tmp_path):
    text = "hello world, " * 40
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    splits = jd.load("text", path, seq_len=8, val_fraction=0.1)
    vocab = splits.info["vocab"]
    assert vocab == "".join(sorted(set(text))) and splits.num_classes == len(vocab)
    x, y = splits.train["inputs"], splits.train["labels"]
    assert x.shape[1:] == (8,) and x.dtype == np.int32 and y.shape == x.shape
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # labels are inputs shifted by one
    assert jd.decode_text(x[0], vocab) == text[:8]
    assert jd.decode_text(y[0], vocab) == text[1:9]
    np.testing.assert_array_equal(jd.encode_text("hello", vocab), x[0, :5])
    with pytest.raises(jd.DataError, match="outside the vocabulary"):
        jd.encode_text("Z", vocab)


def test_text_defaults_to_stdlib_source_deterministically():
    a = jd.load_text(seq_len=32, max_chars=20_000)
    b = jd.load("text", seq_len=32, max_chars=20_000)
    assert a.info["num_chars"] == 20_000 and a.info["files"][0].endswith(".py")
    np.testing.assert_array_equal(a.train["inputs"], b.train["inputs"])
    assert len(a.test["inputs"]) == (2000 - 1) // 32


def test_text_errors(tmp_path):
    with pytest.raises(jd.MissingDataError):
        jd.load_text(tmp_path / "nope.txt")
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(jd.DataError, match="too short"):
        jd.load_text(tmp_path / "short.txt", seq_len=8)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc" * 100)
    with pytest.raises(jd.DataError, match="UTF-8"):
        jd.load_text(tmp_path / "bin.txt")


def test_load_rejects_unknown_names_and_options(tmp_path):
    with pytest.raises(jd.DataError, match="unknown data set 'imagenet'; expected one of digits"):
        jd.load("imagenet")
    with pytest.raises(jd.DataError, match=r"digits does not take option\(s\) \['seq_len'\]"):
        jd.load("digits", seq_len=3)
    with pytest.raises(jd.DataError, match="reads no files"):
        jd.load("digits", tmp_path)
    with pytest.raises(jd.DataError, match="npz needs a file"):
        jd.load("npz")


def test_digits_file_read_directly_equals_sklearn_load_digits():
    from sklearn.datasets import load_digits as sk_load_digits

    from jnn.data._digits import _read_bundled

    pixels, target, source = _read_bundled()
    bunch = sk_load_digits()
    assert source.endswith("digits.csv.gz")
    np.testing.assert_array_equal(pixels, bunch.data)
    np.testing.assert_array_equal(target, bunch.target)
