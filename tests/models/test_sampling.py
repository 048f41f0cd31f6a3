"""Autoregressive sampling: shapes, vocabulary, determinism, greedy limit, bad arguments."""
import jax
import numpy as np
import pytest

import jnn

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py


@pytest.fixture(scope="module")
def lm():
    model = jnn.models.get("gpt_char_tiny", vocab_size=11, block_size=8, num_layers=1, embed_dim=16)
    prompt = np.arange(8, dtype=np.int32) % 11
    variables = jax.jit(model.init)(jax.random.key(0), prompt[None])
    return model, variables, prompt


def test_sample_shape_vocabulary_and_determinism(lm):
    model, variables, prompt = lm
    a = jnn.models.sample(model.apply, variables, prompt, 12, rng=jax.random.key(1))
    b = jnn.models.sample(model.apply, variables, prompt, 12, rng=jax.random.key(1))
    c = jnn.models.sample(model.apply, variables, prompt, 12, rng=jax.random.key(2))
    assert a.shape == (12,) and a.dtype == np.int32
    assert a.min() >= 0 and a.max() < 11
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_low_temperature_is_greedy_decoding(lm):
    model, variables, prompt = lm
    tokens = jnn.models.sample(model.apply, variables, prompt, 4, rng=jax.random.key(3), temperature=1e-4)
    window, greedy = prompt.copy(), []
    for _ in range(4):  # the same sliding window, decoded greedily by hand
        nxt = int(np.argmax(model.apply(variables, window[None])[0, -1]))
        greedy.append(nxt)
        window = np.append(window[1:], nxt)
    np.testing.assert_array_equal(tokens, greedy)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"num_tokens": 0}, "num_tokens must be >= 1"),
    ({"prompt": np.zeros((2, 3), np.int32)}, r"prompt must be a \(T,\) array"),
])
def test_bad_arguments(lm, kwargs, match):
    model, variables, prompt = lm
    args = {"prompt": prompt, "num_tokens": 3, "temperature": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        jnn.models.sample(model.apply, variables, args["prompt"], args["num_tokens"], rng=jax.random.key(0),
                          temperature=args["temperature"])
