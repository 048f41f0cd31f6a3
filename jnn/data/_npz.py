"""Arrays saved with `np.savez`: inputs and labels under known or user-given keys."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from jnn.data._errors import DataError, MissingDataError
from jnn.data._splits import Arrays, Splits, check_arrays, make_splits

# Key pairs tried in order when the caller names none.
_KEY_PAIRS = (("inputs", "labels"), ("x", "y"), ("x_train", "y_train"), ("images", "labels"))


def _split_key(key: str, split: str) -> str:
    """ "x_train" -> "x_test"; "inputs" -> "inputs_test"."""
    base = key[: -len("_train")] if key.endswith("_train") else key
    return f"{base}_{split}"


def load_npz(
    path: str | os.PathLike,
    *,
    inputs_key: str | None = None,
    labels_key: str | None = None,
    num_classes: int | None = None,
    class_names: tuple[str, ...] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """Loads a `.npz` file of inputs and integer labels.

    Keys: `inputs_key`/`labels_key` if given, else the first present pair of ("inputs", "labels"),
    ("x", "y"), ("x_train", "y_train"), ("images", "labels"). Optional test and val arrays live
    under the same keys with a "_test" / "_val" suffix ("x_test", "inputs_val"; "x_train" ->
    "x_test"). Without test arrays a fixed stratified 20% is held out; without val arrays a
    stratified `val_fraction` of train (chosen by `seed`).

    Inputs are kept as stored, except uint8 arrays, which are taken as images and scaled to
    float32 in [0, 1].

    Args:
      path: the `.npz` file.
      inputs_key: key of the training inputs.
      labels_key: key of the training labels.
      num_classes: labels must lie in [0, num_classes); default: max label + 1.
      class_names: optional names, one per class.
      val_fraction: share of train held out when the file has no val arrays.
      seed: chooses the validation split.

    Returns:
      `Splits` named "npz".

    Raises:
      MissingDataError: the file does not exist. DataError: keys missing, lengths differ, labels
        not integers or out of range.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingDataError(
            f"npz file {path!r} does not exist. Save one with "
            "np.savez(path, inputs=..., labels=...) (optionally inputs_test=/labels_test=)."
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e}).") from e

    if inputs_key is None and labels_key is None:
        pair = next((p for p in _KEY_PAIRS if p[0] in arrays and p[1] in arrays), None)
        if pair is None:
            raise DataError(
                f"{path}: expected keys inputs/labels or x/y, got {sorted(arrays)}. "
                "Fix: pass inputs_key= and labels_key= naming your arrays."
            )
        inputs_key, labels_key = pair
    elif inputs_key is None or labels_key is None:
        raise DataError("pass both inputs_key and labels_key, or neither.")
    for key in (inputs_key, labels_key):
        if key not in arrays:
            raise DataError(f"{path}: expected key {key!r}, got {sorted(arrays)}.")

    def part(split: str | None) -> Arrays | None:
        xk, yk = (inputs_key, labels_key) if split is None else (
            _split_key(inputs_key, split), _split_key(labels_key, split))  # fmt: skip
        if xk not in arrays or yk not in arrays:
            return None
        inputs, labels = arrays[xk], arrays[yk]
        if inputs.dtype == np.uint8:
            inputs = inputs.astype(np.float32) / np.float32(255.0)
        out = {"inputs": inputs, "labels": labels}
        check_arrays(out, num_classes, where=f"{path} ({xk}, {yk})")
        out["labels"] = labels.astype(np.int32)
        return out

    train, val, test = part(None), part("val"), part("test")
    present = [s for s in (train, val, test) if s is not None]
    if num_classes is None:
        num_classes = max(int(s["labels"].max(initial=0)) for s in present) + 1
    return make_splits(
        "npz",
        train,
        test,
        val=val,
        val_fraction=val_fraction,
        seed=seed,
        num_classes=num_classes,
        class_names=class_names,
        info={"path": path, "keys": (inputs_key, labels_key)},
    )
