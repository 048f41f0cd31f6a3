"""Export: StableHLO files run in a fresh process without jnn or flax, for any batch size, with JAX's
outputs; ONNX files run in onnxruntime within the parity tolerance; what a format cannot hold is
refused with the reason before anything is written. Each export prints its figures (`EXPORT ...`):
the README's table copies them."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import jnn
from tests.tolerances import PARITY_RTOL

MODELS = ("digits_cnn", "resnet20", "gpt_char_tiny")


def _state(name, **overrides):
    model = jnn.models.get(name, **overrides)
    x = jnn.models.example_input(name, 3, **overrides)
    state = jnn.create_train_state(model, optax.sgd(0.1), x[:1], 0)
    if state.model_state:  # BatchNorm: running statistics far from (0, 1), so eval mode is visible
        rng = np.random.default_rng(0)
        stats = jax.tree_util.tree_map_with_path(
            lambda p, a: (0.5 + rng.random(a.shape) if p[-1].key == "var" else rng.normal(0, 0.5, a.shape)).astype(a.dtype),
            state.model_state)
        state = state.replace(model_state=stats)
    return state, x


def _eval(state, x):
    return np.asarray(state.apply_fn(state.variables, x))


def _relative(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def states():
    return {name: _state(name) for name in MODELS}


@pytest.fixture(scope="module")
def stablehlo_files(tmp_path_factory, states):
    folder = tmp_path_factory.mktemp("stablehlo")
    out = {}
    for name in MODELS:
        state, x = states[name]
        result = jnn.export(state, x[:2], "stablehlo", folder / f"{name}.stablehlo")
        np.save(folder / f"{name}.inputs.npy", x)  # 3 examples: the file was exported with a batch of 2
        with open(result.path, "rb") as f:  # the same program, here
            here = np.asarray(jax.export.deserialize(bytearray(f.read())).call(x))
        out[name] = (result, x, here, _eval(state, x))
    return folder, out


def test_stablehlo_runs_in_a_fresh_process_without_the_model_code(stablehlo_files):
    folder, out = stablehlo_files
    script = textwrap.dedent(f"""
        import sys, numpy as np, jax
        for name in {list(MODELS)!r}:
            with open(r"{folder}/" + name + ".stablehlo", "rb") as f:
                exported = jax.export.deserialize(bytearray(f.read()))
            x = np.load(r"{folder}/" + name + ".inputs.npy")
            np.save(r"{folder}/" + name + ".outputs.npy", np.asarray(exported.call(x)))
        assert not [m for m in sys.modules if m.split(".")[0] in ("jnn", "flax", "optax")], "model code was imported"
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=folder, timeout=300)
    for name in MODELS:
        result, x, here, reference = out[name]
        outputs = np.load(folder / f"{name}.outputs.npy")
        np.testing.assert_array_equal(outputs, here)  # the same program in a fresh process: the same numbers
        diff = _relative(outputs, reference)
        print(f"EXPORT | StableHLO (jax.export) | jax {jax.__version__}, fresh process | {name} | {diff:.1e} | "
              f"{result.nbytes:,}")
        assert diff <= PARITY_RTOL and result.max_difference <= PARITY_RTOL
        assert result.nbytes == os.path.getsize(result.path)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_runs_in_onnxruntime(name, tmp_path, states):
    import onnxruntime as ort

    state, x = states[name]
    result = jnn.export(state, x[:2], "onnx", tmp_path / f"{name}.onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # jax2onnx's value shapes make onnxruntime warn (it merges them leniently)
    session = ort.InferenceSession(result.path, options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"inputs": x})[0]  # 3 examples: the batch axis is symbolic
    diff = _relative(outputs, _eval(state, x))
    print(f"EXPORT | ONNX (jax2onnx 0.13.0) | onnxruntime {ort.__version__} | {name} | {diff:.1e} | {result.nbytes:,}")
    assert diff <= PARITY_RTOL


def test_batchnorm_exports_in_eval_mode(stablehlo_files, states):
    _, out = stablehlo_files
    result, x, _, reference = out["resnet20"]
    state, _ = states["resnet20"]
    train_mode, _ = state.apply_fn(state.variables, x, train=True, mutable=["batch_stats"])
    assert _relative(train_mode, reference) > 0.01  # the running statistics matter on these inputs
    assert result.max_difference <= PARITY_RTOL


def test_what_onnx_cannot_hold_is_refused_before_writing(tmp_path):
    def abstract(name, x, **overrides):  # shapes only: the refusal comes before any tracing
        return jnn.abstract_train_state(jnn.models.get(name, **overrides), optax.sgd(0.1), x, 0)

    cases = [(abstract("resnet18", np.zeros((1, 32, 32, 3), np.float32), widths=(4, 8, 8, 8)),
              r"cannot export this ResNet as onnx: .*projection-shortcut.*format='stablehlo'"),
             (abstract("lstm_classifier", np.zeros((1, 200), np.int32), vocab_size=50, embed_dim=8, hidden_size=8),
              r"cannot export this RNNClassifier as onnx: .*recurrence.*format='stablehlo'")]
    for state, message in cases:
        with pytest.raises(jnn.ExportError, match=message):
            jnn.export(state, np.zeros((1, *state.spec.shape), state.spec.dtype), "onnx", tmp_path / "model.onnx")
        assert not os.path.exists(tmp_path / "model.onnx")
    with pytest.raises(jnn.ExportError, match=r"unknown format 'tflite'; expected one of \['stablehlo', 'onnx'\]"):
        jnn.export(cases[0][0], np.zeros((1, 32, 32, 3), np.float32), "tflite", tmp_path / "model.tflite")


def test_int8_ptq_model_exports_as_stablehlo_and_onnx_is_refused_with_the_fix(tmp_path, states):
    state, x = states["digits_cnn"]
    q = jnn.quantize.ptq(state)
    result = jnn.export(q, x[:2], "stablehlo", tmp_path / "int8.stablehlo")
    with open(result.path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    np.testing.assert_array_equal(np.asarray(exported.call(x)), np.asarray(jax.jit(lambda x: q(x))(x)))
    float_bytes = jnn.export(state, x[:2], "stablehlo", tmp_path / "float.stablehlo").nbytes
    print(f"EXPORT | StableHLO (jax.export) | jax {jax.__version__} | digits_cnn int8 PTQ | "
          f"{result.max_difference:.1e} vs the int8 model | {result.nbytes:,} ({float_bytes:,} in float32)")
    assert result.nbytes < float_bytes / 2  # int8 weights inside
    with pytest.raises(jnn.ExportError, match=r"cannot export this Quantized as onnx: .*int8.*quantize_dynamic"):
        jnn.export(q, x[:2], "onnx", tmp_path / "int8.onnx")
    assert not os.path.exists(tmp_path / "int8.onnx")
