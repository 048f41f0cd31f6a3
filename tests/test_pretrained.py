"""Weights from Hugging Face GPT-2, torchvision ResNets, timm and Hugging Face ViTs give the source
library's own logits (float32, eval mode), train one step, and fine-tune with LoRA or frozen layers.

Each source model is the real library's, randomly initialised with a small config (no weights can be
downloaded here) and saved with that library's own code; its parameters and BatchNorm statistics
are randomised strongly, so that a wrong mapping cannot hide behind a near-zero initialisation. Each
parity test prints its figure (`PARITY ...`): the README's table copies them.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jnn
from tests._interop import import_reference, import_torchvision
from tests.tolerances import PARITY_RTOL



def _randomise(module, seed=0):
    """Every parameter and buffer drawn at random (running variances positive), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or name.endswith("attn.bias") or name.endswith("masked_bias"):
                continue  # GPT-2's causal mask buffers (older transformers) stay as they are
            r = torch.randn(t.shape, generator=g)
            t.copy_(0.5 + r.abs() if name.endswith("running_var") else 0.2 * r)
    return module.eval()


def _relative(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _report_figure(source, config, diff):
    print(f"PARITY | {source} | {config} | {diff:.1e}")


def _logits(state, x):
    return jax.jit(lambda v, x: state.apply_fn(v, x))(state.variables, x)


# -------------------------------------------------------------------------------- GPT-2

GPT_CONFIG = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=16)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    transformers = import_reference("transformers")
    model = _randomise(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT_CONFIG)))
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    tokens = np.random.default_rng(0).integers(0, GPT_CONFIG["vocab_size"], (3, 16)).astype(np.int32)
    with torch.no_grad():
        reference = model(torch.from_numpy(tokens).long()).logits.numpy()
    return model, folder, tokens, reference


def test_gpt2_from_a_save_pretrained_folder_gives_transformers_logits(gpt2):
    model, folder, tokens, reference = gpt2
    state, report = jnn.models.from_pretrained("gpt2", folder)
    diff = _relative(_logits(state, tokens), reference)
    _report_figure("transformers GPT2LMHeadModel", "2 layers, 2 heads, width 32, vocab 101, context 16", diff)
    assert diff <= PARITY_RTOL
    assert report.format == "huggingface-gpt2" and report.unused == () and report.initialised == ()
    assert report.model["num_heads"] == 2 and report.model["block_size"] == 16  # from config.json and wpe
    assert any(line.startswith("params/block_0/attn/qkv/kernel <- transformer.h.0.attn.c_attn.weight")
               for line in report.loaded)


def test_gpt2_hub_layout_bin_file_skips_buffers_and_names_unused_tensors(gpt2, tmp_path):
    """The Hub's original files: no "transformer." prefix, causal-mask buffers, a PyTorch .bin."""
    model, folder, tokens, reference = gpt2
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(GPT_CONFIG["n_layer"]):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(sd, tmp_path / "pytorch_model.bin")
    state, report = jnn.models.from_pretrained("gpt2", tmp_path)
    assert _relative(_logits(state, tokens), reference) <= PARITY_RTOL
    assert report.buffers == ("h.0.attn.bias", "h.0.attn.masked_bias", "h.1.attn.bias", "h.1.attn.masked_bias")

    sd["h.0.attn.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"1 source tensor\(s\) no mapping uses: \['h.0.attn.extra.weight'\].*strict=False"):
        jnn.models.from_pretrained("gpt2", tmp_path)
    _, report = jnn.models.from_pretrained("gpt2", tmp_path, strict=False)
    assert report.unused == ("h.0.attn.extra.weight",) and "unused: h.0.attn.extra.weight" in str(report)


def test_gpt2_loaded_state_fine_tunes_with_lora(gpt2):
    _, folder, tokens, _ = gpt2
    text = np.random.default_rng(1).integers(0, GPT_CONFIG["vocab_size"], (3, 17)).astype(np.int32)
    batch = {"inputs": text[:, :-1], "labels": text[:, 1:]}  # a full context of next-token targets
    state, _ = jnn.models.from_pretrained("gpt2", folder, tx=optax.adam(1e-3))
    step = jax.jit(jnn.make_train_step("cross_entropy"))
    lora = jnn.lora.LoRA(rank=2, targets=(r"attn/(qkv|out)/kernel$",))
    adapted = jnn.lora.apply(state, lora, optax.adam(1e-2))
    np.testing.assert_array_equal(_logits(adapted, tokens), _logits(state, tokens))  # B = 0: the loaded model
    for _ in range(3):
        adapted, metrics = step(adapted, batch)
    assert np.isfinite(metrics["loss"])
    np.testing.assert_array_equal(adapted.params["base"]["wte"]["embedding"], state.params["wte"]["embedding"])
    assert np.abs(adapted.params["lora"]["block_0"]["attn"]["qkv"]["kernel"]["b"]).max() > 0


# -------------------------------------------------------------------------------- ResNet


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    torchvision = import_torchvision()
    model = _randomise(torchvision.models.resnet18(num_classes=7))
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)


def _torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()  # NHWC -> NCHW


def test_resnet18_from_a_pth_gives_torchvision_logits(resnet18):
    model, path = resnet18
    x = _images()
    state, report = jnn.models.from_pretrained("resnet18", path, example_inputs=x[:1])
    diff = _relative(_logits(state, x), _torch_logits(model, x))
    _report_figure("torchvision resnet18", "7 classes, 32x32 input, random BatchNorm statistics", diff)
    assert diff <= PARITY_RTOL
    assert report.format == "torchvision-resnet" and report.model["num_classes"] == 7
    assert len(report.buffers) == 20 and all(b.endswith("num_batches_tracked") for b in report.buffers)
    np.testing.assert_array_equal(state.model_state["batch_stats"]["stem_bn"]["var"], model.bn1.running_var.numpy())


def test_resnet50_blocks_from_safetensors_give_torchvision_logits(tmp_path):
    """torchvision's ResNet class with ResNet-50's bottleneck blocks, one per stage (the full depth
    only repeats the same mapping, at 3x the test's time)."""
    import_torchvision()
    from safetensors.torch import save_file
    from torchvision.models.resnet import Bottleneck, ResNet

    model = _randomise(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5), seed=1)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    x = _images(size=32, seed=1)
    state, report = jnn.models.from_pretrained("resnet50", tmp_path, example_inputs=x[:1])  # a folder: one file
    diff = _relative(_logits(state, x), _torch_logits(model, x))
    _report_figure("torchvision ResNet(Bottleneck, [1, 1, 1, 1]): ResNet-50's blocks", "5 classes, 32x32 input, "
                   "random BatchNorm statistics", diff)
    assert diff <= PARITY_RTOL and report.model["block"] == "bottleneck" and report.model["stage_sizes"] == (1, 1, 1, 1)


def test_resnet18_fine_tunes_with_frozen_layers(resnet18):
    _, path = resnet18
    tx = jnn.make_optimizer(jnn.OptimConfig(name="sgd", learning_rate=0.1, frozen=("^(?!head/)",)))
    state, _ = jnn.models.from_pretrained("resnet18", path, tx=tx, example_inputs=_images(1))
    batch = {"inputs": _images(4), "labels": np.array([0, 1, 2, 3], np.int32)}
    new, metrics = jax.jit(jnn.make_train_step("cross_entropy"))(state, batch)
    assert np.isfinite(metrics["loss"])
    np.testing.assert_array_equal(new.params["stem_conv"]["kernel"], state.params["stem_conv"]["kernel"])
    assert not np.array_equal(new.params["head"]["kernel"], state.params["head"]["kernel"])
    # BatchNorm statistics move in training (PyTorch's momentum 0.1 = flax's 0.9), as torch's would.
    assert not np.array_equal(new.model_state["batch_stats"]["stem_bn"]["mean"],
                              state.model_state["batch_stats"]["stem_bn"]["mean"])


def test_errors_name_the_formats_and_what_differs(resnet18, gpt2):
    _, path = resnet18
    with pytest.raises(ValueError, match=r"match no known ViT format; expected one of \['timm-vit', 'huggingface-vit'\]"):
        jnn.models.from_pretrained("vit_tiny", path)
    with pytest.raises(ValueError, match=r"num_classes: the weights have 7, the override 10"):
        jnn.models.from_pretrained("resnet18", path, num_classes=10)
    state, report = jnn.models.from_pretrained("resnet18", path, num_classes=10, strict=False,
                                                example_inputs=_images(1))  # a new head
    assert report.mismatched == ("params/head/bias: source (7,) vs model (10,) (fc.bias)",
                                 "params/head/kernel: source (512, 7) vs model (512, 10) (fc.weight)")
    with pytest.raises(ValueError, match=r"the zoo model 'digits_cnn' is a DigitsCNN"):
        jnn.models.from_pretrained("digits_cnn", path)
    with pytest.raises(ValueError, match=r"'nowhere/at/all' is neither a file, a folder nor a Hub repository id"):
        jnn.models.from_pretrained("gpt2", "nowhere/at/all")


def test_a_hub_name_without_network_says_how_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"could not download 'openai-community/gpt2'.*huggingface-cli download"):
        jnn.models.from_pretrained("gpt2")


# -------------------------------------------------------------------------------- ViT


def test_timm_vit_from_safetensors_gives_timm_logits(tmp_path):
    timm = import_reference("timm")
    from safetensors.torch import save_file

    model = _randomise(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                         embed_dim=32, depth=2, num_heads=2, num_classes=5, qkv_bias=False))
    save_file(model.state_dict(), tmp_path / "vit.safetensors")
    x = _images(seed=2)
    # timm's state dict does not say the head count: vit_tiny's is 3, this small one has 2.
    state, report = jnn.models.from_pretrained("vit_tiny", tmp_path / "vit.safetensors", num_heads=2)
    diff = _relative(_logits(state, x), _torch_logits(model, x))
    _report_figure("timm vit (vit_tiny_patch16_224 family)", "2 layers, 2 heads, width 32, 8x8 patches of 32x32, no qkv bias", diff)
    assert diff <= PARITY_RTOL
    assert report.model["qkv_bias"] is False and report.model["ln_epsilon"] == 1e-6


def test_huggingface_vit_sets_its_layernorm_epsilon(tmp_path):
    transformers = import_reference("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=5)
    model = _randomise(transformers.ViTForImageClassification(config), seed=3)
    with torch.no_grad():  # tokens of small variance (~1e-8): LayerNorm's epsilon (1e-12 here, timm 1e-6) decides
        for p in model.vit.embeddings.parameters():
            p.mul_(1e-3)
    model.save_pretrained(tmp_path)
    x = _images(seed=3)
    with torch.no_grad():
        reference = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).logits.numpy()
    state, report = jnn.models.from_pretrained("vit", tmp_path)
    diff = _relative(_logits(state, x), reference)
    _report_figure("transformers ViTForImageClassification", "2 layers, 2 heads, width 32, 8x8 patches of 32x32, embeddings x 1e-3", diff)
    assert diff <= PARITY_RTOL
    assert report.model["ln_epsilon"] == 1e-12 and json.loads((tmp_path / "config.json").read_text())["layer_norm_eps"] == 1e-12
    assert report.unused == ()  # ViTForImageClassification saves no pooler
    timm_eps, _ = jnn.models.from_pretrained("vit", tmp_path, ln_epsilon=1e-6, strict=False)  # timm's epsilon
    wrong = _relative(_logits(timm_eps, x), reference)
    print(f"PARITY | the same, loaded with timm's LayerNorm epsilon 1e-6 | (ln_epsilon=1e-6) | {wrong:.1e}")
    assert wrong > 100 * PARITY_RTOL  # the option is what makes them equal
