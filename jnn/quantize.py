"""Int8 quantization with Google's qwix: post-training (PTQ) and quantization-aware training (QAT).

`ptq(state)` turns a trained linen model's float parameters into int8 weights with per-channel
scales (`qwix.PtqProvider`, absmax calibration) and returns a `Quantized` model that computes
with int8 weights and dynamically quantized int8 activations (w8a8). qwix's PTQ convolution needs
activations quantized as well as weights (it refuses weight-only int8 for `conv_general_dilated`),
so w8a8 is the default; `activation=None` gives weight-only int8 for models without
convolutions. `qat(model)` wraps a model for quantization-aware training (`qwix.QtProvider`: int8
fake quantization in the forward pass, straight-through gradients); train it with any jnn step,
then `ptq` converts it.

  q = jnn.quantize.ptq(state)              # int8 weights, per-channel scales
  logits = q(x)
  print(q.nbytes, q.float_nbytes)          # sizes computed from the arrays

flax.nnx models are not covered here yet (qwix quantizes them through another entry point).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jnn.train.state import TrainState

PyTree = Any
QTYPES = ("int8", "int4")
_ORIGINAL: dict[int, Any] = {}  # id of a qat-wrapped module -> the user's module, for `ptq`


def _qwix():
    try:
        import qwix
    except ImportError as err:  # pragma: no cover - a dependency of jnn
        raise ImportError("jnn.quantize needs qwix: pip install qwix") from err
    return qwix


def rules(weight: str = "int8", activation: str | None = "int8", module_path: str = ".*") -> list:
    """qwix quantization rules: every module matching `module_path` gets `weight` (and `activation`).

    Raises:
      ValueError: a dtype outside `QTYPES`.
    """
    for name, value in (("weight", weight), ("activation", activation)):
        if value is not None and value not in QTYPES:
            raise ValueError(f"quantize: {name}={value!r}; expected one of {list(QTYPES)}"
                             f"{' or None' if name == 'activation' else ''}.")
    return [_qwix().QuantizationRule(module_path=module_path, weight_qtype=weight, act_qtype=activation)]


def qat(model: Any, *, weight: str = "int8", activation: str | None = "int8") -> Any:
    """`model` with int8 fake quantization in training (qwix QT): create the state from the result."""
    _check_linen(model, "qat")
    wrapped = _qwix().quantize_model(model, _qwix().QtProvider(rules(weight, activation)))
    _ORIGINAL[id(wrapped)] = model
    return wrapped


def _check_linen(model: Any, where: str) -> None:
    import flax.linen as nn

    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize.{where}: expected a flax.linen module, got {type(model).__name__}; flax.nnx "
                         f"models are not covered by jnn.quantize yet. Fix: use qwix.quantize_model on the nnx "
                         f"module directly.")


def nbytes(tree: PyTree) -> int:
    """Bytes of every array in `tree` (int8 values, scales and float parameters alike)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "shape") and hasattr(x, "dtype"))


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A quantized model ready for inference: `q(x)` runs it in eval mode.

    Attributes:
      module: the qwix PTQ module.
      params: its parameters (int8 weights with per-channel float32 scales, float biases).
      model_state: the other collections (e.g. BatchNorm statistics), float.
      eval_kwargs: the model's eval-mode keyword (e.g. {"train": False}).
      float_nbytes: bytes of the float parameters it came from.
    """

    module: Any
    params: PyTree
    model_state: PyTree
    eval_kwargs: dict
    float_nbytes: int

    def __call__(self, inputs: Any) -> Any:
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return self.module.apply({"params": self.params, **self.model_state}, *args, **self.eval_kwargs)

    @property
    def nbytes(self) -> int:
        return nbytes(self.params)


def ptq(state: TrainState, *, model: Any = None, weight: str = "int8", activation: str | None = "int8") -> Quantized:
    """Post-training quantization of a trained linen state (also of one trained with `qat`).

    A LoRA state (`jnn.lora.apply`) is quantized as the model it runs: its adapters are merged into
    the base weights first (`jnn.lora.merge`), then the merged weights are quantized.

    Args:
      state: the trained state.
      model: the float model (default: the state's own, unwrapped if it came from `qat`).
      weight, activation: qwix dtypes of weights and activations (`activation=None`: weights only,
        not supported by qwix for convolutions).

    Raises:
      ValueError: an nnx state, an unknown dtype, parameters reparametrised by anything but LoRA.
    """
    module = getattr(state.model, "module", None)
    if module is None:
        raise ValueError("quantize.ptq: the state was created from a flax.nnx module; jnn.quantize covers linen "
                         "models. Fix: quantize the nnx module with qwix.quantize_model directly.")
    module = model or _ORIGINAL.get(id(module), module)
    _check_linen(module, "ptq")
    eval_kwargs = state.model.mode.kwargs(False) if state.model.mode is not None else {}
    qwix = _qwix()
    quantized = qwix.quantize_model(module, qwix.PtqProvider(rules(weight, activation)))
    example = jax.tree.unflatten(state.spec.input_tree,
                                 [jnp.zeros((1,) + tuple(shape), dtype) for _, shape, dtype in state.spec.inputs])
    args = example if isinstance(example, tuple) else (example,)
    abstract = jax.eval_shape(lambda key, *a: quantized.init(key, *a, **eval_kwargs), jax.random.key(0), *args)
    params = qwix.quantize_params(_model_params(state), abstract["params"])
    return Quantized(quantized, params, state.model_state, eval_kwargs, nbytes(_model_params(state)))


def _model_params(state: TrainState) -> PyTree:
    """The parameters the model runs on: a LoRA state's merged weights (qwix quantizes the model's own
    parameter tree; the {"base", "lora"} tree of a LoRA state is not the model's)."""
    reparam = getattr(state.model, "reparam", None)
    if reparam is None:
        return state.params
    from jnn import lora

    if not isinstance(reparam, lora.LoRA):
        raise ValueError(f"quantize.ptq: the state's parameters are reparametrised by {type(reparam).__name__}, not "
                         f"LoRA; expected the model's own parameters. Fix: build a state from the parameters the "
                         f"model runs on (state.variables['params']) and quantize that.")
    return lora.merge(state)


__all__ = ["QTYPES", "Quantized", "nbytes", "ptq", "qat", "rules"]
