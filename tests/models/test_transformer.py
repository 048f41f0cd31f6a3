"""Attention, GPT and the transformer classifier: sizes, causality, errors, gradients, training."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _zoo_helpers as zh
from tests import tolerances as tol
from jnn import models

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

PARAMS = {
    "gpt2_small": 124_439_808,  # GPT-2 124M with tied embeddings (HF/nanoGPT count)
    # nanoGPT prints 10.65M for shakespeare_char because it leaves out the 256x384 positions.
    "gpt_shakespeare_char": 10_646_784 + 256 * 384,
    "gpt_char_tiny": 65 * 64 + 64 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64,
    # embed + positions + one block (12C^2 + 13C with C=32 but a 32-wide MLP) + ln_f + head
    "transformer_classifier": 20000 * 32 + 200 * 32 + 6_464 + 64 + 33 * 2,
}
OUT = {"gpt2_small": (1, 1024, 50257), "gpt_shakespeare_char": (1, 256, 65),
       "gpt_char_tiny": (1, 64, 65), "transformer_classifier": (1, 2)}
TINY = dict(vocab_size=11, block_size=8, num_layers=2, num_heads=2, embed_dim=8)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_preset_sizes_and_shapes(name):
    out, variables = zh.abstract_init(models.get(name), models.input_spec(name, batch_size=1))
    assert zh.count(variables["params"]) == PARAMS[name]
    chex.assert_shape(out, OUT[name])


def test_untied_head_adds_the_output_matrix():
    x = models.input_spec("gpt2_small", batch_size=1)
    _, variables = zh.abstract_init(models.get("gpt2_small", tie_embeddings=False), x)
    assert zh.count(variables["params"]) == 124_439_808 + 50257 * 768
    assert "lm_head" in variables["params"]


def test_attention_matches_naive_softmax():
    attn = models.SelfAttention(num_heads=2, causal=True)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))  # (B, T, C)
    variables = zh.init(attn, x)
    p = jax.tree.map(np.asarray, variables["params"])
    qkv = np.einsum("btc,cknh->btknh", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, N, H)
    scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(4)  # (B, N, T, T)
    scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.einsum("bnqk,bknh->bqnh", probs, v)
    expected = np.einsum("bqnh,nhc->bqc", y, p["out"]["kernel"]) + p["out"]["bias"]
    chex.assert_trees_all_close(zh.apply(attn, variables, x), expected, rtol=tol.F32_RTOL,
                                atol=tol.F32_ATOL)
    reference = models.SelfAttention(num_heads=2, causal=True, implementation="reference")
    chex.assert_trees_all_close(zh.apply(reference, variables, x), expected, rtol=tol.F32_RTOL,
                                atol=tol.F32_ATOL)


def test_rotary_scores_depend_only_on_relative_position():
    length = 7
    q = np.broadcast_to(np.random.default_rng(0).normal(size=8), (1, length, 1, 8))
    k = np.broadcast_to(np.random.default_rng(1).normal(size=8), (1, length, 1, 8))
    rotate = zh.jit(models.apply_rotary)
    rq = np.asarray(rotate(jnp.asarray(q, jnp.float32)))  # (1, T, 1, 8)
    rk = np.asarray(rotate(jnp.asarray(k, jnp.float32)))
    scores = np.einsum("bqnh,bknh->qk", rq, rk)  # (T, T)
    for offset in range(-3, 4):
        diagonal = np.diagonal(scores, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=tol.F32_RTOL, atol=tol.F32_ATOL)
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1),
                               rtol=tol.F32_RTOL, atol=tol.F32_ATOL)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_gpt_forward_jit_eager_and_causal(positions):
    model = models.get("gpt_char_tiny", positions=positions, **TINY)
    x = jnp.asarray(models.example_input("gpt_char_tiny", batch_size=2, **TINY))  # (2, 8)
    variables = zh.init(model, x)
    if positions == "learned":
        logits = zh.assert_jit_matches(model, variables, x)
    else:
        logits = zh.apply(model, variables, x)
    chex.assert_shape(logits, (2, 8, 11))
    t = 4
    future = x.at[:, t + 1:].set((x[:, t + 1:] + 1) % 11)  # change only tokens after t
    changed = zh.apply(model, variables, future)
    chex.assert_trees_all_close(changed[:, :t + 1], logits[:, :t + 1], rtol=tol.JIT_RTOL,
                                atol=tol.JIT_ATOL)
    assert not np.allclose(changed[:, t + 1:], logits[:, t + 1:])
    # Shorter prompts are fine and agree with the prefix of the full sequence.
    chex.assert_trees_all_close(zh.apply(model, variables, x[:, :3]), logits[:, :3],
                                rtol=tol.JIT_RTOL, atol=tol.JIT_ATOL)


def test_classifier_forward_and_dropout():
    model = models.get("transformer_classifier", vocab_size=11, max_length=6, embed_dim=8,
                       mlp_dim=8, dropout_rate=0.5)
    x = jnp.array([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    variables = zh.init(model, x)
    out = zh.apply(model, variables, x)
    chex.assert_shape(out, (2, 2))
    trained = zh.apply(model, variables, x, train=True, rngs={"dropout": zh.key(1)})
    assert not np.allclose(trained, out)
    chex.assert_trees_all_equal(zh.apply(model, variables, x, rngs={"dropout": zh.key(1)}), out)


def test_bad_input_raises():
    model = models.get("gpt_char_tiny")
    with pytest.raises(ValueError, match=r"GPT expected input of shape \(B, T<=64\) .*"
                                         r"received \(2, 65\).*x\[:, -64:\]"):
        jax.eval_shape(model.init, zh.key(), jnp.zeros((2, 65), jnp.int32))
    with pytest.raises(ValueError, match=r"GPT expected input of shape \(B, T\), "
                                         r"received \(2, 4, 1\)"):
        jax.eval_shape(model.init, zh.key(), jnp.zeros((2, 4, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"TransformerClassifier expected .*T<=200"):
        jax.eval_shape(models.get("transformer_classifier").init, zh.key(),
                       jnp.zeros((1, 201), jnp.int32))
    with pytest.raises(ValueError, match="divisible by num_heads=3"):
        jax.eval_shape(models.get("gpt_char_tiny", num_heads=3).init, zh.key(),
                       jnp.zeros((1, 4), jnp.int32))


def test_gradients_float64():
    with jax.enable_x64(True):
        model = models.GPT(vocab_size=5, block_size=4, num_layers=1, num_heads=2, embed_dim=4,
                           positions="rotary", dtype=jnp.float64, param_dtype=jnp.float64)
        x = jnp.array([[1, 2, 3, 4], [4, 3, 2, 0]])
        params = zh.init(model, x)["params"]
        zh.check_vjp(lambda p: model.apply({"params": p}, x), params)


def test_bf16_close_to_f32():
    model = models.get("gpt_char_tiny", **TINY)
    x = models.example_input("gpt_char_tiny", batch_size=2, **TINY)
    variables = zh.init(model, x)
    out = zh.apply(models.get("gpt_char_tiny", dtype=jnp.bfloat16, **TINY), variables, x)
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(out, zh.apply(model, variables, x), rtol=tol.BF16_RTOL,
                                atol=tol.BF16_ATOL)


def test_gpt_learns_a_pattern():
    text = np.tile(np.arange(5), 4)[None, :]  # 0 1 2 3 4 0 1 ...
    x, y = jnp.asarray(text[:, :16], jnp.int32), jnp.asarray(text[:, 1:17], jnp.int32)
    model = models.get("gpt_char_tiny", vocab_size=5, block_size=16, num_layers=1,
                       embed_dim=16)
    params = zh.init(model, x)["params"]
    first, last = zh.train(lambda p, r: zh.cross_entropy(model.apply({"params": p}, x), y),
                           params, steps=60, learning_rate=1e-2)
    assert last < 0.1 * first, (first, last)


def test_attention_default_implementation_per_backend(monkeypatch):
    """`None` is XLA on a CPU, the reference for float64, cuDNN on a GPU only where it compiles."""
    from jnn.models import _attention

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # the same answers on a GPU host
    q32 = jnp.zeros((2, 16, 2, 8), jnp.float32)
    q16 = jnp.zeros((2, 16, 2, 8), jnp.bfloat16)
    assert _attention.resolve_implementation(None, q32, True) == "xla"
    assert _attention.resolve_implementation(None, q16, True) == "xla"  # the CPU: never probed
    assert _attention.resolve_implementation(None, jax.ShapeDtypeStruct((1, 4, 1, 2), np.float64), True) == "reference"
    assert _attention.resolve_implementation("cudnn", q32, True) == "cudnn"  # explicit: kept, fails loudly
    # XLA:CPU refuses the F16 x F16 -> F32 product of XLA's attention: float16 runs the reference, in float32.
    q_f16 = jax.random.normal(jax.random.key(1), (2, 16, 2, 8)).astype(jnp.float16)
    assert _attention.resolve_implementation(None, q_f16, True) == "reference"
    out = _attention.reference_attention(q_f16, q_f16, q_f16, True)
    expected = _attention.reference_attention(*(q_f16.astype(jnp.float32),) * 3, True)
    assert out.dtype == jnp.float16 and expected.dtype == jnp.float32
    np.testing.assert_array_equal(out, expected.astype(jnp.float16))  # computed in float32, rounded once
    # A "GPU" where cuDNN cannot compile (this CPU): the real probe fails, so XLA; float32 is never probed.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    _attention._cudnn_compiles.cache_clear()
    assert _attention.resolve_implementation(None, q32, True) == "xla"
    assert _attention._cudnn_compiles.cache_info().currsize == 0
    assert _attention.resolve_implementation(None, q16, True) == "xla"
    assert _attention._cudnn_compiles.cache_info().currsize == 1
    # Where the probe succeeds, the module runs cuDNN's attention.
    monkeypatch.setattr(_attention, "_cudnn_compiles", lambda *a: True)
    assert _attention.resolve_implementation(None, q16, False) == "cudnn"
    seen = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **k: seen.append(implementation) or real(*a, **k))
    attn = models.SelfAttention(num_heads=2, causal=True, dtype=jnp.bfloat16)
    x = jnp.ones((1, 4, 8), jnp.bfloat16)
    zh.apply(attn, zh.init(attn, x), x)
    assert seen and set(seen) == {"cudnn"}


@pytest.mark.slow
def test_gpt_vocab_padding_leaves_outputs_loss_and_gradients_unchanged():
    """GPT(vocab_multiple=m) pads the token table and head to a multiple of m rows and slices the
    logits back: with the same weights in the first vocab_size rows, the same logits, loss and
    gradients as the unpadded model; the padding rows get no gradient."""
    import jax
    import numpy as np
    import optax

    from jnn.models import GPT

    kw = dict(vocab_size=100, block_size=16, num_layers=1, num_heads=2, embed_dim=32)
    plain, padded = GPT(**kw), GPT(**kw, vocab_multiple=64)
    x = np.random.default_rng(0).integers(0, 100, size=(4, 16)).astype(np.int32)
    params = plain.init(jax.random.key(0), x)["params"]
    pad = padded.init(jax.random.key(1), x)["params"]
    assert pad["wte"]["embedding"].shape == (128, 32)
    pad = {**params, "wte": {"embedding": np.concatenate([params["wte"]["embedding"], pad["wte"]["embedding"][100:]])}}

    def loss(p, model):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean(), logits

    def grads(model):  # compiled: op by op, this test spent a minute compiling single ops
        return jax.jit(jax.value_and_grad(lambda p: loss(p, model), has_aux=True))

    (want, want_logits), want_grads = grads(plain)(params)
    (got, got_logits), got_grads = grads(padded)(pad)
    assert got_logits.shape == (4, 16, 100)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_grads["wte"]["embedding"][:100], want_grads["wte"]["embedding"], rtol=1e-5, atol=1e-7)
    assert not np.any(got_grads["wte"]["embedding"][100:])  # the padding rows never learn
