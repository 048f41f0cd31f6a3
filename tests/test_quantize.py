"""Int8 quantization with qwix: PTQ of the default CNN within a point of float accuracy, logits
within a stated tolerance, sizes computed from the arrays; QAT trains with jnn's step."""
import jax
import numpy as np
import optax
import pytest

import jnn
from jnn import quantize
from tests._tiny import TinyNnxLinear

SPLITS = jnn.data.load("digits", val_fraction=0.1, seed=0)
X, Y = SPLITS.test["inputs"], SPLITS.test["labels"]


@pytest.fixture(scope="module")
def trained():
    state = jnn.create_train_state(jnn.models.get("digits_cnn", num_classes=10), optax.adam(1e-3),
                                   SPLITS.train["inputs"][:1], 0)
    return jnn.fit(state, jnn.data.Pipeline(SPLITS.train, 64, seed=0), num_steps=300, loss_fn="cross_entropy",
                   progress=False).state


def test_int8_ptq_of_the_default_cnn_keeps_accuracy_and_shrinks_it_4x(trained):
    q = quantize.ptq(trained)
    float_logits = np.asarray(trained.apply_fn(trained.variables, X, train=False))
    int8_logits = np.asarray(q(X))
    float_acc, int8_acc = (float_logits.argmax(-1) == Y).mean(), (int8_logits.argmax(-1) == Y).mean()
    diff = float(np.abs(float_logits - int8_logits).max())
    print(f"int8 PTQ: accuracy {float_acc:.4f} -> {int8_acc:.4f}, max logit difference {diff:.3f}, "
          f"{q.float_nbytes:,} -> {q.nbytes:,} bytes")
    assert abs(int8_acc - float_acc) < 0.01
    assert diff < 0.5  # measured 0.13 on logits of magnitude ~10
    kernels = {k: v for k, v in jnn.transfer.flatten(q.params).items() if "qvalue" in k}
    assert len(kernels) == 4 and all(v.dtype == np.int8 for v in kernels.values())
    assert q.nbytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(q.params))
    assert q.float_nbytes == sum(x.size * 4 for x in jax.tree.leaves(trained.params))
    assert q.nbytes < q.float_nbytes / 3.5


def test_qat_trains_with_the_jnn_step_and_converts_to_int8():
    model = quantize.qat(jnn.models.get("digits_cnn", num_classes=10))
    state = jnn.create_train_state(model, optax.adam(1e-3), SPLITS.train["inputs"][:1], 0)
    result = jnn.fit(state, jnn.data.Pipeline(SPLITS.train, 64, seed=0), num_steps=100, loss_fn="cross_entropy",
                     log_every=50, progress=False)
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    assert losses[-1] < losses[0] / 2
    q = quantize.ptq(result.state)  # the float model behind the QAT wrapper
    qat_acc = jnn.evaluate(result.state, jnn.data.Pipeline(SPLITS.test, 256, train=False),
                           loss_fn="cross_entropy")["accuracy"]
    assert abs((np.asarray(q(X)).argmax(-1) == Y).mean() - qat_acc) < 0.02


def test_quantize_refuses_what_it_cannot_do():
    state = jnn.create_train_state(TinyNnxLinear(), optax.sgd(0.1), X[:1], 0)
    with pytest.raises(ValueError, match=r"created from a flax.nnx module; jnn.quantize covers linen"):
        quantize.ptq(state)
    with pytest.raises(ValueError, match=r"weight='int3'; expected one of \['int8', 'int4'\]"):
        quantize.rules(weight="int3")
    with pytest.raises(ValueError, match=r"quantize='int4'; expected quantize 'int8' or None"):
        jnn.TrainConfig(quantize="int4")


def test_ptq_of_a_lora_state_quantizes_the_merged_weights():
    """ptq on a LoRA state merges the adapters first: the same int8 model as merge-then-ptq."""
    import dataclasses

    state = jnn.create_train_state(jnn.models.get("digits_cnn", num_classes=10), optax.adam(1e-3), X[:1], 0)
    adapted = jnn.lora.apply(state, jnn.lora.LoRA(rank=2), optax.adam(1e-3))
    rng = np.random.default_rng(0)  # adapters that change the model (B starts at zero)
    lora_params = jax.tree.map(lambda a: np.asarray(rng.normal(0, 0.1, a.shape), a.dtype), adapted.params["lora"])
    adapted = adapted.replace(params={**adapted.params, "lora": lora_params})
    merged = jnn.lora.merge(adapted)
    plain = adapted.replace(params=merged, model=dataclasses.replace(adapted.model, reparam=None))

    q_lora, q_merged = quantize.ptq(adapted), quantize.ptq(plain)
    assert jax.tree.structure(q_lora.params) == jax.tree.structure(q_merged.params)
    for a, b in zip(jax.tree.leaves(q_lora.params), jax.tree.leaves(q_merged.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(q_lora(X[:32]), q_merged(X[:32]))
    base = quantize.ptq(state)  # the adapters are in: not the base model's int8 weights
    assert not np.array_equal(np.asarray(base(X[:32])), np.asarray(q_lora(X[:32])))
    assert q_lora.float_nbytes == sum(x.size * 4 for x in jax.tree.leaves(merged))
