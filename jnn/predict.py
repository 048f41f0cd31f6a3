"""A trained run as a model to call: `jnn.load(run_dir)`, and batch prediction over files (`jnn predict`).

  model = jnn.load("runs/digits-20261122-101500")   # best checkpoint (else the newest), eval mode
  logits = model(x)                                 # the run's input normalisation included
  out = model.predict(x, batch_size=256)            # {"predictions": (N,), "probabilities": (N, K)}

`jnn predict RUN_DIR INPUTS` reads a ``.npy`` / ``.npz`` file (its "inputs" array, or its only one)
or a folder of images (resized to the model's input, scaled to [0, 1]) and writes an ``.npz`` with
``predictions`` and ``probabilities`` (and ``files`` for a folder), in batches of one compiled shape
with a progress bar; the last batch is padded and the padding dropped. Inputs of the wrong shape,
dtype or value range are refused before anything is compiled or written, with the fix.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jnn.train.state import TrainState

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A run's model in evaluation mode: call it on a batch of raw inputs (as the run's data gave them).

    Attributes:
      state: the restored training state (`state.step` is the checkpoint's step).
      run_dir: the run directory it came from.
      model_name: the zoo preset, e.g. "digits_cnn".
      input_kind: "image", "tokens" or "noise" (the preset's).
      input_range: (min, max) of the training inputs: what the model has seen.
      normalize: per-channel (mean, std) the run standardised inputs with, or None.
      class_names: one name per output class, or ().
    """

    state: TrainState
    run_dir: str
    model_name: str
    input_kind: str
    input_range: tuple[float, float]
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None
    class_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example (no batch axis)."""
        return self.state.spec.shape

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.state.spec.dtype)

    def __call__(self, inputs: Any) -> jax.Array:
        """The model's outputs (e.g. logits) on a batch: a pure JAX function (`jax.jit(model)`, export)."""
        return _forward(self.state, self.normalize, inputs)

    def example_inputs(self, n: int = 2, seed: int = 0) -> np.ndarray:
        """n valid random inputs: values uniform over the training range, token ids over the vocabulary."""
        rng, shape = np.random.default_rng(seed), (n, *self.input_shape)
        if self.input_kind == "tokens":
            vocab = getattr(self.state.model.module, "vocab_size", 2)
            return rng.integers(0, vocab, shape).astype(self.input_dtype)
        if self.input_kind == "noise":
            return rng.standard_normal(shape).astype(self.input_dtype)
        return rng.uniform(*self.input_range, shape).astype(self.input_dtype)

    def check(self, inputs: Any, where: str = "predict") -> np.ndarray:
        """`inputs` as an array the model takes, or a ValueError saying what was expected and the fix."""
        x = np.asarray(inputs)
        expected = ("N", *self.input_shape)
        if x.ndim == len(self.input_shape) and tuple(x.shape) == self.input_shape:
            raise ValueError(f"{where}: received one example of shape {x.shape}; expected a batch of shape "
                             f"{_fmt(expected)}. Fix: add the batch axis, x[None].")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{where}: inputs of shape {x.shape}; the model takes {_fmt(expected)} "
                             f"({self.input_kind}s as the run's data had them). Fix: resize or reshape the inputs.")
        if self.input_kind == "tokens":
            return self._check_tokens(x, where)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{where}: inputs of dtype {x.dtype}; expected floating-point values in "
                             f"[{self.input_range[0]:g}, {self.input_range[1]:g}] as in training. Fix: "
                             f"x.astype(np.float32){' / 255' if x.dtype == np.uint8 else ''}.")
        if not np.isfinite(x).all():
            raise ValueError(f"{where}: {int((~np.isfinite(x)).sum())} input value(s) are NaN or infinite. Fix: "
                             f"replace or drop those examples.")
        lo, hi = self.input_range
        span = hi - lo
        if x.size and (x.min() < lo - span or x.max() > hi + span):
            raise ValueError(f"{where}: input values lie in [{x.min():g}, {x.max():g}]; the model was trained on "
                             f"values in [{lo:g}, {hi:g}]. Fix: scale the inputs as in training (e.g. divide "
                             f"8-bit pixels by 255).")
        return x.astype(self.input_dtype, copy=False)

    def _check_tokens(self, x: np.ndarray, where: str) -> np.ndarray:
        vocab = getattr(self.state.model.module, "vocab_size", None)
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{where}: inputs of dtype {x.dtype}; expected integer token ids. Fix: "
                             f"x.astype(np.int32).")
        if x.size and (x.min() < 0 or (vocab is not None and x.max() >= vocab)):
            raise ValueError(f"{where}: token ids in [{x.min()}, {x.max()}]; expected ids in [0, {vocab}). "
                             f"Fix: encode the text with the run's vocabulary.")
        return x.astype(self.input_dtype, copy=False)

    def predict(self, inputs: Any, *, batch_size: int = 256, progress: bool | None = None) -> dict[str, np.ndarray]:
        """Predictions (argmax of the last axis) and probabilities (its softmax), batch by batch.

        Every batch has `batch_size` examples (one compiled program); the last one is padded and the
        padding dropped, so each example's result does not depend on the others.
        """
        from tqdm.auto import tqdm

        from jnn.train.evaluation import pad_batch

        x = self.check(inputs)
        if batch_size < 1:
            raise ValueError(f"predict: batch_size={batch_size}; expected a positive number.")
        size = min(batch_size, len(x)) or 1
        normalize = self.normalize
        run = jax.jit(lambda state, x: jax.nn.softmax(_forward(state, normalize, x).astype(jnp.float32), axis=-1))
        chunks = []
        show = sys.stderr.isatty() if progress is None else progress
        for start in tqdm(range(0, len(x), size), desc="predict", unit="batch", disable=not show):
            chunk = x[start:start + size]
            padded = pad_batch({"inputs": chunk, "labels": np.zeros(len(chunk), np.int32)}, size)["inputs"]
            chunks.append(np.asarray(run(self.state, padded))[:len(chunk)])
        probabilities = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
        return {"predictions": probabilities.argmax(-1) if chunks else np.zeros((0,), np.int64),
                "probabilities": probabilities}


def _forward(state: TrainState, normalize: Any, x: Any) -> jax.Array:
    """The run's input standardisation (as its data pipeline's `Normalize`), then the model in eval mode."""
    if normalize is not None:
        channels = (1,) * (x.ndim - 1) + (-1,)  # (1, ..., 1, C): no implicit rank promotion
        mean = np.asarray(normalize[0], np.float32).reshape(channels)
        scale = np.asarray(1.0 / np.asarray(normalize[1]), np.float32).reshape(channels)  # as Normalize rounds it
        x = (x - mean) * scale  # (B, ..., C)
    return state.model.apply(state.params, state.model_state, x, train=False)[0]


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def load(run_dir: str | os.PathLike, *, step: int | None = None, data_dir: str | None = None) -> LoadedModel:
    """A run directory's model, ready to call: the best checkpoint (else the newest, or `step`), eval mode.

    The run's config rebuilds the model and its input normalisation, which reads the run's data
    (pass `data_dir` if it moved).

    Raises:
      RunDirError / CheckpointError: not a run directory, no usable checkpoint.
    """
    from jnn import experiment, models

    exp, state = experiment.restore(os.fspath(run_dir), step=step, data_dir=data_dir)
    train = exp.splits.train["inputs"]
    normalize = (exp.normalize[0].mean, exp.normalize[0].std) if exp.normalize else None
    kind = models.spec(exp.config.model.name).input_kind
    return LoadedModel(state, os.path.abspath(os.fspath(run_dir)), exp.config.model.name, kind,
                       (float(np.min(train)), float(np.max(train))), normalize, tuple(exp.splits.class_names))


def read_inputs(path: str | os.PathLike, model: LoadedModel) -> tuple[np.ndarray, list[str] | None]:
    """The inputs in a ``.npy`` / ``.npz`` file, or the images of a folder as the model takes them.

    Returns:
      (inputs, file names or None).

    Raises:
      ValueError: a missing path, an npz without one clear array, a folder without images (or images
        for a model that does not take images), an image that cannot be read.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_images(path, model)
    if not os.path.isfile(path):
        raise ValueError(f"predict: {path!r} does not exist; expected a .npy or .npz file or a folder of images.")
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False), None
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            if "inputs" in f.files:
                return f["inputs"], None
            if len(f.files) == 1:
                return f[f.files[0]], None
            raise ValueError(f"predict: {path} holds arrays {f.files}; expected one named 'inputs' (or a single "
                             f"array). Fix: np.savez(path, inputs=x).")
    raise ValueError(f"predict: cannot read {path!r}; expected a .npy or .npz file or a folder of images.")


def _read_images(folder: str, model: LoadedModel) -> tuple[np.ndarray, list[str]]:
    if model.input_kind != "image" or len(model.input_shape) != 3:
        raise ValueError(f"predict: {folder} is a folder, read as images, but {model.model_name} takes "
                         f"{model.input_kind} of shape {model.input_shape}. Fix: pass a .npy or .npz file.")
    from PIL import Image

    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise ValueError(f"predict: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    h, w, c = model.input_shape
    if c not in (1, 3):
        raise ValueError(f"predict: {model.model_name} takes {c} channels; image folders give 1 (grey) or 3 (RGB). "
                         f"Fix: pass a .npy file.")
    images = []
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                images.append(np.asarray(im, np.float32).reshape(h, w, c) / 255.0)  # (H, W, C) in [0, 1]
        except OSError as err:
            raise ValueError(f"predict: cannot read the image {os.path.join(folder, name)} ({err}).") from err
    return np.stack(images), names


def predict_to_file(model: LoadedModel, inputs: str | os.PathLike, output: str | os.PathLike, *,
                    batch_size: int = 256, progress: bool | None = None) -> dict[str, np.ndarray]:
    """Reads `inputs` (see `read_inputs`), predicts, and writes ``predictions`` and ``probabilities``
    (and ``files``) to the ``.npz`` file `output`. Everything is checked before anything is written."""
    output = os.fspath(output)
    if not output.endswith(".npz"):
        raise ValueError(f"predict: --output {output!r}; expected a .npz file name.")
    x, names = read_inputs(inputs, model)
    result = model.predict(x, batch_size=batch_size, progress=progress)
    if names is not None:
        result["files"] = np.asarray(names)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    np.savez(output, **result)
    return result


__all__ = ["LoadedModel", "load", "predict_to_file", "read_inputs"]
