"""The model boundary: trace-time input checks and full-precision outputs.

Every model in the zoo validates its input in ``__call__`` before any layer runs. Shapes are
static under ``jit``, so these checks cost nothing at run time and a wrong input fails with a
message that names the model, the expected and the received shape, instead of an opaque
``dot_general`` error deep inside a layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

# An expected dimension is an exact size (int) or a symbolic name such as "B" (any size).
Dim = int | str


def format_shape(shape: Sequence[Dim]) -> str:
    """Formats ``(B, 28, 28, 1)`` style shapes, symbolic names unquoted."""
    inner = ", ".join(str(d) for d in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def check_shape(model: str, x: Any, expected: Sequence[Dim], fix: str = "") -> None:
    """Raises if ``x.shape`` does not match ``expected``.

    Args:
      model: name of the model, for the message (e.g. ``"ResNet"``).
      x: the input array (or anything with ``.shape``).
      expected: one entry per axis: an int must match exactly, a str matches any size.
      fix: optional sentence telling the user how to fix the input.

    Raises:
      ValueError: on a rank or size mismatch.
    """
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(
        isinstance(e, str) or e == s for e, s in zip(expected, shape)
    )
    if not ok:
        msg = (
            f"{model} expected input of shape {format_shape(expected)}, "
            f"received {format_shape(shape)}."
        )
        raise ValueError(f"{msg} {fix}".rstrip())


def check_tokens(model: str, x: Any, max_length: int | None = None) -> None:
    """Raises unless ``x`` is a (B, T) integer array with ``T <= max_length``.

    Raises:
      ValueError: wrong rank, non-integer dtype, or a sequence longer than the context.
    """
    expected = ("B", "T")
    check_shape(model, x, expected, "Pass integer token ids of shape (batch, time).")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(
            f"{model} expected integer token ids of shape {format_shape(expected)}, "
            f"received dtype {x.dtype}. Cast with x.astype(jnp.int32)."
        )
    if max_length is not None and x.shape[1] > max_length:
        raise ValueError(
            f"{model} expected input of shape (B, T<={max_length}) (context length "
            f"{max_length}), received {format_shape(x.shape)}. Crop the sequence to the last "
            f"{max_length} tokens, e.g. x[:, -{max_length}:]."
        )


def output_dtype(dtype: Any) -> Any:
    """The dtype models return logits in: at least float32.

    Losses and softmax are computed at full precision even when the body runs in bfloat16;
    a float64 model keeps float64 (gradient checks need it).
    """
    return jnp.promote_types(dtype, jnp.float32)
