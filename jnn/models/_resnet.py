"""ResNets with BatchNorm: CIFAR ResNet-20/32/56 and ImageNet ResNet-18/34/50.

References: He et al. 2016 ("Deep Residual Learning", section 4.2 for the CIFAR networks) and
torchvision's ``resnet.py`` (stem, v1.5 bottleneck with the stride on the 3x3 convolution,
Kaiming-normal fan-out initialisation, BatchNorm momentum 0.1 in PyTorch's convention).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jnn import layers
from jnn.models._init import kaiming_fan_out_init, layer_inits
from jnn.models._io import check_shape, output_dtype

# flax momentum is the weight of the old statistic: 0.9 here equals PyTorch's momentum=0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
SHORTCUTS: tuple[str, ...] = ("A", "B")

_PAD1 = ((1, 1), (1, 1))  # PyTorch padding=1, also for stride 2 (SAME would pad (0, 1)).


class _Block(nn.Module):
    """What every residual block takes: its width, stride, layer factories and shortcut option."""

    features: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    last_norm: Callable[..., nn.Module]
    shortcut: str = "B"


class BasicBlock(_Block):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34 and the CIFAR ResNets)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = (self.strides, self.strides)
        y = self.conv(self.features, (3, 3), s, padding=_PAD1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), padding=_PAD1, name="conv2")(y)
        y = self.last_norm(name="bn2")(y)
        return nn.relu(y + _shortcut(self, x, self.features))


class Bottleneck(_Block):
    """1x1 -> 3x3 (strided, "ResNet v1.5") -> 1x1 x4 bottleneck (ResNet-50 and deeper)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = (self.strides, self.strides)
        y = self.conv(self.features, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), s, padding=_PAD1, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features * 4, (1, 1), name="conv3")(y)
        y = self.last_norm(name="bn3")(y)
        return nn.relu(y + _shortcut(self, x, self.features * 4))


def _shortcut(block: nn.Module, x: jax.Array, out_features: int) -> jax.Array:
    """Identity, or the downsampling shortcut when the stride or the width changes.

    Option A (He et al., CIFAR): subsample and zero-pad the channels, no parameters.
    Option B (torchvision): 1x1 strided convolution + BatchNorm.
    """
    if block.strides == 1 and x.shape[-1] == out_features:
        return x
    if block.shortcut == "A":
        x = x[:, :: block.strides, :: block.strides, :]  # (B, H/s, W/s, C)
        pad = out_features - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
    s = (block.strides, block.strides)
    x = block.conv(out_features, (1, 1), s, name="downsample_conv")(x)
    return block.norm(name="downsample_bn")(x)


class ResNet(nn.Module):
    """Residual network with BatchNorm.

    Input: (B, H, W, in_channels) floats, NHWC (any H, W: global average pooling before the head).
    Output: (B, num_classes) logits. In training (``train=True``) BatchNorm uses batch statistics
    and updates ``batch_stats`` (apply with ``mutable=["batch_stats"]``); in evaluation it uses the
    running averages.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 3, 3) for ResNet-20, (2, 2, 2, 2) for ResNet-18.
      widths: channels of each stage (before the bottleneck expansion).
      block: ``"basic"`` or ``"bottleneck"``.
      stem: ``"cifar"`` (3x3 conv, no pooling) or ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool).
      shortcut: ``"A"`` (zero-padding identity, He et al. CIFAR) or ``"B"`` (1x1 projection).
      num_classes: output width.
      in_channels: expected input channels (checked).
      zero_init_residual: zero the last BatchNorm scale of every block (Goyal et al. 2017).
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics (pmap/shard_map).
      bn_momentum: flax momentum of the running statistics (0.9 = PyTorch 0.1).
      bn_epsilon: BatchNorm epsilon.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    block: str = "basic"
    stem: str = "imagenet"
    shortcut: str = "B"
    num_classes: int = 1000
    in_channels: int = 3
    zero_init_residual: bool = False
    bn_axis_name: str | None = None
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _validate(self) -> None:
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError(
                f"ResNet expected one width per stage ({len(self.stage_sizes)} stages), "
                f"received widths={tuple(self.widths)}."
            )
        for field, value, valid in (("block", self.block, ("basic", "bottleneck")),
                                    ("stem", self.stem, ("cifar", "imagenet")),
                                    ("shortcut", self.shortcut, SHORTCUTS)):
            if value not in valid:
                raise ValueError(f"ResNet {field} must be one of {valid}, received {value!r}.")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        self._validate()
        check_shape("ResNet", x, ("B", "H", "W", self.in_channels), "Images are NHWC.")
        conv = functools.partial(layers.Conv, use_bias=False, kernel_init=kaiming_fan_out_init,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                                 momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                                 axis_name=self.bn_axis_name, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        last_norm = (functools.partial(norm, scale_init=nn.initializers.zeros)
                     if self.zero_init_residual else norm)
        block_cls = BasicBlock if self.block == "basic" else Bottleneck

        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(self.widths[0], (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))  # (B, H/2, W/2, C)
            x = layers.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD1)  # (B, H/4, W/4, C)
        else:
            x = conv(self.widths[0], (3, 3), padding=_PAD1, name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(size):
                strides = 2 if i > 0 and j == 0 else 1
                x = block_cls(width, strides, conv, norm, last_norm, self.shortcut,
                              name=f"stage{i + 1}_block{j + 1}")(x)
        x = jnp.mean(x, axis=(1, 2))  # (B, C)
        fan_in = x.shape[-1]
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="head", **layer_inits("torch", fan_in))(x)  # (B, K)
        return x.astype(output_dtype(self.dtype))
