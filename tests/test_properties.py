"""Property-based tests (hypothesis) of the losses, metrics, masks and the step's shape rules.

CI runs them derandomised (the "ci" profile in tests/conftest.py), so a failure reproduces.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

import jnn
from jnn.train import step as step_lib
from tests import tolerances as tol

finite = st.floats(-20, 20, allow_nan=False, width=32)


@st.composite
def logits_and_labels(draw):
    # Two sizes each: every new shape compiles the ops again, and values are what vary here.
    classes = draw(st.sampled_from([2, 7]))
    batch = draw(st.sampled_from([1, 9]))
    logits = draw(arrays(np.float32, (batch, classes), elements=finite))
    labels = draw(arrays(np.int32, (batch,), elements=st.integers(0, classes - 1)))
    return logits, labels


@given(logits_and_labels(), st.floats(0.0, 0.9))
def test_cross_entropy_is_non_negative_and_matches_its_one_hot_form(data, smoothing):
    logits, labels = data
    ids = np.asarray(jnn.losses.cross_entropy(logits, labels, label_smoothing=smoothing))
    one_hot = np.eye(logits.shape[1], dtype=np.float32)[labels]
    dense = np.asarray(jnn.losses.cross_entropy(logits, one_hot, label_smoothing=smoothing))
    assert ids.shape == labels.shape and np.all(ids >= -tol.F32_REFERENCE_ATOL)
    np.testing.assert_allclose(ids, dense, rtol=tol.F32_RTOL, atol=tol.F32_ATOL)


@given(logits_and_labels(), st.data())
def test_masked_mean_is_the_weighted_mean_of_the_kept_examples(data, draw):
    logits, labels = data
    mask = draw.draw(arrays(np.float32, labels.shape, elements=st.sampled_from([0.0, 1.0])))
    losses = np.asarray(jnn.losses.cross_entropy(logits, labels))
    got = float(jnn.losses.masked_mean(losses, mask))
    want = losses[mask > 0].mean() if mask.sum() else 0.0
    np.testing.assert_allclose(got, want, rtol=tol.F32_RTOL, atol=tol.F32_ATOL)


@given(logits_and_labels(), st.data())
def test_weighted_sum_ignores_nan_in_padding(data, draw):
    logits, labels = data
    mask = draw.draw(arrays(np.float32, labels.shape, elements=st.sampled_from([0.0, 1.0])))
    losses = np.asarray(jnn.losses.cross_entropy(logits, labels)).copy()
    clean_sum, clean_weight = step_lib._weighted_sum(jnp.asarray(losses), jnp.asarray(mask))
    losses[mask == 0] = np.nan
    total, weight = step_lib._weighted_sum(jnp.asarray(losses), jnp.asarray(mask))
    assert float(weight) == float(clean_weight) == float(mask.sum())
    np.testing.assert_allclose(float(total), float(clean_sum), rtol=tol.F32_RTOL, atol=tol.F32_ATOL)


@given(logits_and_labels())
def test_accuracy_top_k_and_confusion_agree(data):
    logits, labels = data
    classes = logits.shape[1]
    accuracy = float(jnn.metrics.accuracy(logits, labels))
    top = [float(jnn.metrics.top_k_accuracy(logits, labels, k=k)) for k in range(1, classes + 1)]
    confusion = np.asarray(jnn.metrics.confusion_matrix(jnp.argmax(logits, -1), labels, classes))
    assert 0.0 <= accuracy <= 1.0 and top[-1] == 1.0
    assert all(a <= b + 1e-7 for a, b in zip(top, top[1:]))  # more guesses never hurt
    assert confusion.sum() == len(labels)
    np.testing.assert_allclose(np.trace(confusion) / len(labels), accuracy, rtol=tol.F32_RTOL)


@given(st.integers(1, 9), st.integers(1, 9))
def test_pad_batch_keeps_every_example_and_masks_the_rest(n, extra):
    batch = {"inputs": (np.arange(n * 2, dtype=np.float32).reshape(n, 2), np.arange(n)),
             "labels": np.arange(n, dtype=np.int32)}
    padded = jnn.pad_batch(batch, n + extra)
    assert padded["mask"].tolist() == [1.0] * n + [0.0] * extra
    np.testing.assert_array_equal(padded["inputs"][0][:n], batch["inputs"][0])
    assert padded["inputs"][1].shape == (n + extra,) and padded["labels"].shape == (n + extra,)


@given(st.integers(1, 6), st.integers(1, 4), st.integers(2, 5))
def test_check_batch_accepts_exactly_the_initialised_shape(batch, features, classes):
    state = jnn.abstract_train_state(jnn.models.MLP(hidden_sizes=(4,), num_classes=classes), optax.sgd(0.1),
                                     np.zeros((1, features), np.float32), 0)
    good = {"inputs": np.zeros((batch, features), np.float32), "labels": np.zeros(batch, np.int32)}
    jnn.check_batch(state, good)
    for bad in ({**good, "inputs": np.zeros((batch, features + 1), np.float32)},
                {**good, "labels": np.zeros((batch, 1), np.int32)},
                {**good, "labels": np.zeros(batch + 1, np.int32)},
                {**good, "labels": np.full(batch, classes, np.int32)}):
        try:
            jnn.check_batch(state, bad)
        except ValueError as err:
            assert "Fix" in str(err) or "expected" in str(err)
        else:
            raise AssertionError(f"check_batch accepted {jax.tree.map(np.shape, bad)}")
