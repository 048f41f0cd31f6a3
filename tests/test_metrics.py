"""Metrics against scikit-learn, and accumulation over batches equal to one pass over all data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from jnn import metrics
from tests import tolerances as tol

C = 6


def _preds(n=200, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, C)).astype(np.float32)
    labels = rng.integers(0, C, n).astype(np.int32)
    labels[:n // 2] = logits[:n // 2].argmax(-1)  # make it better than chance, unevenly per class
    return logits, labels


def test_accuracy_and_top_k_match_sklearn():
    logits, labels = _preds()
    np.testing.assert_allclose(metrics.accuracy(logits, labels), skm.accuracy_score(labels, logits.argmax(-1)),
                               atol=tol.F32_REFERENCE_ATOL)
    for k in (1, 2, 3):
        np.testing.assert_allclose(metrics.top_k_accuracy(logits, labels, k),
                                   skm.top_k_accuracy_score(labels, logits, k=k, labels=range(C)),
                                   atol=tol.F32_REFERENCE_ATOL)
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        metrics.top_k_accuracy(logits, labels, 7)


@pytest.mark.parametrize("where", ["device", "host"])
def test_confusion_matrix_and_report_match_sklearn(where):
    logits, labels = _preds()
    preds = logits.argmax(-1)
    confusion = jax.jit(metrics.confusion_matrix, static_argnums=2)(preds, labels, C)
    np.testing.assert_array_equal(confusion, skm.confusion_matrix(labels, preds, labels=range(C)))
    if where == "device":  # jax.numpy, traced under jit
        report = jax.jit(metrics.classification_report)(confusion)
    else:  # numpy in, numpy out: what `evaluate` uses, no compile
        report = metrics.classification_report(np.asarray(confusion))
        assert isinstance(report["f1"], np.ndarray) and isinstance(report["macro_avg"]["f1"], np.floating)
    expected = skm.classification_report(labels, preds, output_dict=True, zero_division=0)
    for c in range(C):
        row = expected[str(c)]
        np.testing.assert_allclose(report["precision"][c], row["precision"], atol=tol.F32_REFERENCE_ATOL)
        np.testing.assert_allclose(report["recall"][c], row["recall"], atol=tol.F32_REFERENCE_ATOL)
        np.testing.assert_allclose(report["f1"][c], row["f1-score"], atol=tol.F32_REFERENCE_ATOL)
        assert int(report["support"][c]) == row["support"]
    np.testing.assert_allclose(report["accuracy"], expected["accuracy"], atol=tol.F32_REFERENCE_ATOL)
    for ours, theirs in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        for key, sk_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            np.testing.assert_allclose(report[ours][key], expected[theirs][sk_key], atol=tol.F32_REFERENCE_ATOL)
    text = metrics.format_report(report, digits=2)
    sk_text = skm.classification_report(labels, preds, zero_division=0, digits=2)
    assert [line.split() for line in text.splitlines()] == [line.split() for line in sk_text.splitlines()]


def test_report_with_an_absent_class_uses_zero_division_zero():
    labels = np.array([0, 0, 1, 1])
    preds = np.array([0, 1, 1, 1])
    confusion = metrics.confusion_matrix(preds, labels, 3)
    expected = skm.classification_report(labels, preds, labels=[0, 1, 2], output_dict=True, zero_division=0)
    for report in (metrics.classification_report(confusion), metrics.classification_report(np.asarray(confusion))):
        np.testing.assert_allclose(report["f1"], [expected[str(c)]["f1-score"] for c in range(3)],
                                   atol=tol.F32_REFERENCE_ATOL)
        np.testing.assert_allclose(report["precision"][2], 0.0)


def test_accumulated_over_batches_equals_concatenated():
    logits, labels = _preds(n=203)
    mask_all = np.ones(203, np.float32)

    @jax.jit
    def accumulate(acc, logits, labels, mask):
        batch = {
            "accuracy": metrics.Average.from_values(logits.argmax(-1) == labels, mask),
            "confusion": metrics.ConfusionMatrix.from_predictions(logits.argmax(-1), labels, C, mask),
        }
        return metrics.merge(acc, batch)

    zero = {"accuracy": metrics.Average(jnp.zeros(()), jnp.zeros(())),
            "confusion": metrics.ConfusionMatrix(jnp.zeros((C, C), jnp.int32))}
    acc = zero
    for start in range(0, 203, 32):
        sl = slice(start, start + 32)
        n = len(labels[sl])
        pad = 32 - n  # padded last batch with a zero mask, so shapes (and the compiled fn) stay the same
        acc = accumulate(acc, np.pad(logits[sl], ((0, pad), (0, 0))), np.pad(labels[sl], (0, pad)),
                         np.pad(mask_all[sl], (0, pad)))
    whole = accumulate(zero, logits, labels, mask_all)
    got, want = metrics.compute(acc), metrics.compute(whole)
    np.testing.assert_allclose(got["accuracy"], want["accuracy"], rtol=tol.F32_REORDER_RTOL)
    np.testing.assert_array_equal(got["confusion"], want["confusion"])
    np.testing.assert_allclose(got["accuracy"], skm.accuracy_score(labels, logits.argmax(-1)),
                               atol=tol.F32_REFERENCE_ATOL)


def test_accumulators_psum_across_devices():
    logits, labels = _preds(n=8 * 16)
    n = jax.local_device_count()

    def per_device(lg, lb):
        return jax.lax.psum({"acc": metrics.Average.from_values(lg.argmax(-1) == lb),
                             "cm": metrics.ConfusionMatrix.from_predictions(lg.argmax(-1), lb, C)}, "d")

    out = jax.pmap(per_device, axis_name="d")(logits.reshape(n, -1, C), labels.reshape(n, -1))
    first = jax.tree.map(lambda a: a.addressable_shards[0].data[0], out)
    got = metrics.compute(first)
    np.testing.assert_allclose(got["acc"], skm.accuracy_score(labels, logits.argmax(-1)), atol=tol.F32_REFERENCE_ATOL)
    np.testing.assert_array_equal(got["cm"], skm.confusion_matrix(labels, logits.argmax(-1), labels=range(C)))
