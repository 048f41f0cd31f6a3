"""The benchmark workloads and the JAX peers of jnn's step: raw JAX + optax, and flax's TrainState.

A `Workload` names a flax model, its batch and the PyTorch twin (`benchmarks/torch_peer.py`) of
it. The throughput workloads of the CPU suite are W1 and W3-W7 (`cpu_workloads`); W2 (time to
accuracy on the digits, `benchmarks/digits_tta.py`) and W8 (data parallel on fake devices,
`benchmarks/parallel.py`) measure other things and are run by the harness's CLI itself. The GPU
suite's workloads are in `benchmarks/gpu.py`.

The raw peer is the step a user writes by hand around the same flax model: tuples in and out,
`jax.value_and_grad`, `optax.adam`, `jax.jit` with donation. The flax peer is the step of the flax
examples around `flax.training.train_state.TrainState`. Every candidate computes the loss and the
accuracy of the batch (what the flax examples' steps return), so they do the same work.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import jnn

LR = 1e-3
NUM_BATCHES = 4  # synthetic batches, rotated (placed on the device once)
loss_fn = optax.softmax_cross_entropy_with_integer_labels


@dataclasses.dataclass(frozen=True)
class Workload:
    """One throughput workload.

    Attributes:
      name: "W1", ...
      title: what it is, for the tables.
      model: builds the flax model (jnn's preset where there is one).
      batch_size: examples per step.
      input_shape: one example's shape; (T,) token ids for a language model.
      num_classes: classes, or the vocabulary of a language model.
      tokens: a language model (labels (B, T); throughput counted in tokens).
      torch_model: the PyTorch twin's name in `torch_peer.build_models`, or None.
      torch_kwargs: its constructor's arguments.
      precision: a `jnn.precision` policy name for jnn's state (the GPU suite), or None.
      torch_amp: autocast dtype of the PyTorch peers ("bfloat16"), or None.
      channels_last: PyTorch peers in channels-last memory format (convnets on GPU).
      model_flops: analytic training FLOPs per step (e.g. nanoGPT's 6N + attention estimate), or
        None; the harness always also reports XLA's cost-analysis count.
      jnn_losses: other `jnn.losses` names to time jnn's step with, as candidates `jnn_<name>`.
    """

    name: str
    title: str
    model: Callable[[], Any]
    batch_size: int
    input_shape: tuple[int, ...]
    num_classes: int
    tokens: bool = False
    torch_model: str | None = None
    torch_kwargs: dict = dataclasses.field(default_factory=dict)
    precision: str | None = None
    torch_amp: str | None = None
    channels_last: bool = False
    model_flops: float | None = None
    jnn_losses: tuple[str, ...] = ()

    @property
    def items_per_step(self) -> int:
        """Examples, or tokens for a language model, per step."""
        return self.batch_size * (int(np.prod(self.input_shape)) if self.tokens else 1)

    @property
    def unit(self) -> str:
        return "tokens" if self.tokens else "examples"


def gpt_flops(num_params: int, num_layers: int, embed_dim: int, context: int, tokens: int) -> float:
    """nanoGPT's (PaLM appendix B) training FLOPs: 6N per token plus 12 L C T for attention."""
    return float(tokens * (6 * num_params + 12 * num_layers * embed_dim * context))


def cpu_workloads() -> dict[str, Workload]:
    """W1 and W3-W7 at the sizes of issue 12."""
    gpt = dict(vocab_size=65, block_size=128, num_layers=4, num_heads=4, embed_dim=256)
    lstm = dict(vocab_size=65, embed_dim=64, hidden_size=256, num_layers=2)
    wide = (1024, 2048, 2048, 2048, 2048, 1024)
    return {w.name: w for w in (
        Workload("W1", "tiny MLP 784-128-64-10 (dispatch-bound)", lambda: jnn.models.get("mlp_mnist"), 32,
                 (28, 28, 1), 10, torch_model="mlp", torch_kwargs={"sizes": [784, 128, 64, 10]}),
        Workload("W3", "Keras MNIST CNN (cnn_keras_mnist)", lambda: jnn.models.get("cnn_keras_mnist"), 128,
                 (28, 28, 1), 10, torch_model="keras_cnn"),
        Workload("W4", "compute-bound MLP 1024-2048x4-1024",
                 lambda: jnn.models.MLP(hidden_sizes=wide[1:-1], num_classes=wide[-1], in_features=wide[0]),
                 1024, (wide[0],), wide[-1], torch_model="mlp", torch_kwargs={"sizes": list(wide)}),
        Workload("W5", "CIFAR ResNet-20", lambda: jnn.models.get("resnet20"), 128, (32, 32, 3), 10,
                 torch_model="resnet", torch_kwargs=dict(stage_sizes=[3, 3, 3], widths=[16, 32, 64], stem="cifar",
                                                         shortcut="A", num_classes=10)),
        Workload("W6", "GPT decoder, 4 layers, width 256, context 128", lambda: jnn.models.GPT(**gpt), 16,
                 (gpt["block_size"],), gpt["vocab_size"], tokens=True, torch_model="gpt", torch_kwargs=gpt),
        Workload("W7", "LSTM language model, 2 x 256 (lstm_char_lm), context 128",
                 lambda: jnn.models.get("lstm_char_lm", **lstm), 32, (128,), lstm["vocab_size"], tokens=True,
                 torch_model="lstm", torch_kwargs=lstm),
    )}


def make_batches(w: Workload, count: int = NUM_BATCHES, seed: int = 0) -> list[dict]:
    """`count` synthetic host batches of the workload's shapes."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        if w.tokens:
            x = rng.integers(0, w.num_classes, (w.batch_size, *w.input_shape)).astype(np.int32)  # (B, T)
            y = rng.integers(0, w.num_classes, (w.batch_size, *w.input_shape)).astype(np.int32)  # (B, T)
        else:
            x = rng.random((w.batch_size, *w.input_shape), dtype=np.float32)  # (B, ...)
            y = rng.integers(0, w.num_classes, w.batch_size).astype(np.int32)  # (B,)
        batches.append({"inputs": x, "labels": y})
    return batches


def accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, -1) == labels)


# ------------------------------------------------------------------------------ raw JAX + optax


def make_raw_step(model, tx: optax.GradientTransformation, loss=loss_fn, jit=jax.jit):
    """The step written by hand: `((params, opt_state, batch_stats), batch) -> (carry, metrics)`.

    Returns the step compiled by `jit` (carry donated). `loss(logits, labels)` gives per-example
    losses.
    """

    def step(carry, batch):
        params, opt_state, batch_stats = carry
        x, y = batch["inputs"], batch["labels"]

        def compute_loss(p):
            if batch_stats:
                logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                              mutable=["batch_stats"])
                return loss(logits, y).mean(), (logits, updates["batch_stats"])
            logits = model.apply({"params": p}, x, train=True)
            return loss(logits, y).mean(), (logits, batch_stats)

        (value, (logits, stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, stats), {"loss": value, "accuracy": accuracy(logits, y)}

    return jit(step, donate_argnums=0)


# ------------------------------------------------------------------------------ flax TrainState


class FlaxState(train_state.TrainState):
    """flax's TrainState plus the BatchNorm statistics, as the flax ImageNet example adds them."""

    batch_stats: Any = None


def make_flax_step():
    """The flax examples' step: `(FlaxState, batch) -> (FlaxState, metrics)`, jitted, donated."""

    def step(state: FlaxState, batch):
        x, y = batch["inputs"], batch["labels"]

        def compute_loss(params):
            if state.batch_stats:
                logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                                 train=True, mutable=["batch_stats"])
                return loss_fn(logits, y).mean(), (logits, updates["batch_stats"])
            logits = state.apply_fn({"params": params}, x, train=True)
            return loss_fn(logits, y).mean(), (logits, state.batch_stats)

        (value, (logits, stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=stats)
        return state, {"loss": value, "accuracy": accuracy(logits, y)}

    return jax.jit(step, donate_argnums=0)


def copy(tree):
    """Private buffers for one candidate (steps donate their inputs)."""
    return jax.tree.map(jnp.copy, tree)
