"""Autoregressive sampling from a language model: one compiled loop over a sliding context."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def sample(apply_fn: Callable[..., jax.Array], variables: Any, prompt: Any, num_tokens: int, *,
           rng: jax.Array, temperature: float = 1.0) -> np.ndarray:
    """Samples `num_tokens` tokens after `prompt` from a (B, T) -> (B, T, V) language model.

    The context is a window of the prompt's length T that slides by one token per step (for a
    GPT, T must not exceed its `block_size`); all steps run in one `jax.lax.fori_loop`.

    Example:
      >>> lm = jnn.create_train_state(jnn.models.get("gpt_char_tiny"), optax.adam(1e-3),
      ...                             np.zeros((1, 64), np.int32), 0)
      >>> prompt = np.array([20, 27, 1, 14, 17], np.int32)  # any tokens below the vocabulary size
      >>> tokens = jnn.models.sample(lm.apply_fn, lm.variables, prompt, 20,
      ...                            rng=jax.random.key(0), temperature=0.8)
      >>> tokens.shape, tokens.dtype
      ((20,), dtype('int32'))

    Args:
      apply_fn: the model's `apply` (e.g. `state.apply_fn`), called in eval mode.
      variables: the model's variables (e.g. `state.variables`).
      prompt: (T,) int tokens to start from.
      num_tokens: how many tokens to generate.
      rng: PRNG key; token i uses `fold_in(rng, i)`.
      temperature: > 0; lower is greedier.

    Returns:
      (num_tokens,) int32 numpy array of the sampled tokens (not including the prompt).

    Raises:
      ValueError: a non-positive temperature or num_tokens, or a prompt that is not 1-D.
    """
    if temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0; got {temperature}. Fix: use e.g. 0.8.")
    if num_tokens < 1:
        raise ValueError(f"sample: num_tokens must be >= 1; got {num_tokens}.")
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 1 or prompt.shape[0] < 1:
        raise ValueError(f"sample: prompt must be a (T,) array of tokens; got shape {prompt.shape}.")

    @jax.jit
    def generate(variables, window, rng):
        def body(i, carry):
            window, out = carry  # (T,), (N,)
            logits = apply_fn(variables, window[None])[0, -1]  # (V,): scores of the next token
            token = jax.random.categorical(jax.random.fold_in(rng, i), logits / temperature).astype(jnp.int32)
            return jnp.append(window[1:], token), out.at[i].set(token)  # slide the context by one

        return jax.lax.fori_loop(0, num_tokens, body, (window, jnp.zeros(num_tokens, jnp.int32)))[1]

    return np.asarray(generate(variables, prompt, rng))
