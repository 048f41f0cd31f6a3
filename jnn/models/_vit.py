"""Vision Transformer (Dosovitskiy et al. 2021), sizes and initialisation as timm / big_vision.

Patch embedding (a strided convolution), a learned class token, learned position embeddings,
pre-LN encoder blocks with exact-GELU MLPs, final LayerNorm (epsilon 1e-6, as timm and big_vision;
Hugging Face's ViT uses 1e-12: ``ln_epsilon``) and a linear head on the class token.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jnn.models._io import check_shape, output_dtype
from jnn.models._transformer import TransformerBlock


class ViT(nn.Module):
    """Vision Transformer classifier.

    Input: (B, image_size, image_size, in_channels) floats, NHWC. Output: (B, num_classes) logits.

    Attributes:
      num_classes: output width.
      image_size: input height and width (fixed by the position table).
      patch_size: square patch size; must divide image_size.
      in_channels: input channels.
      embed_dim: token width C.
      num_layers: encoder blocks.
      num_heads: attention heads.
      mlp_dim: MLP hidden width.
      dropout_rate: embedding and residual dropout (training only, rng ``"dropout"``).
      ln_epsilon: epsilon of every LayerNorm (1e-6: timm, big_vision; 1e-12: Hugging Face).
      qkv_bias: biases on the query/key/value projections (timm's and Hugging Face's ``qkv_bias``).
      attention_impl: ``None``, ``"xla"``, ``"cudnn"`` (``jax.nn.dot_product_attention``) or
        ``"reference"`` (explicit softmax).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_classes: int = 1000
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    qkv_bias: bool = True
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s, p = self.image_size, self.patch_size
        if s % p:
            raise ValueError(f"ViT expected patch_size to divide image_size, received "
                             f"patch_size={p}, image_size={s}.")
        check_shape("ViT", x, ("B", s, s, self.in_channels),
                    "Images are NHWC; resize them or set image_size/in_channels.")
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="patch_embed")(x.astype(self.dtype))
        b = x.shape[0]
        x = jnp.reshape(x, (b, -1, self.embed_dim))  # (B, N, C), N = (S / P)^2
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.embed_dim),
                         self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.embed_dim)).astype(self.dtype),
                             x], axis=1)  # (B, 1 + N, C)
        pos = self.param("pos_embed", nn.initializers.normal(0.02),
                         (1, x.shape[1], self.embed_dim), self.param_dtype)
        x = x + pos.astype(self.dtype)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        trunc = nn.initializers.truncated_normal(0.02)
        for i in range(self.num_layers):
            x = TransformerBlock(self.num_heads, self.mlp_dim, dropout_rate=self.dropout_rate,
                                 gelu_approximate=False, ln_epsilon=self.ln_epsilon,
                                 qkv_bias=self.qkv_bias, kernel_init=trunc,
                                 out_kernel_init=trunc, attention_impl=self.attention_impl,
                                 dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"block_{i}")(x, train)
        x = nn.LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="ln_f")(x)
        x = nn.Dense(self.num_classes, kernel_init=trunc, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="head")(x[:, 0])  # (B, K)
        return x.astype(output_dtype(self.dtype))
