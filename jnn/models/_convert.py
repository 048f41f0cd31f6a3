"""Weight mappings from Hugging Face GPT-2, torchvision ResNets and timm / Hugging Face ViTs into the zoo.

Each format has two functions. ``infer(source, config)`` reads the zoo model's attributes from the
source's shapes and config (what the weights decide: widths, depths, vocabulary, classes, epsilons);
``convert(source, model)`` returns the zoo's arrays by "/"-joined path ("params/...",
"batch_stats/...") for the built model, taking every source tensor it uses from ``source``, which
keeps count, so that what no mapping took can be named. Layout changes, with the shapes they map:

* PyTorch ``Linear`` (out, in) -> flax ``Dense`` kernel (in, out); GPT-2's ``Conv1D`` is already (in, out).
* Convolutions OIHW -> HWIO.
* Fused or separate q/k/v (in, 3C) -> the zoo's ``DenseGeneral`` kernel (C, 3, heads, head_dim); the
  output projection (C, C) -> (heads, head_dim, C).
* BatchNorm ``weight``/``bias`` -> ``scale``/``bias``; ``running_mean``/``running_var`` ->
  ``batch_stats`` ``mean``/``var`` (``num_batches_tracked`` is a counter, not a weight).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import numpy as np

# Buffers some sources save that are not weights: GPT-2's causal mask and its fill value, BatchNorm's counter.
BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|num_batches_tracked)$")


class Source:
    """A state dict that records which names a mapping took."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.used: dict[str, str] = {}  # source name -> zoo path

    def has(self, name: str) -> bool:
        return name in self.arrays

    def take(self, name: str, into: str = "") -> np.ndarray:
        if name not in self.arrays:
            raise ValueError(f"from_pretrained: the source has no tensor {name!r}, which the mapping needs for "
                             f"{into or 'the model'}; it has {len(self.arrays)} tensors, e.g. "
                             f"{sorted(self.arrays)[:6]}. Fix: weights of the same architecture, complete.")
        self.used[name] = into
        return np.asarray(self.arrays[name])

    def count(self, pattern: str) -> int:
        """How many consecutive indices i have a tensor named ``pattern.format(i)``."""
        i = 0
        while self.has(pattern.format(i)):
            i += 1
        return i

    def buffers(self) -> list[str]:
        return sorted(k for k in self.arrays if k not in self.used and BUFFERS.search(k))

    def unused(self) -> list[str]:
        return sorted(k for k in self.arrays if k not in self.used and not BUFFERS.search(k))


def refuse(fmt: str, what: str, fix: str) -> ValueError:
    return ValueError(f"from_pretrained: this {fmt} checkpoint {what}, which the zoo model does not implement. {fix}")


def _hwio(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _linear(src: Source, name: str, into: str, out: dict, bias: bool = True) -> None:
    """PyTorch Linear (out, in) -> Dense kernel (in, out)."""
    out[f"params/{into}/kernel"] = src.take(f"{name}.weight", f"params/{into}/kernel").T
    if bias:
        out[f"params/{into}/bias"] = src.take(f"{name}.bias", f"params/{into}/bias")


def _norm(src: Source, name: str, into: str, out: dict) -> None:
    out[f"params/{into}/scale"] = src.take(f"{name}.weight", f"params/{into}/scale")
    out[f"params/{into}/bias"] = src.take(f"{name}.bias", f"params/{into}/bias")


# -------------------------------------------------------------------------------- GPT-2 (Hugging Face)


def _gpt2_prefix(src: Source) -> str:
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model and the original Hub files "h.0...".
    return "transformer." if src.has("transformer.wte.weight") else ""


def gpt2_infer(src: Source, config: dict) -> dict[str, Any]:
    p = _gpt2_prefix(src)
    vocab, width = src.arrays[p + "wte.weight"].shape
    hidden = src.arrays[p + "h.0.mlp.c_fc.weight"].shape[1]
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise refuse("GPT-2", f"uses activation_function={act!r}", "The zoo's GPT uses the tanh GELU (gelu_new).")
    eps = config.get("layer_norm_epsilon", 1e-5)
    if eps != 1e-5:
        raise refuse("GPT-2", f"uses layer_norm_epsilon={eps}", "The zoo's GPT uses 1e-5, as every GPT-2 release.")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
        raise refuse("GPT-2", "scales attention otherwise than by 1/sqrt(head_dim)", "Use a standard GPT-2 config.")
    if hidden % width:
        raise refuse("GPT-2", f"has an MLP width {hidden} that is no multiple of {width}", "")
    kwargs = dict(vocab_size=vocab, block_size=src.arrays[p + "wpe.weight"].shape[0],
                  num_layers=src.count(p + "h.{}.ln_1.weight"), embed_dim=width, mlp_ratio=hidden // width)
    if "n_head" in config:
        kwargs["num_heads"] = config["n_head"]
    if src.has("lm_head.weight") and not np.array_equal(src.arrays["lm_head.weight"], src.arrays[p + "wte.weight"]):
        kwargs["tie_embeddings"] = False
    return kwargs


def gpt2_convert(src: Source, model: Any) -> dict[str, np.ndarray]:
    p, c, n = _gpt2_prefix(src), model.embed_dim, model.num_heads
    out = {"params/wte/embedding": src.take(p + "wte.weight", "params/wte/embedding"),
           "params/wpe": src.take(p + "wpe.weight", "params/wpe")}
    for i in range(model.num_layers):
        h, b = f"{p}h.{i}.", f"block_{i}/"
        _norm(src, h + "ln_1", b + "ln1", out)
        _norm(src, h + "ln_2", b + "ln2", out)
        # Conv1D stores (in, out); c_attn's columns are [q | k | v], each head-major (N, H).
        q = f"params/{b}attn/"
        out[q + "qkv/kernel"] = src.take(h + "attn.c_attn.weight", q + "qkv/kernel").reshape(c, 3, n, c // n)
        out[q + "qkv/bias"] = src.take(h + "attn.c_attn.bias", q + "qkv/bias").reshape(3, n, c // n)
        out[q + "out/kernel"] = src.take(h + "attn.c_proj.weight", q + "out/kernel").reshape(n, c // n, c)
        out[q + "out/bias"] = src.take(h + "attn.c_proj.bias", q + "out/bias")
        for name, into in (("c_fc", "fc"), ("c_proj", "proj")):  # Conv1D: (in, out) already
            out[f"params/{b}mlp/{into}/kernel"] = src.take(f"{h}mlp.{name}.weight", f"params/{b}mlp/{into}/kernel")
            out[f"params/{b}mlp/{into}/bias"] = src.take(f"{h}mlp.{name}.bias", f"params/{b}mlp/{into}/bias")
    _norm(src, p + "ln_f", "ln_f", out)
    if src.has("lm_head.weight"):
        head = src.take("lm_head.weight", "params/wte/embedding" if model.tie_embeddings else "params/lm_head/kernel")
        if not model.tie_embeddings:
            out["params/lm_head/kernel"] = head.T
    return out


# -------------------------------------------------------------------------------- ResNet (torchvision)


def resnet_infer(src: Source, config: dict) -> dict[str, Any]:
    if not src.has("conv1.weight") or src.arrays["conv1.weight"].shape[2:] != (7, 7):
        raise refuse("ResNet", "has no 7x7 'conv1' stem (a deep stem or another layout)",
                     "Load torchvision's (or timm's '*.tv_in1k') ResNet-18/34/50 weights.")
    stages = []
    while src.has(f"layer{len(stages) + 1}.0.conv1.weight"):
        stages.append(src.count(f"layer{len(stages) + 1}.{{}}.conv1.weight"))
    bottleneck = src.has("layer1.0.conv3.weight")
    widths = tuple(src.arrays[f"layer{i + 1}.0.conv1.weight"].shape[0] for i in range(len(stages)))
    for i, w in enumerate(widths):
        conv2 = src.arrays[f"layer{i + 1}.0.conv2.weight"]
        if conv2.shape[1] != conv2.shape[0] or (bottleneck and src.arrays[f"layer{i + 1}.0.conv3.weight"].shape[0] != 4 * w):
            raise refuse("ResNet", "has grouped or widened convolutions (ResNeXt / wide ResNet)",
                         "The zoo's ResNet has plain convolutions and 4x bottlenecks.")
    return dict(stage_sizes=tuple(stages), widths=widths, block="bottleneck" if bottleneck else "basic",
                stem="imagenet", shortcut="B", num_classes=src.arrays["fc.weight"].shape[0],
                in_channels=src.arrays["conv1.weight"].shape[1])


def _conv_bn(src: Source, conv: str, bn: str, into_conv: str, into_bn: str, out: dict) -> None:
    out[f"params/{into_conv}/kernel"] = _hwio(src.take(f"{conv}.weight", f"params/{into_conv}/kernel"))
    _norm(src, bn, into_bn, out)
    out[f"batch_stats/{into_bn}/mean"] = src.take(f"{bn}.running_mean", f"batch_stats/{into_bn}/mean")
    out[f"batch_stats/{into_bn}/var"] = src.take(f"{bn}.running_var", f"batch_stats/{into_bn}/var")


def resnet_convert(src: Source, model: Any) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    _conv_bn(src, "conv1", "bn1", "stem_conv", "stem_bn", out)
    convs = 3 if model.block == "bottleneck" else 2
    for i, size in enumerate(model.stage_sizes):
        for j in range(size):
            t, b = f"layer{i + 1}.{j}.", f"stage{i + 1}_block{j + 1}/"
            for k in range(1, convs + 1):
                _conv_bn(src, f"{t}conv{k}", f"{t}bn{k}", f"{b}conv{k}", f"{b}bn{k}", out)
            if src.has(t + "downsample.0.weight"):
                _conv_bn(src, t + "downsample.0", t + "downsample.1", b + "downsample_conv", b + "downsample_bn", out)
    _linear(src, "fc", "head", out)
    return out


# -------------------------------------------------------------------------------- ViT (timm)

# timm's architecture names fix the head count, which no tensor shape tells.
_TIMM_HEADS = {"vit_tiny_": 3, "vit_small_": 6, "vit_base_": 12, "vit_large_": 16, "vit_huge_": 16}


def _vit_geometry(pos_tokens: int, patch: int) -> int:
    side = math.isqrt(pos_tokens - 1)
    if side * side != pos_tokens - 1:
        raise refuse("ViT", f"has {pos_tokens} position embeddings (not 1 class token + a square grid)",
                     "The zoo's ViT has a class token and square images.")
    return side * patch


def timm_vit_infer(src: Source, config: dict) -> dict[str, Any]:
    for name, what in (("reg_token", "has register tokens"), ("fc_norm.weight", "pools by averaging (fc_norm)"),
                       ("blocks.0.ls1.gamma", "has LayerScale"), ("blocks.0.attn.q_norm.weight", "normalises q/k")):
        if src.has(name):
            raise refuse("timm ViT", what, "The zoo's ViT is the original (class token, no LayerScale).")
    if not src.has("cls_token"):
        raise refuse("timm ViT", "has no class token", "The zoo's ViT classifies from the class token.")
    patch = src.arrays["patch_embed.proj.weight"]  # (C, in, P, P)
    kwargs = dict(embed_dim=patch.shape[0], in_channels=patch.shape[1], patch_size=patch.shape[2],
                  num_layers=src.count("blocks.{}.norm1.weight"), mlp_dim=src.arrays["blocks.0.mlp.fc1.weight"].shape[0],
                  image_size=_vit_geometry(src.arrays["pos_embed"].shape[1], patch.shape[2]),
                  qkv_bias=src.has("blocks.0.attn.qkv.bias"), ln_epsilon=1e-6)
    if src.has("head.weight"):
        kwargs["num_classes"] = src.arrays["head.weight"].shape[0]
    arch = config.get("architecture", "")
    heads = config.get("model_args", {}).get("num_heads") or next(
        (n for prefix, n in _TIMM_HEADS.items() if arch.startswith(prefix)), None)
    if heads:
        kwargs["num_heads"] = heads
    return kwargs


def _qkv_into(out: dict, b: str, c: int, n: int, kernel: np.ndarray, bias: np.ndarray | None) -> None:
    """A fused (3C, C) PyTorch q/k/v weight -> (C, 3, N, H); bias (3C,) -> (3, N, H)."""
    out[f"params/{b}attn/qkv/kernel"] = kernel.T.reshape(c, 3, n, c // n)
    if bias is not None:
        out[f"params/{b}attn/qkv/bias"] = bias.reshape(3, n, c // n)


def timm_vit_convert(src: Source, model: Any) -> dict[str, np.ndarray]:
    c, n = model.embed_dim, model.num_heads
    out = {"params/patch_embed/kernel": _hwio(src.take("patch_embed.proj.weight", "params/patch_embed/kernel")),
           "params/patch_embed/bias": src.take("patch_embed.proj.bias", "params/patch_embed/bias"),
           "params/cls_token": src.take("cls_token", "params/cls_token"),
           "params/pos_embed": src.take("pos_embed", "params/pos_embed")}
    for i in range(model.num_layers):
        t, b = f"blocks.{i}.", f"block_{i}/"
        _norm(src, t + "norm1", b + "ln1", out)
        _norm(src, t + "norm2", b + "ln2", out)
        q = f"params/{b}attn/"
        bias = src.take(t + "attn.qkv.bias", q + "qkv/bias") if model.qkv_bias else None
        _qkv_into(out, b, c, n, src.take(t + "attn.qkv.weight", q + "qkv/kernel"), bias)
        out[q + "out/kernel"] = src.take(t + "attn.proj.weight", q + "out/kernel").T.reshape(n, c // n, c)
        out[q + "out/bias"] = src.take(t + "attn.proj.bias", q + "out/bias")
        _linear(src, t + "mlp.fc1", b + "mlp/fc", out)
        _linear(src, t + "mlp.fc2", b + "mlp/proj", out)
    _norm(src, "norm", "ln_f", out)
    if src.has("head.weight"):
        _linear(src, "head", "head", out)
    return out


# -------------------------------------------------------------------------------- ViT (Hugging Face)


def _hf_vit_prefix(src: Source) -> str:
    return "vit." if src.has("vit.embeddings.cls_token") else ""  # ViTForImageClassification vs ViTModel


def hf_vit_infer(src: Source, config: dict) -> dict[str, Any]:
    p = _hf_vit_prefix(src)
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise refuse("Hugging Face ViT", f"uses hidden_act={act!r}", "The zoo's ViT uses the exact GELU ('gelu').")
    patch = src.arrays[p + "embeddings.patch_embeddings.projection.weight"]
    kwargs = dict(embed_dim=patch.shape[0], in_channels=patch.shape[1], patch_size=patch.shape[2],
                  num_layers=src.count(p + "encoder.layer.{}.layernorm_before.weight"),
                  mlp_dim=src.arrays[p + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                  image_size=_vit_geometry(src.arrays[p + "embeddings.position_embeddings"].shape[1], patch.shape[2]),
                  qkv_bias=src.has(p + "encoder.layer.0.attention.attention.query.bias"),
                  ln_epsilon=config.get("layer_norm_eps", 1e-12))
    if src.has("classifier.weight"):
        kwargs["num_classes"] = src.arrays["classifier.weight"].shape[0]
    if "num_attention_heads" in config:
        kwargs["num_heads"] = config["num_attention_heads"]
    return kwargs


def hf_vit_convert(src: Source, model: Any) -> dict[str, np.ndarray]:
    p, c, n = _hf_vit_prefix(src), model.embed_dim, model.num_heads
    e = p + "embeddings."
    out = {"params/patch_embed/kernel": _hwio(src.take(e + "patch_embeddings.projection.weight",
                                                       "params/patch_embed/kernel")),
           "params/patch_embed/bias": src.take(e + "patch_embeddings.projection.bias", "params/patch_embed/bias"),
           "params/cls_token": src.take(e + "cls_token", "params/cls_token"),
           "params/pos_embed": src.take(e + "position_embeddings", "params/pos_embed")}
    for i in range(model.num_layers):
        t, b = f"{p}encoder.layer.{i}.", f"block_{i}/"
        a = t + "attention.attention."
        _norm(src, t + "layernorm_before", b + "ln1", out)
        _norm(src, t + "layernorm_after", b + "ln2", out)
        q, qkv = f"params/{b}attn/", ("query", "key", "value")
        kernel = np.concatenate([src.take(f"{a}{name}.weight", q + "qkv/kernel") for name in qkv])  # (3C, C)
        bias = np.concatenate([src.take(f"{a}{name}.bias", q + "qkv/bias") for name in qkv]) if model.qkv_bias else None
        _qkv_into(out, b, c, n, kernel, bias)
        proj = t + "attention.output.dense"
        out[q + "out/kernel"] = src.take(proj + ".weight", q + "out/kernel").T.reshape(n, c // n, c)
        out[q + "out/bias"] = src.take(proj + ".bias", q + "out/bias")
        _linear(src, t + "intermediate.dense", b + "mlp/fc", out)
        _linear(src, t + "output.dense", b + "mlp/proj", out)
    _norm(src, p + "layernorm", "ln_f", out)
    if src.has("classifier.weight"):
        _linear(src, "classifier", "head", out)
    return out


# -------------------------------------------------------------------------------- which format

# format -> (zoo family, marker tensor (any prefix), infer, convert)
FORMATS: dict[str, tuple[str, str, Callable, Callable]] = {
    "huggingface-gpt2": ("GPT", "h.0.attn.c_attn.weight", gpt2_infer, gpt2_convert),
    "torchvision-resnet": ("ResNet", "layer1.0.conv1.weight", resnet_infer, resnet_convert),
    "timm-vit": ("ViT", "blocks.0.attn.qkv.weight", timm_vit_infer, timm_vit_convert),
    "huggingface-vit": ("ViT", "encoder.layer.0.attention.attention.query.weight", hf_vit_infer, hf_vit_convert),
}


def detect(arrays: dict[str, np.ndarray], family: str) -> str:
    """The format of a state dict meant for a zoo model of class ``family`` ("GPT", "ResNet", "ViT").

    Raises:
      ValueError: no known format of that family matches, naming the formats and the source's names.
    """
    for fmt, (fam, marker, _, _) in FORMATS.items():
        if fam == family and any(k == marker or k.endswith("." + marker) for k in arrays):
            return fmt
    known = [f for f, v in FORMATS.items() if v[0] == family]
    raise ValueError(f"from_pretrained: the source's tensors ({len(arrays)}, e.g. {sorted(arrays)[:5]}) match no "
                     f"known {family} format; expected one of {known}. Fix: weights saved by transformers "
                     f"(save_pretrained), torchvision (torch.save(model.state_dict())) or timm.")


__all__ = ["BUFFERS", "FORMATS", "Source", "detect"]
