"""Character-level text: a UTF-8 file (or the Python standard library's own source) as tokens."""

from __future__ import annotations

import glob
import os

import numpy as np

from jnn.data._errors import DataError, MissingDataError
from jnn.data._splits import Arrays, Splits

# Default cap on characters read: ~1 MB keeps loading well under a second on any machine.
MAX_CHARS = 1_000_000


def stdlib_text(max_chars: int = MAX_CHARS) -> tuple[str, list[str]]:
    """Concatenates the standard library's top-level `.py` files, sorted, up to `max_chars`.

    Text that is on every machine with Python, so character models train without a download.
    The selection is deterministic for a given Python version.

    Returns:
      `(text, files_read)`.
    """
    text, files, size = [], [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            chunk = f.read()
        text.append(chunk)
        files.append(path)
        size += len(chunk)
        if size >= max_chars:
            break
    return "".join(text)[:max_chars], files


def encode_text(text: str, vocab: str) -> np.ndarray:
    """Maps each character to its index in `vocab`.

    Returns:
      (len(text),) int32 token ids.

    Raises:
      DataError: the text holds characters outside the vocabulary.
    """
    table = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(text) - table.keys())
    if unknown:
        raise DataError(
            f"text holds {len(unknown)} characters outside the vocabulary, e.g. {unknown[:5]!r}; "
            "expected only characters of the training text."
        )
    return np.fromiter((table[c] for c in text), dtype=np.int32, count=len(text))


def decode_text(tokens: np.ndarray, vocab: str) -> str:
    """Maps token ids back to a string."""
    return "".join(vocab[int(t)] for t in np.asarray(tokens).reshape(-1))


def _windows(tokens: np.ndarray, seq_len: int) -> Arrays:
    """Cuts tokens into non-overlapping (T,) inputs with their next-token (T,) labels."""
    n = max((len(tokens) - 1) // seq_len, 0)
    inputs = tokens[: n * seq_len].reshape(n, seq_len)  # (N, T)
    labels = tokens[1 : n * seq_len + 1].reshape(n, seq_len)  # (N, T): inputs shifted by one
    return {"inputs": inputs, "labels": labels}


def load_text(
    path: str | os.PathLike | None = None,
    *,
    seq_len: int = 128,
    max_chars: int = MAX_CHARS,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Splits:
    """Loads UTF-8 text as (N, T) input tokens and (N, T) next-token labels.

    The vocabulary is the sorted set of characters of the whole text; token i is `vocab[i]`
    (also `splits.class_names[i]`). The text is cut into contiguous train | val | test parts
    (so no window straddles two splits), each into non-overlapping windows of `seq_len`.

    Args:
      path: a UTF-8 text file; None uses the Python standard library's source (`stdlib_text`).
      seq_len: T, tokens per example.
      max_chars: read at most this many characters.
      val_fraction: share of the text (at its end, before test) used for val.
      test_fraction: share of the text (at its very end) used for test.

    Returns:
      `Splits` named "text" with int32 inputs and labels of shape (N, T), `num_classes` the
      vocabulary size, and `info["vocab"]` the vocabulary as a string.

    Raises:
      MissingDataError: `path` does not exist. DataError: the file is not UTF-8 or too short.
    """
    if seq_len < 1:
        raise DataError(f"expected seq_len >= 1, got {seq_len}.")
    if path is None:
        text, files = stdlib_text(max_chars)
        source = os.path.dirname(os.__file__)
    else:
        source = os.fspath(path)
        if not os.path.isfile(source):
            raise MissingDataError(
                f"text file {source!r} does not exist. Pass a UTF-8 text file, or no path to use "
                "the Python standard library's source as text."
            )
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read(max_chars)
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: expected UTF-8 text, got undecodable bytes ({e}).") from e
        files = [source]

    # Vectorised encoding: one code point per character, then their ranks among the unique ones.
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    uniques, tokens = np.unique(codes, return_inverse=True)
    tokens = tokens.astype(np.int32)
    vocab = "".join(chr(c) for c in uniques)

    n = len(tokens)
    n_test, n_val = int(n * test_fraction), int(n * val_fraction)
    n_train = n - n_val - n_test
    if n_train < seq_len + 1:
        raise DataError(
            f"{source}: text too short: the train part has {n_train} characters, expected at least "
            f"seq_len + 1 = {seq_len + 1}. Use a longer text or a smaller seq_len."
        )
    train = _windows(tokens[:n_train], seq_len)
    val = _windows(tokens[n_train : n_train + n_val], seq_len)
    test = _windows(tokens[n_train + n_val :], seq_len)
    return Splits(
        name="text",
        train=train,
        val=val,
        test=test,
        num_classes=len(vocab),
        class_names=tuple(vocab),
        input_shape=(seq_len,),
        info={"vocab": vocab, "source": source, "files": files, "num_chars": n},
    )
