"""Test-local models and data for the parallel tests (also imported by the multi-process worker)."""
import flax.linen as nn
import numpy as np
import optax

CE = optax.softmax_cross_entropy_with_integer_labels
FEATURES, CLASSES, GLOBAL_BATCH, STEPS = 12, 10, 64, 10


class MLP(nn.Module):
    """(B, F) -> (B, classes); no model state."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(32)(x))
        return nn.Dense(CLASSES)(x)


class BNNet(nn.Module):
    """(B, F) -> (B, classes) with BatchNorm whose cross-device axis is the `bn_axis_name` attribute.

    The Dense before BatchNorm has no bias: BatchNorm removes any shift, so that bias's gradient is
    exactly zero in exact arithmetic and only rounding noise in float32, which Adam would scale up
    to full-size steps in directions that differ between reduction orders.
    """

    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(32, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name)(x)
        x = nn.relu(x)
        return nn.Dense(CLASSES)(x)


def batches(steps: int = STEPS, batch_size: int = GLOBAL_BATCH, seed: int = 0) -> list[dict]:
    """`steps` different global batches, identical for every path and process."""
    rng = np.random.default_rng(seed)
    return [{"inputs": rng.normal(size=(batch_size, FEATURES)).astype(np.float32),
             "labels": rng.integers(0, CLASSES, size=batch_size).astype(np.int32)}
            for _ in range(steps)]


def optimizer():
    return optax.adam(1e-2)
