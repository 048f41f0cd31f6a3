"""How a check says what went wrong: `ModelCheckError`, and tree comparisons that name the path.

A failure names the check, the place (a parameter, state, metric or output path and the index of
the worst element), what was expected, what was got, the likely cause and the fix.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Failure:
    """One failed check.

    Attributes:
      check: the check's name (a key of `jnn.testing.CHECKS`).
      summary: one line: what is wrong.
      where: the path of the offending value, e.g. "params['Dense_0']['kernel'][3, 1]" ("" if none).
      expected: what a correct model gives there.
      got: what this model gives.
      cause: the likely cause.
      fix: how to fix it.
    """

    check: str
    summary: str
    where: str = ""
    expected: str = ""
    got: str = ""
    cause: str = ""
    fix: str = ""

    def __str__(self) -> str:
        lines = [f"[{self.check}] {self.summary}"]
        for label, text in (("at", self.where), ("expected", self.expected), ("got", self.got),
                            ("likely cause", self.cause), ("fix", self.fix)):
            if text:
                lines.append(f"  {label + ':':<14}{text}")
        return "\n".join(lines)


class ModelCheckError(AssertionError):
    """A model failed one or more of `jnn.testing`'s checks; `failures` lists them."""

    def __init__(self, failures: list[Failure] | Failure, header: str = ""):
        self.failures = [failures] if isinstance(failures, Failure) else list(failures)
        text = "\n\n".join(str(f) for f in self.failures)
        super().__init__(f"{header}\n\n{text}" if header else text)

    @property
    def checks(self) -> list[str]:
        """The names of the failed checks."""
        return [f.check for f in self.failures]


def path_str(prefix: str, path: tuple) -> str:
    return prefix + jax.tree_util.keystr(path)


def index_str(index: tuple) -> str:
    return "[" + ", ".join(str(int(i)) for i in index) + "]" if index else ""


def _fmt(x: Any) -> str:
    x = np.asarray(x)
    if x.dtype.kind == "f" or x.dtype.kind == "c":
        return f"{x.item():.7g}" if x.size == 1 else str(x)
    return str(x.item()) if x.size == 1 else str(x)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.astype(np.float64) if x.dtype.kind == "f" and x.dtype.itemsize < 4 else x  # bfloat16, float16


def first_nonfinite(tree: PyTree, prefix: str) -> tuple[str, str, int, int] | None:
    """(path with index, the value, how many non-finite elements, how many elements) of the first
    leaf holding a NaN or Inf, or None."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        x = _as_numpy(leaf)
        if x.dtype.kind not in "fc":
            continue
        bad = ~np.isfinite(x)
        if bad.any():
            index = tuple(np.argwhere(bad)[0])
            return path_str(prefix, path) + index_str(index), _fmt(x[index]), int(bad.sum()), x.size
    return None


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """Where two trees differ most, beyond the tolerance."""

    where: str
    expected: str
    got: str
    detail: str


def compare_trees(expected: PyTree, got: PyTree, prefix: str, *, rtol: float, atol: float) -> Mismatch | None:
    """The worst mismatch between two trees of arrays (|got - expected| > atol + rtol * |expected|),
    or None when they agree. A structure or shape difference is a mismatch too. A NaN or Inf in
    either tree never agrees (NaN == NaN would hide a step that destroys the state)."""
    exp_leaves, exp_tree = jax.tree_util.tree_flatten_with_path(expected)
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(got)
    if exp_tree != got_tree:
        return Mismatch(prefix, f"structure {exp_tree}", f"structure {got_tree}", "the trees differ in structure")
    worst, worst_excess = None, 0.0
    for (path, a), (_, b) in zip(exp_leaves, got_leaves):
        a, b = _as_numpy(a), _as_numpy(b)
        name = path_str(prefix, path)
        if a.shape != b.shape or a.dtype != b.dtype:
            return Mismatch(name, f"shape {a.shape} dtype {a.dtype}", f"shape {b.shape} dtype {b.dtype}",
                            "shapes or dtypes differ")
        if a.dtype.kind not in "fc":
            diff = a != b
            if diff.any():
                index = tuple(np.argwhere(diff)[0])
                return Mismatch(name + index_str(index), _fmt(a[index]), _fmt(b[index]),
                                f"{int(diff.sum())} of {a.size} elements differ (exact comparison)")
            continue
        nonfinite = ~(np.isfinite(a) & np.isfinite(b))
        if nonfinite.any():
            index = tuple(np.argwhere(nonfinite)[0])
            return Mismatch(name + index_str(index), _fmt(a[index]), _fmt(b[index]),
                            f"{int(nonfinite.sum())} of {a.size} elements are NaN or Inf (run check_finite)")
        error = np.abs(b - a) - (atol + rtol * np.abs(a))
        if error.size and error.max() > worst_excess:
            index = np.unravel_index(np.argmax(error), error.shape)
            count = int((error > 0).sum())
            worst_excess = float(error.max())
            worst = Mismatch(name + index_str(index), _fmt(a[index]), _fmt(b[index]),
                             f"{count} of {a.size} elements differ; max |diff| {float(np.abs(b - a).max()):.3g} "
                             f"(tolerance: rtol {rtol:g}, atol {atol:g})")
    return worst
