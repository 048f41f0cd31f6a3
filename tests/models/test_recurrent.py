"""LSTM/GRU classifiers and language models: sizes, causality, gradients, training."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _zoo_helpers as zh
from tests import tolerances as tol
from jnn import models

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py


def lstm(i, h):  # flax OptimizedLSTMCell: 4 input kernels (no bias), 4 hidden kernels + biases
    return 4 * i * h + 4 * (h * h + h)


def gru(i, h):  # flax GRUCell: 3 input kernels + biases, 3 hidden kernels, 1 hidden bias
    return 3 * (i * h + h) + 3 * h * h + h


PARAMS = {
    "lstm_classifier": 20000 * 128 + lstm(128, 128) + 129 * 2,
    "gru_classifier": 20000 * 128 + gru(128, 128) + 129 * 2,
    # Keras's IMDB bidirectional LSTM example has 2,757,761: its head is one sigmoid unit, ours
    # two logits (+1).
    "bilstm_imdb": 20000 * 128 + 2 * lstm(128, 64) + 2 * lstm(128, 64) + 129 * 2,
    "lstm_char_lm": 65 * 64 + lstm(64, 256) + lstm(256, 256) + 257 * 65,
    "gru_char_lm": 65 * 64 + gru(64, 256) + gru(256, 256) + 257 * 65,
}
OUT = {"lstm_char_lm": (2, 128, 65), "gru_char_lm": (2, 128, 65)}
SMALL = dict(vocab_size=7, embed_dim=4, hidden_size=6)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_preset_sizes_and_shapes(name):
    out, variables = zh.abstract_init(models.get(name), models.input_spec(name, batch_size=2))
    assert zh.count(variables["params"]) == PARAMS[name]
    chex.assert_shape(out, OUT.get(name, (2, 2)))


@pytest.mark.parametrize("name", ["bilstm_imdb", "gru_char_lm"])
def test_small_forward_jit_and_eager(name):
    model = models.get(name, num_layers=1, **SMALL)
    x = models.example_input(name, batch_size=2, **SMALL)[:, :5]  # (2, 5)
    out = zh.assert_jit_matches(model, zh.init(model, x), x)
    chex.assert_shape(out, (2, 5, 7) if name == "gru_char_lm" else (2, 2))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_language_model_is_causal(cell):
    model = models.RNNLanguageModel(cell=cell, num_layers=1, **SMALL)
    x = jnp.array([[1, 2, 3, 4, 5, 6]])
    variables = zh.init(model, x)
    future = x.at[:, 3:].set(0)  # change tokens 3..5
    a, b = zh.apply(model, variables, x), zh.apply(model, variables, future)
    chex.assert_trees_all_close(a[:, :3], b[:, :3], rtol=0, atol=0)
    assert not np.allclose(a[:, 3:], b[:, 3:])


def test_bidirectional_reads_both_ends():
    model = models.RNNClassifier(bidirectional=True, **SMALL)
    x = jnp.array([[1, 2, 3, 4, 5, 6]])
    variables = zh.init(model, x)
    base = zh.apply(model, variables, x)
    # The head reads the forward state at T-1 and the backward state at 0: both summarise the
    # whole sequence, so changing either end changes the logits.
    for changed in (x.at[0, 0].set(0), x.at[0, -1].set(0)):
        assert not np.allclose(zh.apply(model, variables, changed), base)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"RNNClassifier expected input of shape "
                                         r"\(B, T, 3\), received \(2, 5, 4\)"):
        jax.eval_shape(models.RNNClassifier(in_features=3).init, zh.key(), jnp.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match=r"RNNLanguageModel expected integer token ids .*float32"):
        jax.eval_shape(models.get("lstm_char_lm").init, zh.key(), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="cell must be one of"):
        jax.eval_shape(models.RNNLanguageModel(cell="rnn").init, zh.key(),
                       jnp.zeros((2, 5), jnp.int32))


@pytest.mark.parametrize("cell,bidirectional", [("lstm", True), ("gru", False)])
def test_gradients_float64(cell, bidirectional):
    with jax.enable_x64(True):
        model = models.RNNClassifier(cell=cell, hidden_size=3, bidirectional=bidirectional,
                                     num_classes=2, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(0), (2, 3, 2), jnp.float64)  # (B, T, F)
        params = zh.init(model, x)["params"]
        zh.check_vjp(lambda p: model.apply({"params": p}, x), params)


def test_bf16_close_to_f32():
    model = models.RNNLanguageModel(cell="lstm", num_layers=1, **SMALL)
    x = jnp.array([[1, 2, 3, 4, 5, 6]])
    variables = zh.init(model, x)
    out = zh.apply(models.RNNLanguageModel(cell="lstm", num_layers=1, dtype=jnp.bfloat16,
                                           **SMALL), variables, x)
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(out, zh.apply(model, variables, x), rtol=tol.BF16_RTOL,
                                atol=tol.BF16_ATOL)


def test_classifier_learns_to_remember_first_token():
    # The label is the first of 8 tokens: only a working recurrence carries it to the last step.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 4, (64, 8)), jnp.int32)
    y = x[:, 0]
    model = models.RNNClassifier(cell="gru", vocab_size=4, embed_dim=8, hidden_size=16,
                                 num_classes=4)
    params = zh.init(model, x)["params"]
    first, last = zh.train(lambda p, r: zh.cross_entropy(model.apply({"params": p}, x), y),
                           params, steps=150, learning_rate=2e-2)
    assert last < tol.TRAIN_LOSS_RATIO * first, (first, last)


def test_char_lm_learns_a_pattern():
    text = np.tile(np.arange(5), 8)[None, :]  # 0 1 2 3 4 0 1 2 ...
    x, y = jnp.asarray(text[:, :-1], jnp.int32), jnp.asarray(text[:, 1:], jnp.int32)
    model = models.RNNLanguageModel(cell="lstm", vocab_size=5, embed_dim=8, hidden_size=16,
                                    num_layers=1)
    params = zh.init(model, x)["params"]
    first, last = zh.train(lambda p, r: zh.cross_entropy(model.apply({"params": p}, x), y),
                           params, steps=60, learning_rate=3e-2)
    assert last < 0.1 * first, (first, last)
