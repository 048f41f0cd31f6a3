"""LSTM and GRU sequence models built on ``flax.linen.RNN`` and the library's cells.

The cells are flax's own (``nn.OptimizedLSTMCell``, ``nn.GRUCell``) with their default
initialisers (Lecun-normal input kernels, orthogonal recurrent kernels, zero biases, as Keras).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jnn.models._io import check_shape, check_tokens, output_dtype

CELLS: tuple[str, ...] = ("lstm", "gru")


def make_cell(kind: str, features: int, dtype: Any, param_dtype: Any, name: str) -> nn.Module:
    """A flax recurrent cell by name.

    Raises:
      ValueError: unknown cell name.
    """
    if kind == "lstm":
        return nn.OptimizedLSTMCell(features, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "gru":
        return nn.GRUCell(features, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"cell must be one of {CELLS}, received {kind!r}.")


class RNNClassifier(nn.Module):
    """Stacked (optionally bidirectional) LSTM/GRU sequence classifier.

    Input: (B, T) integer tokens when ``vocab_size`` is set (embedded first), else (B, T, F)
    floats. Output: (B, num_classes) logits from the last time step's hidden state (for a
    bidirectional model, the forward state at T-1 concatenated with the backward state at 0).

    Attributes:
      num_classes: output width.
      cell: ``"lstm"`` or ``"gru"``.
      hidden_size: features of every recurrent layer (per direction).
      num_layers: stacked recurrent layers.
      bidirectional: run each layer in both directions (``nn.Bidirectional``).
      vocab_size: token vocabulary; ``None`` for float feature sequences.
      embed_dim: token embedding width (token input only).
      in_features: expected F of float input, checked when set.
      dropout_rate: dropout between layers and before the head (training only, rng ``"dropout"``).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_classes: int = 2
    cell: str = "lstm"
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    vocab_size: int | None = None
    embed_dim: int = 128
    in_features: int | None = None
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        name = type(self).__name__
        if self.vocab_size is not None:
            check_tokens(name, x)
            x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="embed")(x)  # (B, T, E)
        else:
            f = self.in_features if self.in_features is not None else "F"
            check_shape(name, x, ("B", "T", f), "Pass float features (batch, time, features), "
                        "or set vocab_size for token ids.")
            x = x.astype(self.dtype)
        h = self.hidden_size
        for i in range(self.num_layers):
            if i > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            if self.bidirectional:
                # Cells are named in this scope: that is where flax registers them.
                fwd = nn.RNN(make_cell(self.cell, h, self.dtype, self.param_dtype, f"fwd_{i}"))
                bwd = nn.RNN(make_cell(self.cell, h, self.dtype, self.param_dtype, f"bwd_{i}"))
                x = nn.Bidirectional(fwd, bwd)(x)  # (B, T, 2H)
            else:
                cell = make_cell(self.cell, h, self.dtype, self.param_dtype, f"cell_{i}")
                x = nn.RNN(cell)(x)  # (B, T, H)
        if self.bidirectional:
            x = jnp.concatenate([x[:, -1, :h], x[:, 0, h:]], axis=-1)  # (B, 2H)
        else:
            x = x[:, -1]  # (B, H)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="head")(x)  # (B, K)
        return x.astype(output_dtype(self.dtype))


class RNNLanguageModel(nn.Module):
    """Character- (or token-) level LSTM/GRU language model, Karpathy char-rnn style.

    Input: (B, T) integer tokens. Output: (B, T, vocab_size) logits; position t predicts token
    t+1 and only depends on tokens 0..t.

    Attributes:
      vocab_size: number of distinct tokens.
      cell: ``"lstm"`` or ``"gru"``.
      embed_dim: token embedding width.
      hidden_size: features of every recurrent layer.
      num_layers: stacked recurrent layers.
      dropout_rate: dropout between layers and before the head (training only, rng ``"dropout"``).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    vocab_size: int = 65
    cell: str = "lstm"
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_tokens(type(self).__name__, x)
        x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="embed")(x)  # (B, T, E)
        for i in range(self.num_layers):
            cell = make_cell(self.cell, self.hidden_size, self.dtype, self.param_dtype, f"cell_{i}")
            x = nn.RNN(cell)(x)  # (B, T, H)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="head")(x)  # (B, T, V)
        return x.astype(output_dtype(self.dtype))
