import numpy as np
import pytest

import jnn.data as jd
from tests import tolerances as tol


def _batch(b=8, h=6, w=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.random((b, h, w, c), dtype=np.float32),
        "labels": np.arange(b, dtype=np.int32) % 4,
    }


def test_flip_is_a_left_right_flip_or_identity():
    batch = _batch()
    out = jd.RandomFlip()(batch, np.random.default_rng(1))["inputs"]
    assert out.shape == batch["inputs"].shape
    flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, batch["inputs"])]
    kept = [np.array_equal(o, x) for o, x in zip(out, batch["inputs"])]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    always = jd.RandomFlip(p=1.0)(batch, np.random.default_rng(1))["inputs"]
    np.testing.assert_array_equal(always, batch["inputs"][:, :, ::-1])


def test_crop_with_padding_is_a_shift_that_keeps_content():
    batch = _batch(b=16, h=8, w=8, c=1)
    p = 2
    out = jd.RandomCrop(padding=p)(batch, np.random.default_rng(0))["inputs"]
    assert out.shape == batch["inputs"].shape and out.dtype == np.float32
    padded = np.pad(batch["inputs"], ((0, 0), (p, p), (p, p), (0, 0)))
    shifts = set()
    for i in range(16):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if np.array_equal(out[i], padded[i, dy : dy + 8, dx : dx + 8])
        ]
        assert matches, f"example {i} is not a crop of its padded image"
        shifts.update(matches)
    assert len(shifts) > 1  # offsets vary across the batch


def test_crop_reflect_mode_and_zero_padding_is_identity():
    batch = _batch()
    same = jd.RandomCrop(padding=0)(batch, np.random.default_rng(0))["inputs"]
    np.testing.assert_array_equal(same, batch["inputs"])
    out = jd.RandomCrop(padding=2, mode="reflect")(batch, np.random.default_rng(0))["inputs"]
    assert out.shape == batch["inputs"].shape


def test_augmentations_are_deterministic_by_rng_seed():
    batch = _batch(b=32)
    aug = jd.Compose((jd.RandomCrop(padding=2), jd.RandomFlip()))
    a = aug(batch, np.random.default_rng(7))["inputs"]
    b = aug(batch, np.random.default_rng(7))["inputs"]
    c = aug(batch, np.random.default_rng(8))["inputs"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_normalize_per_channel_with_channel_stats():
    batch = _batch(b=64)
    mean, std = jd.channel_stats(batch["inputs"])
    assert mean.shape == (3,) and std.shape == (3,)
    out = jd.Normalize(mean, std)(batch)["inputs"]
    assert out.dtype == np.float32 and out.shape == batch["inputs"].shape
    reference = (batch["inputs"].astype(np.float64) - mean) / std  # per channel, last axis
    np.testing.assert_allclose(out, reference, rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    np.testing.assert_allclose(reference.reshape(-1, 3).mean(0), 0.0, atol=tol.F32_REFERENCE_ATOL)
    with pytest.raises(jd.DataError, match="3 channel means, got inputs with 1 channels"):
        jd.Normalize((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))(_batch(c=1))
    with pytest.raises(jd.DataError, match="positive stds"):
        jd.Normalize((0.1,), (0.0,))


def test_mixup_gives_soft_one_hot_labels():
    batch = _batch(b=16)
    out = jd.Mixup(num_classes=4, alpha=0.4)(batch, np.random.default_rng(0))
    labels = out["labels"]
    assert labels.shape == (16, 4) and labels.dtype == np.float32
    np.testing.assert_allclose(labels.sum(1), 1.0, rtol=tol.F32_REORDER_RTOL)
    assert out["inputs"].shape == batch["inputs"].shape and out["inputs"].dtype == np.float32
    with pytest.raises(jd.DataError, match="Mixup expects labels"):
        jd.Mixup(num_classes=3)(
            {"inputs": batch["inputs"], "labels": np.zeros((16, 5))}, np.random.default_rng(0)
        )


def test_image_augmentations_reject_non_image_batches():
    with pytest.raises(
        jd.DataError,
        match=r"RandomCrop expects image batches \(B, H, W, C\), got inputs of shape \(4, 3\)",
    ):
        jd.RandomCrop()(
            {"inputs": np.zeros((4, 3)), "labels": np.zeros(4)}, np.random.default_rng(0)
        )
