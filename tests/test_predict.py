"""`jnn.load(run_dir)`: the run's checkpoint in eval mode with its input normalisation; `jnn predict`
over .npy / .npz files and image folders in padded batches; `jnn export RUN_DIR`; wrong inputs are
refused before anything is written, with the fix."""
import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

import jnn
from jnn import cli

SPLITS = jnn.data.load("digits", val_fraction=0.1, seed=0)
X = SPLITS.test["inputs"][:30]  # (30, 8, 8, 1) in [0, 1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    assert cli.main(["train", "--debug", "--run-dir", str(run_dir), "--set", "data.normalize=true",
                     "--set", "train.steps=30"]) == 0
    return run_dir


def test_load_gives_the_checkpoint_in_eval_mode_with_the_runs_normalisation(run):
    model = jnn.load(run)
    _, state = jnn.experiment.restore(str(run))
    assert int(model.state.step) == int(state.step) and model.input_shape == (8, 8, 1)
    mean, std = jnn.data.channel_stats(SPLITS.train["inputs"])
    normalised = jnn.data.Normalize(mean, std)({"inputs": X})["inputs"]  # what the run's pipeline feeds
    expected = state.apply_fn(state.variables, normalised)
    np.testing.assert_allclose(model(X), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(model(X), state.apply_fn(state.variables, X), atol=1e-3)  # normalisation matters

    whole = model.predict(X, batch_size=len(X))
    batched = model.predict(X, batch_size=7)  # 4 full batches and a last one padded from 2 to 7
    np.testing.assert_array_equal(batched["predictions"], whole["predictions"])
    np.testing.assert_allclose(batched["probabilities"], whole["probabilities"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(whole["probabilities"].sum(-1), 1.0, rtol=1e-6)
    assert whole["probabilities"].shape == (30, 10) and whole["predictions"].dtype.kind == "i"


def test_predict_command_on_files_and_an_image_folder(run, tmp_path, capsys):
    model = jnn.load(run)
    np.save(tmp_path / "x.npy", X)
    np.savez(tmp_path / "x.npz", inputs=X, labels=np.zeros(30))
    for name in ("x.npy", "x.npz"):
        out = tmp_path / f"{name}.predictions.npz"
        assert cli.main(["predict", str(run), str(tmp_path / name), "--output", str(out), "--batch-size", "8"]) == 0
        with np.load(out) as f:
            np.testing.assert_array_equal(f["predictions"], model.predict(X)["predictions"])
            assert f["probabilities"].shape == (30, 10)
    assert "wrote predictions and probabilities of 30 example(s)" in capsys.readouterr().out

    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.round(X[:5, :, :, 0] * 255).astype(np.uint8)  # (5, 8, 8) grey images
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(folder / f"digit_{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "images.npz"
    assert cli.main(["predict", str(run), str(folder), "--output", str(out)]) == 0
    with np.load(out) as f:
        assert list(f["files"]) == [f"digit_{i}.png" for i in range(5)]
        np.testing.assert_array_equal(f["predictions"], model.predict(pixels[..., None] / np.float32(255))["predictions"])


@pytest.mark.parametrize("inputs, message", [
    (X[:, :, :, 0], r"inputs of shape \(30, 8, 8\); the model takes \(N, 8, 8, 1\).*Fix: resize or reshape"),
    (X[0], r"received one example of shape \(8, 8, 1\); expected a batch of shape \(N, 8, 8, 1\). Fix: add the batch axis"),
    ((X * 255).astype(np.uint8), r"dtype uint8; expected floating-point values in \[0, 1\].*x.astype\(np.float32\) / 255"),
    (X * 255, r"values lie in \[0, 255\]; the model was trained on values in \[0, 1\]. Fix: scale"),
    (np.where(X > 0.5, np.nan, X), r"value\(s\) are NaN or infinite"),
])
def test_wrong_inputs_are_refused_before_anything_is_written(run, tmp_path, capsys, inputs, message):
    np.save(tmp_path / "bad.npy", inputs)
    out = tmp_path / "out.npz"
    assert cli.main(["predict", str(run), str(tmp_path / "bad.npy"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jnn predict: error: predict: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_export_command_writes_a_checked_stablehlo_model_with_the_normalisation(run, tmp_path, capsys):
    out = tmp_path / "digits.stablehlo"
    assert cli.main(["export", str(run), "--format", "stablehlo", "--output", str(out)]) == 0
    assert "stablehlo model:" in capsys.readouterr().out
    with open(out, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    np.testing.assert_allclose(exported.call(X), jnn.load(run)(X), rtol=1e-5, atol=1e-6)  # raw inputs in
    assert json.loads((run / "config.json").read_text())["data"]["normalize"] is True
