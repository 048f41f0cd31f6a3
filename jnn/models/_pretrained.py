"""`from_pretrained`: Hugging Face GPT-2, torchvision ResNets and timm / Hugging Face ViTs as zoo models.

  state, report = jnn.models.from_pretrained("gpt2", "path/to/gpt2")      # a Hub snapshot folder
  state, report = jnn.models.from_pretrained("resnet50", "resnet50.pth", tx=optax.adam(1e-4))
  logits = state.apply_fn(state.variables, x)                              # eval mode by default

The weights decide the architecture (widths, depths, vocabulary, classes, epsilons are read from
the tensors and the source's ``config.json``); the preset supplies what no tensor tells (a ViT's
head count without a config); keyword overrides set the rest (``dtype``, ``dropout_rate``...).
Every tensor of the source is accounted for: loaded, a known buffer that is not a weight (GPT-2's
causal mask, BatchNorm's counter), or named as unused, which is an error unless ``strict=False``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from jnn.models import _convert
from jnn.models._registry import get, spec
from jnn.models._weights import read_state_dict

# Source names -> the zoo preset they load into, and the Hub repository used when no path is given.
ALIASES = {"gpt2": "gpt2_small", "vit": "vit_base"}
HUB = {"gpt2_small": "openai-community/gpt2", "vit_base": "google/vit-base-patch16-224",
       "resnet18": "timm/resnet18.tv_in1k", "resnet34": "timm/resnet34.tv_in1k",
       "resnet50": "timm/resnet50.tv_in1k"}
FAMILIES = ("GPT", "ResNet", "ViT")


@dataclasses.dataclass(frozen=True)
class PretrainedReport:
    """What `from_pretrained` read and where every source tensor went.

    Attributes:
      source: the file or folder read.
      format: the detected format, e.g. "huggingface-gpt2".
      model: the zoo attributes the weights set (and the overrides).
      loaded: "zoo path <- source name(s)" per loaded array.
      buffers: source tensors that are not weights (causal masks, BatchNorm counters), not loaded.
      unused: source tensors no mapping took (an error unless strict=False).
      initialised: zoo arrays the source did not fill (fresh values kept; strict=False only).
      mismatched: "path: source (a, b) vs model (c, d)" (fresh values kept; strict=False only).
    """

    source: str
    format: str
    model: dict[str, Any]
    loaded: tuple[str, ...]
    buffers: tuple[str, ...]
    unused: tuple[str, ...]
    initialised: tuple[str, ...]
    mismatched: tuple[str, ...]

    def __str__(self) -> str:
        lines = [f"{self.format} weights from {self.source}: loaded {len(self.loaded)} array(s); "
                 f"{len(self.buffers)} buffer(s) skipped, {len(self.unused)} unused, {len(self.initialised)} "
                 f"initialised, {len(self.mismatched)} shape mismatch(es)"]
        for name, items in (("unused", self.unused), ("initialised", self.initialised),
                            ("shape mismatch", self.mismatched)):
            lines += [f"  {name}: {item}" for item in items]
        return "\n".join(lines)


def _resolve(name: str) -> tuple[str, str]:
    preset = ALIASES.get(name, name)
    family = spec(preset).cls.__name__
    if family not in FAMILIES:
        raise ValueError(f"from_pretrained: the zoo model {name!r} is a {family}; weights from other libraries load "
                         f"into {list(FAMILIES)} presets, e.g. 'gpt2', 'resnet50', 'vit_base'. Fix: one of those, or "
                         f"jnn.transfer.load_pretrained for jnn's own checkpoints.")
    return preset, family


def _model_kwargs(preset: str, inferred: dict, overrides: dict, strict: bool) -> dict:
    conflicts = {k: (inferred[k], v) for k, v in overrides.items() if k in inferred and inferred[k] != v}
    if conflicts and strict:
        listed = "; ".join(f"{k}: the weights have {a!r}, the override {b!r}" for k, (a, b) in conflicts.items())
        raise ValueError(f"from_pretrained: overrides disagree with the weights ({listed}). Fix: drop them, or pass "
                         f"strict=False to keep fresh values where shapes differ (e.g. a new head).")
    kwargs = {**inferred, **overrides}
    if "num_heads" in inferred or "num_heads" in overrides:
        return kwargs
    heads = get(preset).num_heads if hasattr(get(preset), "num_heads") else None
    width = kwargs.get("embed_dim")
    if heads is not None and width is not None and width % heads:
        raise ValueError(f"from_pretrained: the weights do not say the number of attention heads and the preset's "
                         f"{heads} does not divide the width {width}. Fix: pass num_heads=... (the source model's).")
    return kwargs


def from_pretrained(name: str, source: str | os.PathLike | None = None, *, tx: Any = None, seed: int = 0,
                    strict: bool = True, example_inputs: Any = None, **overrides: Any):
    """A zoo model with another library's weights, as a ready `TrainState`, and a report.

    Args:
      name: the zoo preset to load into ("gpt2" / "gpt2_small", "resnet18", "resnet34", "resnet50",
        "vit_tiny", "vit_small", "vit_base" / "vit"); any preset of the GPT, ResNet or ViT class.
      source: a ``.safetensors`` / ``.bin`` / ``.pth`` file, a Hugging Face snapshot folder (with
        its ``config.json``), or a Hub repository id (needs a network and huggingface_hub); default:
        the preset's reference repository (GPT-2: openai-community/gpt2, ViT-B/16:
        google/vit-base-patch16-224, ResNets: timm's copies of torchvision's weights).
      tx: the optax optimizer of the state (default `optax.set_to_zero()`: a state for inference;
        pass one to fine-tune).
      seed: the state's seed (dropout; fresh values when ``strict=False`` keeps some).
      example_inputs: a batch of the inputs the state will see (default: the preset's example,
        e.g. 224x224 images); a ResNet takes any image size, fixed in the state by this.
      strict: refuse unused source tensors, zoo arrays the source does not fill and shapes that
        differ. With False they keep the fresh initialisation (e.g. a new head for
        ``num_classes=5``) and are listed in the report.
      **overrides: zoo model attributes, e.g. ``dtype=jnp.bfloat16``, ``num_heads=...`` (a ViT
        without config), ``num_classes=5`` (with ``strict=False``).

    Returns:
      ``(state, report)``: a `jnn.TrainState` (eval with ``state.apply_fn(state.variables, x)``)
      and a `PretrainedReport`.

    Raises:
      ValueError: an unknown or unsupported preset, a source of another architecture or with
        features the zoo model lacks (named), unused tensors or missing arrays (strict).
    """
    import optax

    from jnn.train.state import create_train_state
    from jnn.transfer import flatten, load_pretrained
    from jnn.models._registry import example_input

    preset, family = _resolve(name)
    if source is None:
        if preset not in HUB:
            raise ValueError(f"from_pretrained: {name!r} has no reference repository; pass source=PATH.")
        source = HUB[preset]
    sd = read_state_dict(source)
    fmt = _convert.detect(sd.arrays, family)
    _, _, infer, convert = _convert.FORMATS[fmt]
    src = _convert.Source(sd.arrays)
    kwargs = _model_kwargs(preset, infer(src, sd.config), overrides, strict)
    model = get(preset, **kwargs)
    arrays = convert(src, model)
    example = example_input(preset, 1, **kwargs) if example_inputs is None else example_inputs
    state = create_train_state(model, tx if tx is not None else optax.set_to_zero(), example, seed)
    target = {**flatten(state.params, "params/"), **flatten(state.model_state)}
    initialised = sorted(set(target) - set(arrays))
    extra = sorted(set(arrays) - set(target))  # a mapping bug, never the user's: say so plainly
    if extra:
        raise RuntimeError(f"from_pretrained: the {fmt} mapping produced {extra}, which {preset} does not have.")
    mismatched = [f"{p}: source {tuple(a.shape)} vs model {tuple(target[p].shape)} ({_names(src, p)})"
                  for p, a in sorted(arrays.items()) if tuple(a.shape) != tuple(target[p].shape)]
    unused = src.unused()
    if strict and (unused or initialised or mismatched):
        parts = [f"{len(unused)} source tensor(s) no mapping uses: {unused}" if unused else "",
                 f"{len(initialised)} array(s) of the model the source does not fill: {initialised}" if initialised else "",
                 f"{len(mismatched)} shape mismatch(es): {mismatched}" if mismatched else ""]
        raise ValueError(f"from_pretrained: {fmt} weights from {sd.where} do not fit {preset} exactly: "
                         f"{'; '.join(p for p in parts if p)}. Fix: weights of this architecture, or strict=False to "
                         f"keep fresh values for what does not fit (e.g. a new head).")
    fits = {p: a for p, a in arrays.items() if tuple(a.shape) == tuple(target[p].shape)}
    state, _ = load_pretrained(state, {("model_state/" + p if not p.startswith("params/") else p): np.asarray(a)
                                       for p, a in fits.items()})
    loaded = tuple(f"{p} <- {_names(src, p)}" for p in sorted(fits))
    report = PretrainedReport(sd.where, fmt, kwargs, loaded, tuple(src.buffers()), tuple(unused),
                              tuple(initialised), tuple(mismatched))
    return state, report


def _names(src: _convert.Source, path: str) -> str:
    """The source names a zoo array came from (several for fused q/k/v)."""
    return ", ".join(k for k, into in src.used.items() if into == path)


__all__ = ["ALIASES", "HUB", "PretrainedReport", "from_pretrained"]
