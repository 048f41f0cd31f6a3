"""Model presets by name: ``get(name, **overrides)``, ``names()`` and example inputs.

Every preset pairs a model class with the attributes that make it match its reference, and
describes its input so the CLI and the tests can build example batches for any model generically.

Example:
  >>> model = jnn.models.get("resnet20", num_classes=100, dtype=jnp.bfloat16)
  >>> x = jnn.models.example_input("resnet20", batch_size=8)  # (8, 32, 32, 3) float32
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only: nothing computed
  >>> variables["params"]["head"]["kernel"].shape
  (64, 100)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import flax.linen as nn

from jnn._names import unknown
from jnn.models._cnn import CNN, DigitsCNN, LeNet5
from jnn.models._dcgan import Discriminator, Generator
from jnn.models._generative import VAE
from jnn.models._mlp import MLP
from jnn.models._recurrent import RNNClassifier, RNNLanguageModel
from jnn.models._resnet import ResNet
from jnn.models._transformer import GPT, TransformerClassifier
from jnn.models._vit import ViT

# What the values of an example input are: images in [0, 1), token ids below the model's
# vocabulary size, or standard-normal noise (generator latents).
INPUT_KINDS: tuple[str, ...] = ("image", "tokens", "noise")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A named preset.

    Attributes:
      name: registry name, e.g. ``"resnet20"``.
      cls: the flax module class.
      kwargs: attributes that define the preset.
      description: one line naming the reference the preset reproduces.
      input_shape: maps the built model to the shape of one example (no batch axis), so
        overrides such as ``block_size`` or ``image_size`` are honoured.
      input_kind: ``"image"`` (float32), ``"tokens"`` (int32) or ``"noise"`` (float32).
    """

    name: str
    cls: type[nn.Module]
    kwargs: Mapping[str, Any]
    description: str
    input_shape: Callable[[nn.Module], tuple[int, ...]]
    input_kind: str = "image"

    @property
    def input_dtype(self) -> np.dtype:
        """int32 for token inputs, float32 otherwise."""
        return np.dtype(np.int32 if self.input_kind == "tokens" else np.float32)


def _fixed(*shape: int) -> Callable[[nn.Module], tuple[int, ...]]:
    return lambda model: shape


def _square(model: nn.Module) -> tuple[int, ...]:
    return (model.image_size, model.image_size, model.in_channels)


def _hw(model: nn.Module) -> tuple[int, ...]:
    return (*model.image_size, model.in_channels)


def _cifar_resnet(n: int) -> dict[str, Any]:
    return dict(stage_sizes=(n, n, n), widths=(16, 32, 64), stem="cifar", shortcut="A",
                num_classes=10)


_VIT_BASE = dict(image_size=224, patch_size=16, num_layers=12, num_classes=1000)
_TEXT = 200  # example sequence length of the text classifiers (the Keras IMDB examples' maxlen)
_CHARS = 128  # example sequence length of the recurrent character language models

_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("mlp_mnist", MLP, dict(hidden_sizes=(128, 64), num_classes=10, in_features=784),
              "784-128-64-10 ReLU MLP, the classic PyTorch MNIST MLP", _fixed(28, 28, 1)),
    ModelSpec("lenet5", LeNet5, {}, "LeNet-5 of the PyTorch CIFAR-10 tutorial (62,006 params)",
              _hw),
    ModelSpec("cnn_keras_mnist", CNN,
              dict(features=(32, 64), hidden_sizes=(512,), in_channels=1, image_size=(28, 28),
                   init_scheme="keras"),
              "Keras MNIST CNN: conv32-pool-conv64-pool-512-10", _hw),
    ModelSpec("cnn_cifar", CNN,
              dict(features=(32, 64), hidden_sizes=(128,), in_channels=3, image_size=(32, 32),
                   log_softmax=True),
              "PyTorch CIFAR-10 CNN: conv32-pool-conv64-pool-128-10, log-softmax output", _hw),
    ModelSpec("digits_cnn", DigitsCNN, {},
              "default model of `jnn train`: conv32-conv64-pool-128-dropout-10 for 8x8 digits",
              _hw),
    *(ModelSpec(f"resnet{6 * n + 2}", ResNet, _cifar_resnet(n),
                f"CIFAR ResNet-{6 * n + 2} (He et al. 2016, option A shortcuts)", _fixed(32, 32, 3))
      for n in (3, 5, 9)),
    ModelSpec("resnet18", ResNet, dict(stage_sizes=(2, 2, 2, 2)),
              "torchvision ResNet-18 (11,689,512 params)", _fixed(224, 224, 3)),
    ModelSpec("resnet34", ResNet, dict(stage_sizes=(3, 4, 6, 3)),
              "torchvision ResNet-34 (21,797,672 params)", _fixed(224, 224, 3)),
    ModelSpec("resnet50", ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
              "torchvision ResNet-50 v1.5 (25,557,032 params)", _fixed(224, 224, 3)),
    ModelSpec("lstm_classifier", RNNClassifier,
              dict(cell="lstm", vocab_size=20000, embed_dim=128, hidden_size=128),
              "embedding + LSTM(128) text classifier", _fixed(_TEXT), "tokens"),
    ModelSpec("gru_classifier", RNNClassifier,
              dict(cell="gru", vocab_size=20000, embed_dim=128, hidden_size=128),
              "embedding + GRU(128) text classifier", _fixed(_TEXT), "tokens"),
    ModelSpec("bilstm_imdb", RNNClassifier,
              dict(cell="lstm", vocab_size=20000, embed_dim=128, hidden_size=64, num_layers=2,
                   bidirectional=True),
              "Keras IMDB example: embedding 128 + 2 bidirectional LSTM(64)", _fixed(_TEXT),
              "tokens"),
    ModelSpec("lstm_char_lm", RNNLanguageModel, dict(cell="lstm"),
              "char-rnn: 2-layer LSTM(256) character language model", _fixed(_CHARS), "tokens"),
    ModelSpec("gru_char_lm", RNNLanguageModel, dict(cell="gru"),
              "char-rnn: 2-layer GRU(256) character language model", _fixed(_CHARS), "tokens"),
    ModelSpec("gpt2_small", GPT, {}, "GPT-2 small, 124,439,808 params with tied embeddings",
              lambda m: (m.block_size,), "tokens"),
    ModelSpec("gpt_shakespeare_char", GPT,
              dict(vocab_size=65, block_size=256, num_layers=6, num_heads=6, embed_dim=384,
                   dropout_rate=0.2, use_bias=False),
              "nanoGPT shakespeare_char (10.65M params excluding positions)",
              lambda m: (m.block_size,), "tokens"),
    ModelSpec("gpt_char_tiny", GPT,
              dict(vocab_size=65, block_size=64, num_layers=2, num_heads=2, embed_dim=64),
              "2-layer, 64-wide character GPT for the examples", lambda m: (m.block_size,),
              "tokens"),
    ModelSpec("transformer_classifier", TransformerClassifier, {},
              "Keras IMDB transformer: 1 block, 2 heads, width 32, pre-LN", _fixed(_TEXT),
              "tokens"),
    ModelSpec("vit_tiny", ViT, dict(_VIT_BASE, embed_dim=192, num_heads=3, mlp_dim=768),
              "ViT-Ti/16 at 224x224 (5,717,416 params)", _square),
    ModelSpec("vit_small", ViT, dict(_VIT_BASE, embed_dim=384, num_heads=6, mlp_dim=1536),
              "ViT-S/16 at 224x224 (22,050,664 params)", _square),
    ModelSpec("vit_base", ViT, dict(_VIT_BASE, embed_dim=768, num_heads=12, mlp_dim=3072),
              "ViT-B/16 at 224x224 (86,567,656 params)", _square),
    ModelSpec("vit_cifar_tiny", ViT,
              dict(image_size=32, patch_size=4, num_classes=10, embed_dim=64, num_layers=4,
                   num_heads=4, mlp_dim=128),
              "4-layer ViT with 4x4 patches for 32x32x3 images", _square),
    ModelSpec("vit_digits", ViT,
              dict(image_size=8, patch_size=2, in_channels=1, num_classes=10, embed_dim=32,
                   num_layers=2, num_heads=2, mlp_dim=64),
              "2-layer ViT with 2x2 patches for 8x8x1 digits", _square),
    ModelSpec("vae_mnist", VAE, {}, "PyTorch examples VAE: 784-400-20 (652,824 params)",
              lambda m: tuple(m.image_shape)),
    ModelSpec("dcgan_mnist_generator", Generator, dict(image_size=28, channels=1),
              "TensorFlow DCGAN tutorial generator, 100 -> 28x28x1", lambda m: (m.latent_dim,),
              "noise"),
    ModelSpec("dcgan_mnist_discriminator", Discriminator, dict(image_size=28, channels=1),
              "TensorFlow DCGAN tutorial discriminator, 28x28x1 -> logit",
              lambda m: (m.image_size, m.image_size, m.channels)),
    ModelSpec("dcgan_cifar_generator", Generator, dict(image_size=32, channels=3),
              "DCGAN generator, 100 -> 32x32x3", lambda m: (m.latent_dim,), "noise"),
    ModelSpec("dcgan_cifar_discriminator", Discriminator, dict(image_size=32, channels=3),
              "DCGAN discriminator, 32x32x3 -> logit",
              lambda m: (m.image_size, m.image_size, m.channels)),
)
_REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def names() -> list[str]:
    """Sorted names of every preset."""
    return sorted(_REGISTRY)


def spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of a preset.

    Raises:
      ValueError: unknown name; the message lists the valid names and close matches.
    """
    if name not in _REGISTRY:
        raise unknown("model", name, names())
    return _REGISTRY[name]


def _fields(cls: type[nn.Module]) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))


def get(name: str, **overrides: Any) -> nn.Module:
    """Builds a preset, with attribute overrides.

    Args:
      name: a preset name from ``names()``.
      **overrides: model attributes replacing the preset's, e.g. ``num_classes=100`` or
        ``dtype=jnp.bfloat16``. Lists are converted to tuples so modules stay hashable.

    Returns:
      An unbound flax module; call ``init``/``apply`` on it.

    Raises:
      ValueError: unknown name, or an override that is not an attribute of the model.
    """
    s = spec(name)
    valid = _fields(s.cls)
    extra = sorted(set(overrides) - set(valid))
    if extra:
        raise ValueError(f"model {name!r} ({s.cls.__name__}) has no attribute(s) {extra}. "
                         f"Valid overrides: {', '.join(valid)}.")
    kwargs = {**s.kwargs, **{k: tuple(v) if isinstance(v, list) else v
                             for k, v in overrides.items()}}
    return s.cls(**kwargs)


def input_spec(name: str, batch_size: int = 2, **overrides: Any) -> jax.ShapeDtypeStruct:
    """Shape and dtype of a batch for a preset (with the same overrides as ``get``).

    Example:
      >>> jnn.models.input_spec("gpt2_small", 1)
      ShapeDtypeStruct(shape=(1, 1024), dtype=int32)
      >>> shapes = jax.eval_shape(jnn.models.get("gpt2_small").init, jax.random.key(0),
      ...                         jnn.models.input_spec("gpt2_small", 1))  # nothing allocated
    """
    s = spec(name)
    shape = s.input_shape(get(name, **overrides))
    return jax.ShapeDtypeStruct((batch_size, *shape), s.input_dtype)


def example_input(name: str, batch_size: int = 2, *, seed: int = 0,
                  **overrides: Any) -> np.ndarray:
    """A deterministic example batch for a preset: valid values of the right shape and dtype.

    Images are uniform in [0, 1), tokens uniform over the model's vocabulary, generator noise
    standard normal.

    Args:
      name: a preset name.
      batch_size: leading axis.
      seed: numpy seed of the values.
      **overrides: as for ``get`` (e.g. ``block_size`` changes the sequence length).

    Returns:
      A numpy array of shape ``(batch_size, *input_shape)``.
    """
    s = spec(name)
    model = get(name, **overrides)
    shape = (batch_size, *s.input_shape(model))
    rng = np.random.default_rng(seed)
    if s.input_kind == "tokens":
        return rng.integers(0, model.vocab_size, shape, dtype=np.int32)
    if s.input_kind == "noise":
        return rng.standard_normal(shape, dtype=np.float32)
    return rng.random(shape, dtype=np.float32)
