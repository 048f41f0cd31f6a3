"""The jnn model zoo: flax.linen modules by architecture family, and presets by name.

Example:
  >>> import jax, jnn
  >>> model = jnn.models.get("digits_cnn")
  >>> x = jnn.models.example_input("digits_cnn", batch_size=4)  # (4, 8, 8, 1)
  >>> variables = model.init(jax.random.key(0), x)
  >>> logits = model.apply(variables, x)  # (4, 10)

Every model takes ``dtype`` (compute) and ``param_dtype``, is called as ``model.apply(variables,
x, train=...)``, draws dropout from the rng stream ``"dropout"`` (the VAE also uses
``"latent"``), keeps BatchNorm statistics in the ``batch_stats`` collection, and returns logits
in at least float32.

Weights from Hugging Face GPT-2, torchvision ResNets and timm / Hugging Face ViTs load into the
zoo with ``from_pretrained(name, path)``.
"""
from jnn.models._attention import SelfAttention, apply_rotary
from jnn.models._cnn import CNN, DigitsCNN, LeNet5
from jnn.models._dcgan import Discriminator, Generator
from jnn.models._generative import LATENT_RNG, VAE, elbo_loss
from jnn.models._mlp import MLP
from jnn.models._pretrained import PretrainedReport, from_pretrained
from jnn.models._recurrent import RNNClassifier, RNNLanguageModel
from jnn.models._registry import ModelSpec, example_input, get, input_spec, names, spec
from jnn.models._resnet import BasicBlock, Bottleneck, ResNet
from jnn.models._sampling import sample
from jnn.models._transformer import GPT, MlpBlock, TransformerBlock, TransformerClassifier
from jnn.models._vit import ViT

__all__ = [
    "CNN",
    "GPT",
    "LATENT_RNG",
    "MLP",
    "VAE",
    "BasicBlock",
    "Bottleneck",
    "DigitsCNN",
    "Discriminator",
    "Generator",
    "LeNet5",
    "MlpBlock",
    "ModelSpec",
    "PretrainedReport",
    "RNNClassifier",
    "RNNLanguageModel",
    "ResNet",
    "SelfAttention",
    "TransformerBlock",
    "TransformerClassifier",
    "ViT",
    "apply_rotary",
    "elbo_loss",
    "example_input",
    "from_pretrained",
    "get",
    "input_spec",
    "names",
    "sample",
    "spec",
]
