"""The preset registry: names, overrides, errors and example inputs."""
import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnn import models

CLASSES = (models.MLP, models.CNN, models.ResNet, models.RNNClassifier, models.RNNLanguageModel,
           models.GPT, models.TransformerClassifier, models.ViT, models.VAE, models.Generator,
           models.Discriminator)


def test_names_sorted_and_complete():
    names = models.names()
    assert names == sorted(names) and len(names) == len(set(names)) == 30
    for required in ("mlp_mnist", "lenet5", "cnn_keras_mnist", "cnn_cifar", "digits_cnn",
                     "resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50",
                     "gpt2_small", "gpt_char_tiny", "vit_tiny", "vit_small", "vit_base",
                     "vae_mnist"):
        assert required in names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_model_has_the_common_attributes(cls):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert fields["dtype"].default == jnp.float32
    assert fields["param_dtype"].default == jnp.float32
    train = inspect.signature(cls.__call__).parameters["train"]
    assert train.default is False
    assert cls.__doc__ and "Input" in cls.__doc__ and "Output" in cls.__doc__


def test_overrides_are_applied():
    model = models.get("resnet20", num_classes=100, dtype=jnp.bfloat16, widths=[8, 16, 32])
    assert model.num_classes == 100 and model.dtype == jnp.bfloat16
    assert model.widths == (8, 16, 32)  # lists become tuples: modules stay hashable
    hash(model)
    assert models.get("resnet20").num_classes == 10  # presets are not mutated


def test_unknown_name_lists_valid_names_and_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'resnet2'; expected one of \[.*'digits_cnn'.*'vit_tiny'.*\]\. "
                                         r"Did you mean 'resnet\d+'"):
        models.get("resnet2")
    with pytest.raises(ValueError, match="expected one of"):
        models.example_input("nope")


def test_unknown_override_lists_valid_fields():
    with pytest.raises(ValueError, match=r"model 'gpt2_small' \(GPT\) has no attribute\(s\) "
                                         r"\['num_class'\]\. Valid overrides: .*block_size"):
        models.get("gpt2_small", num_class=3)


@pytest.mark.parametrize("name", models.names())
def test_example_input_matches_input_spec(name):
    x = models.example_input(name, batch_size=3)
    spec = models.input_spec(name, batch_size=3)
    assert x.shape == spec.shape and x.dtype == spec.dtype
    assert models.spec(name).description
    model = models.get(name)
    if spec.dtype == np.int32:
        assert 0 <= x.min() and x.max() < model.vocab_size
    elif models.spec(name).input_kind == "image":
        assert 0 <= x.min() and x.max() < 1
    np.testing.assert_array_equal(x, models.example_input(name, batch_size=3))  # deterministic


def test_example_input_follows_overrides():
    assert models.example_input("gpt_char_tiny", 2, block_size=16).shape == (2, 16)
    assert models.example_input("vit_digits", 2, image_size=16).shape == (2, 16, 16, 1)
    assert models.example_input("lenet5", 1, in_channels=1).shape == (1, 32, 32, 1)
    tokens = models.example_input("gpt_char_tiny", 4, vocab_size=3)
    assert tokens.max() < 3


def test_input_spec_drives_eval_shape():
    model = models.get("digits_cnn")
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                         models.input_spec("digits_cnn", batch_size=5))
    assert out.shape == (5, 10)
