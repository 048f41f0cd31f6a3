"""Export a model for runtimes that are not Python training code: StableHLO (`jax.export`) and ONNX.

  result = jnn.export(state, x[:1], "stablehlo", "model.stablehlo")   # or "onnx", "model.onnx"
  print(result)                                                      # path, bytes, max difference

What is exported is the model in evaluation mode with its weights inside (a `TrainState`: BatchNorm's
running averages, no dropout, LoRA adapters merged; a `jnn.load`ed run: with its input
normalisation; or any JAX function of the inputs, e.g. a `jnn.quantize.Quantized` model). The batch
axis is symbolic: one file takes any batch size.

* ``"stablehlo"``: `jax.export` serialises the program; any process with jax (no model code, no
  jnn) runs it: ``jax.export.deserialize(open(path, "rb").read()).call(x)``.
* ``"onnx"``: jax2onnx converts it (``pip install "jnn[export]"``); onnxruntime runs it.

Before anything is written, the exported model runs on the example inputs (deserialised from the
bytes to be written, or in onnxruntime) and its outputs are compared with JAX's: an export that
fails to convert, fails to load or disagrees beyond ``rtol`` is refused with the reason. Models the
converter is known to mistranslate are refused at once, with the reason and what to do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

FORMATS = ("stablehlo", "onnx")
RTOL = 1e-5  # max |exported - JAX| / max |JAX|: a reordering of float32 arithmetic, no more
INSTALL = 'pip install "jnn[export]"'


class ExportError(ValueError):
    """A model that cannot be exported in the format asked, with the reason and what to do."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `export` wrote: the file, its format and size, and the exported model's max relative
    output difference from JAX on the example inputs."""

    path: str
    format: str
    nbytes: int
    max_difference: float

    def __str__(self) -> str:
        return (f"{self.format} model: {self.path} ({self.nbytes:,} bytes); max output difference vs JAX on the "
                f"example inputs {self.max_difference:.1e} (relative)")


def inference_function(model: Any) -> Callable:
    """The pure function of the inputs that is exported: a `TrainState` in evaluation mode (weights as
    constants), or `model` itself when it is already a function (a `jnn.load`ed run, a `Quantized`).

    Raises:
      ExportError: neither a TrainState nor callable.
    """
    from jnn.train.state import TrainState

    if isinstance(model, TrainState):
        state = model
        return lambda inputs: state.model.apply(state.params, state.model_state, inputs, train=False)[0]
    if callable(model):
        return lambda *inputs: model(*inputs)  # a plain function: jit hashes what it wraps, and models hold dicts
    raise ExportError(f"export: expected a jnn.TrainState, a jnn.load()ed model or a function of the inputs, got "
                      f"{type(model).__name__}.")


def _specs(example_inputs: Any) -> Any:
    """The example inputs as shapes with a symbolic batch axis "batch" shared by every input."""
    leaves = jax.tree.leaves(example_inputs)
    if not leaves or any(np.ndim(x) < 1 for x in leaves):
        raise ExportError("export: example_inputs must be an array (or a tuple of arrays) with a leading batch axis, "
                          "e.g. x[:1].")
    batch, = jax.export.symbolic_shape("batch")
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch, *np.shape(x)[1:]), np.asarray(x).dtype),
                        example_inputs)


def _call(fn: Callable, inputs: Any) -> Any:
    return fn(*inputs) if isinstance(inputs, tuple) else fn(inputs)


def _module(model: Any) -> Any:
    state_model = getattr(getattr(model, "state", model), "model", None)
    return getattr(state_model, "module", None)


def known_refusal(model: Any, fmt: str) -> str | None:
    """Why `fmt` cannot hold `model` (a converter limitation found by testing), or None."""
    if fmt != "onnx":
        return None
    from jnn.models import RNNClassifier, RNNLanguageModel, ResNet
    from jnn.quantize import Quantized

    if isinstance(model, Quantized):
        return ("jax2onnx 0.13's convolution and dense handlers take arrays, not qwix's int8 weights with their "
                "scales. Fix: export the int8 model as format='stablehlo' (int8 weights inside), or export the float "
                "model to ONNX and quantize that file with onnxruntime.quantization.quantize_dynamic.")

    module = _module(model)
    if isinstance(module, (RNNClassifier, RNNLanguageModel)):
        return ("jax2onnx 0.13 cannot convert the recurrence (flax's nn.RNN scan carries shapes it traces as "
                "values). Fix: export it as format='stablehlo'.")
    if isinstance(module, ResNet) and module.shortcut == "B" and len(module.stage_sizes) > 1:
        return ("jax2onnx 0.13 rewrites the layout of a projection-shortcut block followed by another block into a "
                "graph onnxruntime rejects ('Add: Incompatible dimensions'). Fix: export it as format='stablehlo' "
                "(any batch size, exact), or use the CIFAR ResNets (shortcut='A'), which export to ONNX.")
    return None


def _relative(ours: Any, reference: Any) -> float:
    diffs = [float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() /
                   max(float(np.abs(np.asarray(b, np.float64)).max()), 1e-30))
             for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference))]
    return max(diffs, default=0.0)


def _stablehlo(fn: Callable, specs: Any, inputs: Any, platforms: Sequence[str] | None) -> tuple[bytes, Any]:
    from jnn import layers

    # XLA's own ops (not jnn's CPU formulations of pooling and convolution gradients): the program
    # may run on any platform.
    with layers.using("native"):
        args = specs if isinstance(specs, tuple) else (specs,)
        exported = jax.export.export(jax.jit(fn), platforms=platforms)(*args)
    data = bytes(exported.serialize())
    if platforms is not None and jax.default_backend() not in platforms:
        return data, None  # cannot run here: checked by the caller against nothing
    restored = jax.export.deserialize(bytearray(data))
    return data, _call(restored.call, inputs)


@contextlib.contextmanager
def _quiet():
    """jax2onnx prints debugging lines and logs tracebacks of optional plugins it skips."""
    logger = logging.getLogger("jax2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _onnx(fn: Callable, specs: Any, inputs: Any) -> tuple[bytes, Any]:
    try:
        import jax2onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"export: format='onnx' needs jax2onnx and onnxruntime ({err}). Fix: {INSTALL}.") from err
    leaves = jax.tree.leaves(specs)
    names = [f"inputs_{i}" for i in range(len(leaves))] if len(leaves) > 1 else ["inputs"]
    flat_fn = lambda *xs: _call(fn, jax.tree.unflatten(jax.tree.structure(specs), xs))  # noqa: E731
    try:
        # jax2onnx's flax handlers add biases by implicit rank promotion, which a strict program refuses.
        with _quiet(), jax.numpy_rank_promotion("allow"):
            proto = jax2onnx.to_onnx(flat_fn, leaves, model_name="jnn_model", input_names=names)
        data = proto.SerializeToString()
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: jax2onnx's value shapes make it warn, then merge them
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {n: np.asarray(x) for n, x in zip(names, jax.tree.leaves(inputs))})
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 - the converter's or the runtime's failure, reported as such
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ExportError(f"export: ONNX export failed ({type(err).__name__}: {first[:300]}). Nothing was written. "
                          f"Fix: export it as format='stablehlo', which runs any JAX program.") from err
    return data, outputs if len(outputs) > 1 else outputs[0]


def export(model: Any, example_inputs: Any, format: str = "stablehlo", path: str | os.PathLike | None = None, *,
           rtol: float = RTOL, platforms: Sequence[str] | None = None) -> Exported:
    """Writes `model` in evaluation mode as a StableHLO or ONNX file, checked against JAX first.

    Args:
      model: a `jnn.TrainState`, a `jnn.load`ed run, or a function of the inputs (e.g. a
        `jnn.quantize.Quantized` model).
      example_inputs: a batch of valid inputs (e.g. ``x[:2]``): shapes and dtypes (the batch axis
        becomes symbolic) and the values the check runs on.
      format: ``"stablehlo"`` or ``"onnx"``.
      path: the file to write (default ``model.stablehlo`` / ``model.onnx``).
      rtol: the largest max relative output difference from JAX accepted.
      platforms: StableHLO only: the platforms to lower for (default: this one), e.g.
        ``("cpu", "cuda")``; the check runs when this platform is one of them.

    Returns:
      `Exported`: path, format, bytes, measured difference.

    Raises:
      ExportError: an unknown format; a model the format cannot hold (named, with the reason and
        what to do); a failed conversion; outputs that differ beyond ``rtol``. Nothing is written then.
    """
    if format not in FORMATS:
        raise ExportError(f"export: unknown format {format!r}; expected one of {list(FORMATS)}.")
    path = os.fspath(path or f"model.{format}")
    reason = known_refusal(model, format)
    if reason:
        name = type(_module(model) or model).__name__
        raise ExportError(f"export: cannot export this {name} as {format}: {reason} Nothing was written.")
    fn = inference_function(model)
    specs = _specs(example_inputs)
    reference = jax.device_get(_call(jax.jit(fn), example_inputs))
    if format == "stablehlo":
        data, outputs = _stablehlo(fn, specs, example_inputs, platforms)
    else:
        data, outputs = _onnx(fn, specs, example_inputs)
    difference = _relative(outputs, reference) if outputs is not None else float("nan")
    if not difference <= rtol and outputs is not None:
        raise ExportError(f"export: the {format} model's outputs differ from JAX's by {difference:.2e} (relative), "
                          f"more than rtol={rtol:g}. Nothing was written. Fix: export as 'stablehlo', or report "
                          f"the model to the converter.")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # a reader never sees half a file
    return Exported(os.path.abspath(path), format, len(data), difference)


__all__ = ["FORMATS", "Exported", "ExportError", "export", "inference_function", "known_refusal"]
