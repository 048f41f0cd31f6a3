"""Pre-LayerNorm transformers: the GPT decoder language model and an encoder classifier.

The GPT follows GPT-2 / nanoGPT: learned token and position embeddings, pre-LN blocks, tanh-GELU
MLP of width 4C, final LayerNorm, output head tied to the token embedding, N(0, 0.02) weights with
the residual projections scaled by 1/sqrt(2 * num_layers), LayerNorm epsilon 1e-5.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from jnn.models._attention import SelfAttention
from jnn.models._io import check_tokens, output_dtype

POSITIONS: tuple[str, ...] = ("learned", "rotary")


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> GELU -> Dense(C) -> dropout. Input and output: (B, T, C)."""

    mlp_dim: int
    dropout_rate: float = 0.0
    use_bias: bool = True
    gelu_approximate: bool = True
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    out_kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        y = nn.Dense(self.mlp_dim, use_bias=self.use_bias, kernel_init=self.kernel_init,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)  # (B, T, M)
        y = nn.gelu(y, approximate=self.gelu_approximate)
        y = nn.Dense(c, use_bias=self.use_bias, kernel_init=self.out_kernel_init,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(y)  # (B, T, C)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``. Input and output: (B, T, C).

    Attributes:
      num_heads: attention heads.
      mlp_dim: hidden width of the MLP.
      causal: causal (decoder) attention.
      rotary: rotary positions in attention.
      dropout_rate: dropout on both residual branches (training only, rng ``"dropout"``).
      use_bias: biases in projections and LayerNorms.
      qkv_bias: biases on the query/key/value projection (None: ``use_bias``).
      gelu_approximate: tanh GELU (GPT-2) or exact GELU (ViT, BERT).
      ln_epsilon: LayerNorm epsilon.
      kernel_init: initialiser of the input projections.
      out_kernel_init: initialiser of the projections back into the residual stream.
      attention_impl: ``SelfAttention.implementation``: ``None``, ``"xla"``, ``"cudnn"`` or
        ``"reference"``.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_heads: int
    mlp_dim: int
    causal: bool = False
    rotary: bool = False
    dropout_rate: float = 0.0
    use_bias: bool = True
    qkv_bias: bool | None = None
    gelu_approximate: bool = True
    ln_epsilon: float = 1e-5
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    out_kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        ln = dict(epsilon=self.ln_epsilon, use_bias=self.use_bias, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        y = nn.LayerNorm(name="ln1", **ln)(x)
        y = SelfAttention(self.num_heads, causal=self.causal, rotary=self.rotary,
                          use_bias=self.use_bias, qkv_bias=self.qkv_bias, kernel_init=self.kernel_init,
                          out_kernel_init=self.out_kernel_init,
                          implementation=self.attention_impl, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="attn")(y)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)  # (B, T, C)
        y = nn.LayerNorm(name="ln2", **ln)(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, use_bias=self.use_bias,
                     gelu_approximate=self.gelu_approximate, kernel_init=self.kernel_init,
                     out_kernel_init=self.out_kernel_init, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="mlp")(y, train)
        return x + y  # (B, T, C)


class GPT(nn.Module):
    """GPT-2 style decoder-only language model.

    Input: (B, T) integer tokens with T <= block_size. Output: (B, T, vocab_size) logits; the
    logits at position t depend only on tokens 0..t (causal attention).

    Attributes:
      vocab_size: number of tokens (GPT-2: 50,257).
      block_size: context length; longer inputs raise ``ValueError``.
      num_layers: transformer blocks.
      num_heads: attention heads per block.
      embed_dim: residual stream width C.
      mlp_ratio: MLP hidden width is ``mlp_ratio * embed_dim``.
      dropout_rate: embedding and residual dropout (training only, rng ``"dropout"``).
      positions: ``"learned"`` (a (block_size, C) table) or ``"rotary"`` (in attention).
      tie_embeddings: the output head reuses the token embedding matrix.
      use_bias: biases in projections and LayerNorms (nanoGPT's ``bias``).
      attention_impl: ``None``, ``"xla"``, ``"cudnn"`` (``jax.nn.dot_product_attention``) or
        ``"reference"`` (explicit softmax).
      vocab_multiple: pad the token table and the output head to a multiple of this many rows
        (e.g. 128: GPT-2's 50,257 -> 50,304, as nanoGPT does), which GPUs' matrix units multiply
        faster; the logits are sliced back to ``vocab_size``, so the outputs, the loss and
        sampling are those of the unpadded model (the extra rows never get a gradient).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    num_layers: int = 12
    num_heads: int = 12
    embed_dim: int = 768
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    positions: str = "learned"
    tie_embeddings: bool = True
    use_bias: bool = True
    attention_impl: str | None = None
    vocab_multiple: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_tokens("GPT", x, self.block_size)
        if self.vocab_multiple < 1:
            raise ValueError(f"GPT vocab_multiple must be >= 1, received {self.vocab_multiple}.")
        rows = -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple  # padded vocabulary
        if self.positions not in POSITIONS:
            raise ValueError(f"GPT positions must be one of {POSITIONS}, "
                             f"received {self.positions!r}.")
        t = x.shape[1]
        init = nn.initializers.normal(0.02)
        wte = nn.Embed(rows, self.embed_dim, embedding_init=init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="wte")
        h = wte(x)  # (B, T, C)
        if self.positions == "learned":
            wpe = self.param("wpe", init, (self.block_size, self.embed_dim), self.param_dtype)
            h = h + wpe[None, :t].astype(self.dtype)  # (B, T, C)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        for i in range(self.num_layers):
            h = TransformerBlock(
                self.num_heads, self.mlp_ratio * self.embed_dim, causal=True,
                rotary=self.positions == "rotary", dropout_rate=self.dropout_rate,
                use_bias=self.use_bias, gelu_approximate=True, ln_epsilon=1e-5,
                kernel_init=init,
                out_kernel_init=nn.initializers.normal(0.02 / math.sqrt(2 * self.num_layers)),
                attention_impl=self.attention_impl, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"block_{i}")(h, train)
        h = nn.LayerNorm(epsilon=1e-5, use_bias=self.use_bias, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="ln_f")(h)
        if self.tie_embeddings:
            logits = wte.attend(h)  # (B, T, rows)
        else:
            logits = nn.Dense(rows, use_bias=False, kernel_init=init,
                              dtype=self.dtype, param_dtype=self.param_dtype, name="lm_head")(h)
        return logits[..., :self.vocab_size].astype(output_dtype(self.dtype))  # (B, T, V)


class TransformerClassifier(nn.Module):
    """Transformer encoder text classifier (bidirectional attention, mean pooling).

    Input: (B, T) integer tokens with T <= max_length. Output: (B, num_classes) logits.

    Attributes:
      num_classes: output width.
      vocab_size: number of tokens.
      max_length: length of the learned position table; longer inputs raise ``ValueError``.
      num_layers: transformer blocks.
      num_heads: attention heads.
      embed_dim: residual stream width C.
      mlp_dim: MLP hidden width.
      dropout_rate: embedding, residual and pre-head dropout (training only, rng ``"dropout"``).
      attention_impl: ``None``, ``"xla"``, ``"cudnn"`` or ``"reference"``.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_classes: int = 2
    vocab_size: int = 20000
    max_length: int = 200
    num_layers: int = 1
    num_heads: int = 2
    embed_dim: int = 32
    mlp_dim: int = 32
    dropout_rate: float = 0.1
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_tokens("TransformerClassifier", x, self.max_length)
        t = x.shape[1]
        init = nn.initializers.normal(0.02)
        h = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=init, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="embed")(x)  # (B, T, C)
        pos = self.param("pos_embed", init, (self.max_length, self.embed_dim), self.param_dtype)
        h = h + pos[None, :t].astype(self.dtype)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        for i in range(self.num_layers):
            h = TransformerBlock(self.num_heads, self.mlp_dim, dropout_rate=self.dropout_rate,
                                 gelu_approximate=False, kernel_init=init, out_kernel_init=init,
                                 attention_impl=self.attention_impl, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"block_{i}")(h, train)
        h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_f")(h)
        h = jnp.mean(h, axis=1)  # (B, C)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        logits = nn.Dense(self.num_classes, kernel_init=init, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="head")(h)  # (B, K)
        return logits.astype(output_dtype(self.dtype))
