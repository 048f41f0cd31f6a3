"""Classification metrics as pure functions and as mergeable on-device accumulators.

Accumulators (`Average`, `ConfusionMatrix`) are pytrees of sums: merging two is adding them, so
they accumulate over batches inside jitted code (`merge`), across devices with `lax.psum`, and are
read on the host once, at the end (`compute`). No host round-trip per batch.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


# ------------------------------------------------------------------ pure per-batch functions


def accuracy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
    """Fraction of examples whose arg-max class equals the integer label."""
    return _mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


def top_k_correct(logits: Array, labels: Array, k: int) -> Array:
    """1.0 where the label is among the `k` highest scores, else 0.0. Shapes: (..., C), (...)."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top_k: k must be in [1, {logits.shape[-1]}] (the number of classes); got k={k}.")
    label_scores = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)  # (..., 1)
    # Rank = number of classes scoring strictly higher; ties count in the label's favour (as sklearn).
    rank = (logits > label_scores).sum(-1)
    return (rank < k).astype(jnp.float32)


def top_k_accuracy(logits: Array, labels: Array, k: int = 5, mask: Array | None = None) -> Array:
    """Fraction of examples whose label is among the `k` highest-scoring classes."""
    return _mean(top_k_correct(logits, labels, k), mask)


def confusion_matrix(
    predictions: Array, labels: Array, num_classes: int, mask: Array | None = None
) -> Array:
    """(C, C) int32 counts; rows are true classes, columns predicted (sklearn's layout)."""
    weights = jnp.ones(labels.shape, jnp.int32) if mask is None else jnp.asarray(mask).astype(jnp.int32)
    matrix = jnp.zeros((num_classes, num_classes), jnp.int32)
    return matrix.at[labels.reshape(-1), predictions.reshape(-1)].add(weights.reshape(-1), mode="drop")


def classification_report(confusion: Array) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support from a confusion matrix.

    Matches `sklearn.metrics.classification_report(..., output_dict=True)` with zero_division=0.
    A numpy matrix is computed with numpy on the host (no compile); a jax array (or a traced one,
    inside `jit`) with jax.numpy.

    Returns:
      {"precision": (C,), "recall": (C,), "f1": (C,), "support": (C,), "accuracy": (),
       "macro_avg": {...}, "weighted_avg": {...}} where the averages hold precision/recall/f1.
    """
    xp = np if isinstance(confusion, np.ndarray) else jnp
    confusion = xp.asarray(confusion, xp.float32)
    true_pos = xp.diagonal(confusion)
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    precision = _safe_div(xp, true_pos, predicted)
    recall = _safe_div(xp, true_pos, support)
    f1 = _safe_div(xp, 2 * precision * recall, precision + recall)
    total = support.sum()
    weights = _safe_div(xp, support, total)

    def averages(w):
        return {"precision": (precision * w).sum(), "recall": (recall * w).sum(), "f1": (f1 * w).sum()}

    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support.astype(xp.int32),
        "accuracy": _safe_div(xp, true_pos.sum(), total),
        "macro_avg": averages(xp.full_like(support, 1.0 / support.shape[0])),
        "weighted_avg": averages(weights),
    }


def format_report(report: Mapping[str, Any], target_names: Sequence[str] | None = None, digits: int = 4) -> str:
    """Formats `classification_report` output as the table sklearn prints."""
    precision, recall, f1 = (np.asarray(report[k]) for k in ("precision", "recall", "f1"))
    support = np.asarray(report["support"])
    names = list(target_names) if target_names is not None else [str(i) for i in range(len(support))]
    width = max(max(len(n) for n in names), len("weighted avg"), digits)
    head = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"
    row = "{:>{w}} {:>9.{d}f} {:>9.{d}f} {:>9.{d}f} {:>9}"
    lines = [head, ""]
    for i, name in enumerate(names):
        lines.append(row.format(name, precision[i], recall[i], f1[i], int(support[i]), w=width, d=digits))
    total = int(support.sum())
    lines += ["", f"{'accuracy':>{width}} {'':>9} {'':>9} {float(report['accuracy']):>9.{digits}f} {total:>9}"]
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        avg = report[key]
        lines.append(row.format(label, float(avg["precision"]), float(avg["recall"]), float(avg["f1"]),
                                total, w=width, d=digits))
    return "\n".join(lines)


def _mean(values: Array, mask: Array | None) -> Array:
    if mask is None:
        return values.mean()
    mask = jnp.asarray(mask, values.dtype)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _safe_div(xp, num: Array, den: Array) -> Array:
    return xp.where(den > 0, num / xp.where(den > 0, den, 1), xp.float32(0.0))


# ------------------------------------------------------------------ mergeable accumulators


@struct.dataclass
class Average:
    """Running weighted mean: `total / count`."""

    total: Array
    count: Array

    @classmethod
    def from_values(cls, values: Array, mask: Array | None = None) -> "Average":
        values = jnp.asarray(values, jnp.float32)
        if mask is None:
            return cls(values.sum(), jnp.asarray(values.size, jnp.float32))
        mask = jnp.asarray(mask, jnp.float32)
        return cls((values * mask).sum(), mask.sum())

    def compute(self) -> Array:
        return jnp.where(self.count > 0, self.total / jnp.maximum(self.count, 1e-12), jnp.nan)


@struct.dataclass
class ConfusionMatrix:
    """Accumulated (C, C) confusion counts; `compute` returns the matrix."""

    matrix: Array

    @classmethod
    def from_predictions(
        cls, predictions: Array, labels: Array, num_classes: int, mask: Array | None = None
    ) -> "ConfusionMatrix":
        return cls(confusion_matrix(predictions, labels, num_classes, mask))

    def compute(self) -> Array:
        return self.matrix


def merge(a: Any, b: Any) -> Any:
    """Merges two accumulator trees of the same structure (None acts as empty)."""
    if a is None:
        return b
    return jax.tree.map(jnp.add, a, b)


def _is_accumulator(x: Any) -> bool:
    return isinstance(x, (Average, ConfusionMatrix))


def compute(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Reads accumulators into values: floats for `Average`, an (C, C) array for the confusion.

    One transfer to the host, then numpy: no small device computations (each would compile).
    """
    out = {}
    for name, value in jax.device_get(dict(metrics)).items():
        if isinstance(value, Average):
            count = float(value.count)
            value = float(value.total) / count if count > 0 else float("nan")
        elif isinstance(value, ConfusionMatrix):
            value = np.asarray(value.matrix)
        value = np.asarray(value)
        out[name] = float(value) if value.ndim == 0 else value
    return out
