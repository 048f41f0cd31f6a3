"""Models a research user writes: correct ones, and ones carrying one realistic bug each.

`BUGS` maps each bug to (the model, its batch and loss, the check that must catch it);
`CORRECT` lists models every check must pass. tests/test_testing_mutations.py runs them; the
README's table ("What jnn.testing catches") lists the same bugs and checks.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

B, F, C = 8, 6, 4
_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(B, F)).astype(np.float32)
Y = _RNG.integers(0, C, size=B).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Subject:
    """A model with its batch, loss and options for `jnn.testing.check_model`."""

    make: Callable[[], Any]
    inputs: Any = dataclasses.field(default_factory=lambda: X)
    labels: Any = dataclasses.field(default_factory=lambda: Y)
    loss_fn: Any = "cross_entropy"
    options: dict = dataclasses.field(default_factory=dict)
    rank_promotion: str = "allow"  # a user's default jax config (jnn's own tests raise), where broadcasts pass


def digits(n: int = 8):
    """The bundled digits: real images, with blank (all-zero) patches at their borders."""
    from jnn import data  # noqa: PLC0415

    split = data.load("digits").train
    return split["inputs"][:n], split["labels"][:n]


# ---- linen: correct ----------------------------------------------------------------------------


class ReluCNN(nn.Module):
    """A plain ReLU CNN with max-pool on the digits: zero biases and blank patches put
    pre-activations exactly on ReLU's kink."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(8, (3, 3))(x)).reshape(len(x), -1)
        x = nn.Dropout(0.25, deterministic=not train)(x)
        return nn.Dense(10)(x)


class TwoInputs(nn.Module):
    """Flax's SST-2 style: token ids and lengths as two positional inputs, `deterministic`."""

    @nn.compact
    def __call__(self, ids, lengths, deterministic: bool = True):
        emb = nn.Embed(16, 8)(ids).sum(1) / lengths[:, None]
        return nn.Dense(C)(nn.Dropout(0.2, deterministic=deterministic)(nn.tanh(emb)))


class DictOutputs(nn.Module):
    """Dict inputs, dict outputs (logits and a non-per-example auxiliary loss), BatchNorm."""

    @nn.compact
    def __call__(self, batch, train: bool = False):
        h = nn.Dense(16, use_bias=False)(jnp.concatenate([batch["a"], batch["b"]], -1))
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(h))
        return {"logits": nn.Dense(C)(h), "aux": 1e-3 * jnp.mean(h ** 2)}


def dict_loss(outputs, labels):
    return optax.softmax_cross_entropy_with_integer_labels(outputs["logits"], labels) + outputs["aux"]


# ---- nnx: correct ------------------------------------------------------------------------------


class NnxBNDropout(nnx.Module):
    """Flax's NNX guide model: Linear, BatchNorm, Dropout, Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(F, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.linear2 = nnx.Linear(16, C, rngs=rngs)

    def __call__(self, x):
        return self.linear2(self.dropout(nnx.relu(self.bn(self.linear1(x)))))


class NnxCallRngs(nnx.Module):
    """Flax's NNX randomness guide / MNIST example: rngs given at call time."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(F, 16, rngs=rngs)
        self.dropout = nnx.Dropout(0.3)
        self.linear2 = nnx.Linear(16, C, rngs=rngs)

    def __call__(self, x, *, rngs: nnx.Rngs):
        return self.linear2(self.dropout(nnx.gelu(self.linear1(x)), rngs=rngs))


def _vae():
    from jnn import models  # noqa: PLC0415

    return models.get("vae_mnist", image_shape=(8, 8, 1), hidden_sizes=(16,), latent_dim=3)


CORRECT: dict[str, Subject] = {
    "linen ReLU CNN on the digits (blank patches, max-pool, dropout)":
        Subject(ReluCNN, *digits()),
    "linen two-input model (tuple inputs, `deterministic`)":
        Subject(TwoInputs, (np.arange(B * 5).reshape(B, 5) % 16, np.full(B, 5.0, np.float32)), Y),
    "linen dict inputs, dict outputs, BatchNorm, user loss":
        Subject(DictOutputs, {"a": X[:, :3], "b": X[:, 3:]}, Y, dict_loss),
    "nnx BatchNorm + Dropout (Flax's NNX guide)": Subject(lambda: NnxBNDropout(nnx.Rngs(0))),
    "nnx rngs at call time (Flax's NNX MNIST example)": Subject(lambda: NnxCallRngs(nnx.Rngs(0))),
    "zoo VAE with its 'latent' rng stream, loss 'elbo'":
        Subject(_vae, digits()[0], digits()[0], "elbo"),
    "zoo digits CNN under precision 'mixed_bf16'":
        Subject(lambda: __import__("jnn").models.get("digits_cnn"), *digits(), options={"precision": "mixed_bf16"}),
}


# ---- the bugs ----------------------------------------------------------------------------------


class DropoutOnInEval(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(0.5, deterministic=False)(x)  # BUG: always on
        return nn.Dense(C)(x)


class NoisyMomentumBN(nn.Module):
    """A hand-written BatchNorm whose momentum is drawn with numpy: once at trace time under jit,
    anew on every eager call. Only the running statistics differ."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x)
        mean = self.variable("batch_stats", "mean", jnp.zeros, (16,))
        if train:
            momentum = np.float32(np.random.uniform(0.8, 0.99))  # BUG: host randomness
            mean.value = momentum * mean.value + (1 - momentum) * x.mean(0)
            x = x - x.mean(0, keepdims=True)
        else:
            x = x - mean.value
        return nn.Dense(C)(nn.relu(x))


class BNModeBackwards(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=train, momentum=0.9)(x)  # BUG: `not train`
        return nn.Dense(C)(nn.relu(x))


class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(C)(nn.tanh(nn.Dense(16)(x)))


class OneOutput(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))  # (B, 1)


def broadcast_mse(outputs, labels):
    return (outputs - labels) ** 2  # BUG: (B, 1) - (B,) is (B, B)


def batch_scaled_ce(outputs, labels):
    losses = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    return losses / outputs.shape[0]  # BUG: divides by the batch size again: depends on the batch


class NormalizedFeatures(nn.Module):
    """A cosine classifier on L2-normalised embeddings: finite forward (max with eps), NaN
    gradient at a zero embedding (a blank example)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, use_bias=False)(x)
        h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-6)  # BUG: d norm at 0 is NaN
        return nn.Dense(C)(h)


def _with_blank_example(x):
    x = x.copy()
    x[0] = 0.0
    return x


class DropoutFixedKey(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x, rng=jax.random.key(0))  # BUG: fixed key
        return nn.Dense(C)(x)


@jax.custom_vjp
def bad_tanh(z):
    return jnp.tanh(z)


bad_tanh.defvjp(lambda z: (jnp.tanh(z), z), lambda z, g: (g * 0.5 * (1 - jnp.tanh(z) ** 2),))  # BUG: half


class WrongCustomVJP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(C)(bad_tanh(nn.Dense(16)(x)))


class FrozenByAccident(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.lax.stop_gradient(nn.relu(nn.Dense(16)(x)))  # BUG: meant to freeze nothing
        return nn.Dense(C)(h)


class WeakCounter(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        seen = self.variable("counters", "seen", lambda: jnp.asarray(0.0))  # BUG: weakly typed
        if train:
            seen.value = seen.value + jnp.float32(x.shape[0])  # becomes strongly typed: a retrace
        return nn.Dense(C)(x)


class Bf16Stat(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((F,), jnp.bfloat16))
        if train:
            mean.value = 0.9 * mean.value + 0.1 * x.mean(0)  # BUG: float32 update of a bfloat16 statistic
        return nn.Dense(C)(x - mean.value.astype(x.dtype))


class EmbeddingsInEval(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(16)(x))
        logits = nn.Dense(C)(h)
        return logits if train else (logits, h)  # BUG: returns the features too, in evaluation only


class LogOfSoftmax(nn.Module):
    @nn.compact
    def __call__(self, x):
        logits = 1e3 * nn.Dense(C)(x)  # a sharp temperature
        return jnp.log(jax.nn.softmax(logits))  # BUG: log(0) = -inf; use jax.nn.log_softmax


class NumpyAugment(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        if train:
            x = x + 0.1 * np.random.normal(size=x.shape).astype(np.float32)  # BUG: host randomness
        return nn.Dense(C)(nn.relu(nn.Dense(16)(x)))


class NnxUnusedLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(F, 16, rngs=rngs)
        self.linear2 = nnx.Linear(16, 16, rngs=rngs)
        self.out = nnx.Linear(16, C, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.linear1(x)))  # BUG: linear2 never called


class NnxDropoutInEval(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(F, 16, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(16, C, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.linear(x)), deterministic=False))  # BUG: overrides .eval()


class NnxNormOverBatch(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(F, 16, rngs=rngs)
        self.out = nnx.Linear(16, C, rngs=rngs)

    def __call__(self, x):
        h = self.linear(x)
        h = (h - h.mean(0)) / (h.std(0) + 1e-5)  # BUG: "layer norm" over the batch axis
        return self.out(nnx.relu(h))


class NnxFixedNoise(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(F, 16, rngs=rngs)
        self.out = nnx.Linear(16, C, rngs=rngs)
        self.training = True

    def train(self, **kwargs):
        super().train(**kwargs)
        self.training = True

    def eval(self, **kwargs):
        super().eval(**kwargs)
        self.training = False

    def __call__(self, x):
        h = nnx.relu(self.linear(x))
        if self.training:  # BUG: the same "random" noise every step
            h = h + 0.1 * jax.random.normal(jax.random.key(42), h.shape)
        return self.out(h)


@jax.custom_jvp
def bad_relu(z):
    return jnp.maximum(z, 0.0)


bad_relu.defjvp(lambda primals, tangents: (bad_relu(primals[0]), tangents[0]))  # BUG: slope 1 everywhere


class NnxWrongCustomJVP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(F, 16, rngs=rngs)
        self.out = nnx.Linear(16, C, rngs=rngs)

    def __call__(self, x):
        return self.out(bad_relu(self.linear(x)))


class NnxBNFrozenStats(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(F, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.out = nnx.Linear(16, C, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.bn(self.linear(x), use_running_average=True)))  # BUG: never updates


# name -> (subject, the check that must catch it, what a user wrote)
BUGS: dict[str, tuple[Subject, str, str]] = {
    "dropout on in eval (linen)": (Subject(DropoutOnInEval), "eval_deterministic",
                                   "nn.Dropout(0.5, deterministic=False)"),
    "dropout on in eval (nnx)": (Subject(lambda: NnxDropoutInEval(nnx.Rngs(0))), "eval_deterministic",
                                 "self.dropout(x, deterministic=False) overrides .eval()"),
    "running statistics differ compiled vs eager": (Subject(NoisyMomentumBN), "jit_matches_eager",
                                                    "a BatchNorm momentum drawn with np.random"),
    "BatchNorm mode wired backwards": (Subject(BNModeBackwards), "train_updates_state",
                                       "nn.BatchNorm(use_running_average=train)"),
    "BatchNorm statistics frozen (nnx)": (Subject(lambda: NnxBNFrozenStats(nnx.Rngs(0))), "train_updates_state",
                                          "self.bn(x, use_running_average=True)"),
    "(B, 1) outputs against (B,) labels": (Subject(OneOutput, labels=X[:, 0], loss_fn=broadcast_mse,
                                                   rank_promotion="allow"), "loss_per_example",
                                           "(outputs - labels) ** 2 broadcasts to (B, B)"),
    "loss divided by the batch size again": (Subject(Plain, loss_fn=batch_scaled_ce), "loss_per_example",
                                             "ce(outputs, labels) / outputs.shape[0]"),
    "NaN gradient with a finite loss": (Subject(NormalizedFeatures, _with_blank_example(np.abs(X))), "finite",
                                        "h / jnp.maximum(jnp.linalg.norm(h), 1e-6) on a zero vector"),
    "log of softmax": (Subject(LogOfSoftmax, loss_fn="nll"), "finite", "jnp.log(jax.nn.softmax(logits))"),
    "dropout from a fixed key (linen)": (Subject(DropoutFixedKey), "train_randomness",
                                         "nn.Dropout(...)(x, rng=jax.random.key(0))"),
    "noise from a fixed key (nnx)": (Subject(lambda: NnxFixedNoise(nnx.Rngs(0))), "train_randomness",
                                     "jax.random.normal(jax.random.key(42), h.shape)"),
    "numpy randomness in training": (Subject(NumpyAugment), "jit_matches_eager",
                                     "x + np.random.normal(size=x.shape)"),
    "wrong custom_vjp (linen)": (Subject(WrongCustomVJP), "gradients", "a tanh whose backward is half the truth"),
    "wrong custom_jvp (nnx)": (Subject(lambda: NnxWrongCustomJVP(nnx.Rngs(0))), "gradients",
                               "a ReLU whose derivative is 1 everywhere"),
    "stop_gradient cuts a layer off": (Subject(FrozenByAccident), "params_get_gradients",
                                       "jax.lax.stop_gradient(h) before the head"),
    "a layer defined but never called (nnx)": (Subject(lambda: NnxUnusedLayer(nnx.Rngs(0))),
                                               "params_get_gradients", "self.linear2 built in __init__, unused"),
    "a weakly typed counter": (Subject(WeakCounter), "no_retrace", "self.variable(..., lambda: jnp.asarray(0.0))"),
    "a bfloat16 statistic updated in float32": (Subject(Bf16Stat), "finite",
                                                "0.9 * bf16_stat + 0.1 * float32_mean"),
    "eval returns the features too": (Subject(EmbeddingsInEval), "output_shapes",
                                      "return logits if train else (logits, features)"),
    "normalisation over the batch axis (nnx)": (Subject(lambda: NnxNormOverBatch(nnx.Rngs(0))), "eval_per_example",
                                                "(h - h.mean(0)) / h.std(0)"),
}
