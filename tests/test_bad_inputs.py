"""The bad-input matrix: inputs a hostile but fair user gives, each refused with a clear error.

A clear error is a `ValueError` (or subclass) raised before anything trains, whose message names
what was expected and what was received and says how to fix it. The test prints the counts; the
README's reliability section quotes them.
"""
import re

import numpy as np
import optax
import pytest

import jnn
from jnn import config as config_lib

B, F, C = 8, 5, 3
RNG = np.random.default_rng(0)
X = RNG.normal(size=(B, F)).astype(np.float32)
Y = RNG.integers(0, C, size=B).astype(np.int32)


def _state():
    return jnn.abstract_train_state(jnn.models.MLP(hidden_sizes=(4,), num_classes=C), optax.sgd(0.1), X[:1], 0)


def _check(**batch):
    jnn.check_batch(_state(), {"inputs": X, "labels": Y, **batch})


def _foreign_params_step(kind: str):
    """A step on a state whose params come from another model (linen: other widths; nnx: other names)."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    if kind == "linen":
        state = jnn.create_train_state(jnn.models.MLP(hidden_sizes=(4,), num_classes=C), optax.sgd(0.1), X[:1], 0)
        other = jnn.create_train_state(jnn.models.MLP(hidden_sizes=(6,), num_classes=C), optax.sgd(0.1), X[:1], 0)
    else:
        class A(nnx.Module):
            def __init__(self, rngs):
                self.head = nnx.Linear(F, C, rngs=rngs)

            def __call__(self, x):
                return self.head(x)

        class B(A):
            def __init__(self, rngs):
                self.out = nnx.Linear(F, C, rngs=rngs)

            def __call__(self, x):
                return self.out(x)

        state = jnn.create_train_state(A(nnx.Rngs(0)), optax.sgd(0.1), X[:1], 0)
        other = jnn.create_train_state(B(nnx.Rngs(0)), optax.sgd(0.1), X[:1], 0)
    jax.jit(jnn.make_train_step("cross_entropy"))(state.replace(params=other.params, opt_state=other.opt_state),
                                                  {"inputs": X, "labels": Y})


def _override(*assignments):
    config_lib.override(config_lib.Config(), assignments)


# (name, call, a regular expression the message must match)
CASES = [
    ("batch not a dict", lambda: jnn.check_batch(_state(), (X, Y)), r"expected the batch to be a dict"),
    ("batch without labels", lambda: jnn.check_batch(_state(), {"inputs": X}), r"missing key\(s\) \['labels'\]"),
    ("inputs of the wrong rank", lambda: _check(inputs=X[:, :, None]), r"rank 3.*\(B, 5\)"),
    ("inputs of the wrong width", lambda: _check(inputs=X[:, :4]), r"shape \(8, 4\); expected \(B, 5\)"),
    ("integer inputs into a float model", lambda: _check(inputs=X.astype(np.int32)), r"dtype int32; expected float32"),
    ("a scalar input", lambda: _check(inputs=np.float32(1)), r"scalar"),
    ("labels of another batch size", lambda: _check(labels=Y[:4]), r"same leading batch size"),
    ("label out of range (host)", lambda: _check(labels=np.full(B, C, np.int32)), r"values in \[3, 3\].*\[0, 2\]"),
    ("label -1 (host)", lambda: _check(labels=np.full(B, -1, np.int32)), r"values in \[-1, -1\]"),
    ("labels (B, 1) for a classifier", lambda: _check(labels=Y[:, None]), r"class-id labels have shape \(B,\).*reshape"),
    ("float labels (B,) for a classifier", lambda: _check(labels=Y.astype(np.float32)), r"astype\('int32'\)"),
    ("string class labels", lambda: _check(labels=np.array(["cat", "dog"] * 4)), r"holds strings.*np.unique"),
    ("string class labels into a pipeline",
     lambda: jnn.data.Pipeline({"inputs": X, "labels": np.array(["cat", "dog"] * 4)}, 4), r"holds strings.*np.unique"),
    ("a state whose params come from another linen model", lambda: _foreign_params_step("linen"),
     r"do not belong to this model; first difference: params\['dense_0'\]\['bias'\]: the model expects shape \(4,\)"),
    ("a state whose params come from another nnx model", lambda: _foreign_params_step("nnx"),
     r"do not belong to this model; first difference: params\['head'\]\['bias'\]: the model has it"),
    ("an empty batch", lambda: _check(inputs=X[:0], labels=Y[:0]), r"the batch is empty"),
    ("a mask of the wrong shape", lambda: _check(mask=np.ones((B, 2), np.float32)), r"batch\['mask'\] has shape"),
    ("inputs as a dict for an array model", lambda: _check(inputs={"x": X}), r"structure"),
    ("example inputs without a batch axis",
     lambda: jnn.create_train_state(jnn.models.MLP(), optax.sgd(0.1), np.float32(1), 0), r"leading batch axis"),
    ("a negative seed", lambda: jnn.create_train_state(jnn.models.MLP(), optax.sgd(0.1), X[:1], -1), r"\[0, 2\*\*32\)"),
    ("not a flax module", lambda: jnn.create_train_state(object(), optax.sgd(0.1), X[:1], 0), r"flax.linen.Module or a flax.nnx.Module"),
    ("an unknown train keyword",
     lambda: jnn.create_train_state(jnn.models.MLP(), optax.sgd(0.1), X[:1], 0, train_kwarg="fit_mode"), r"train_kwarg='fit_mode'"),
    ("an unknown loss name", lambda: jnn.make_train_step("crossentropy"), r"unknown loss 'crossentropy'.*Did you mean"),
    ("an unknown metric", lambda: jnn.make_train_step("cross_entropy", metrics=("f1",)), r"unknown metric"),
    ("an unknown non-finite policy", lambda: jnn.make_train_step("mse", on_nonfinite="ignore"), r"on_nonfinite='ignore'"),
    ("a negative learning rate", lambda: jnn.OptimConfig("adam", -1e-3), r"learning_rate=-0.001; expected learning_rate > 0"),
    ("--set optim.learning_rate=-0.01", lambda: _override("optim.learning_rate=-0.01"), r"learning_rate > 0"),
    ("momentum 1.5", lambda: jnn.OptimConfig("sgd", 0.1, momentum=1.5), r"momentum in \[0, 1\)"),
    ("an unknown optimizer", lambda: jnn.make_optimizer(jnn.OptimConfig("adamm", 1e-3)), r"unknown optimizer 'adamm'"),
    ("an unknown schedule", lambda: jnn.make_schedule(jnn.OptimConfig("adam", 1e-3, schedule="cosin")), r"unknown schedule"),
    ("train.steps=-5", lambda: _override("train.steps=-5"), r"steps=-5; expected steps >= 1"),
    ("train.eval_every=-1", lambda: _override("train.eval_every=-1"), r"eval_every >= 1"),
    ("train.log_every=0", lambda: _override("train.log_every=0"), r"log_every >= 1"),
    ("train.compute_dtype=float8", lambda: _override("train.compute_dtype=float8"), r"compute_dtype one of"),
    ("train.label_smoothing=1.5", lambda: _override("train.label_smoothing=1.5"), r"label_smoothing in \[0, 1\)"),
    ("train.best_mode=up", lambda: _override("train.best_mode=up"), r"'max' or 'min'"),
    ("data.batch_size=0", lambda: _override("data.batch_size=0"), r"batch_size >= 1"),
    ("data.val_fraction=1.2", lambda: _override("data.val_fraction=1.2"), r"val_fraction in \(0, 1\)"),
    ("data.augment=rotate", lambda: _override("data.augment=('rotate',)"), r"augment="),
    ("an unknown config key", lambda: _override("train.stepz=5"), r"stepz"),
    ("fit(num_steps=-5)", lambda: jnn.fit(_state(), [], num_steps=-5, loss_fn="mse"), r"num_steps >= 0"),
    ("fit(log_every=0)", lambda: jnn.fit(_state(), [], num_steps=5, loss_fn="mse", log_every=0), r"log_every >= 1"),
    ("fit without a loss", lambda: jnn.fit(_state(), [], num_steps=5), r"pass loss_fn"),
    ("early stopping without eval data",
     lambda: jnn.fit(_state(), [], num_steps=5, loss_fn="mse", early_stopping=jnn.EarlyStopping()), r"no eval_data"),
    ("EarlyStopping(mode='up')", lambda: jnn.EarlyStopping(mode="up"), r"'max' or 'min'"),
    ("pad_batch to a smaller size", lambda: jnn.pad_batch({"inputs": X, "labels": Y}, 4), r"more than the padded size"),
    ("a batch that does not divide over 8 devices",
     lambda: jnn.parallel.shard_batch({"inputs": X[:6], "labels": Y[:6]}, jnn.parallel.make_mesh()), r"does not divide evenly"),
    ("make_mesh(model=3) on 8 devices", lambda: jnn.parallel.make_mesh(model=3), r"positive divisor"),
    ("an unknown dataset", lambda: jnn.data.load("imagenette"), r"imagenette"),
    ("an unknown model", lambda: jnn.models.get("resnet21"), r"resnet21"),
]


def test_every_bad_input_is_a_clear_error(capsys):
    unclear = []
    for name, call, pattern in CASES:
        try:
            call()
        except ValueError as err:
            if not re.search(pattern, str(err), re.S):
                unclear.append(f"{name}: message {str(err)[:200]!r} does not match {pattern!r}")
        except Exception as err:  # noqa: BLE001 - any other type is an unclear error
            unclear.append(f"{name}: {type(err).__name__}: {str(err)[:200]}")
        else:
            unclear.append(f"{name}: accepted without a word")
    with capsys.disabled():
        print(f"\nbad inputs: {len(CASES)} cases, {len(CASES) - len(unclear)} clear errors")
    assert not unclear, "\n".join(unclear)


@pytest.mark.parametrize("name", ["train.steps=-5", "train.eval_every=-1", "train.log_every=0"])
def test_the_command_refuses_bad_config_before_training(tmp_path, capsys, name):
    from jnn import cli

    run = tmp_path / "run"
    assert cli.main(["train", "--debug", "--run-dir", str(run), "--set", name]) == 2
    assert "expected" in capsys.readouterr().err and not (run / "checkpoints").exists()


def test_a_bad_metric_name_is_refused_before_the_run_directory_is_written(tmp_path, capsys):
    from jnn import cli

    run = tmp_path / "run"
    assert cli.main(["train", "--debug", "--run-dir", str(run), "--set", "train.best_metric=acc"]) == 2
    err = capsys.readouterr().err
    assert "train.best_metric='acc' is not an evaluation metric" in err and "['accuracy', 'loss']" in err
    assert not run.exists()  # nothing to get stuck on: the same directory starts a good run
    assert cli.main(["train", "--debug", "--run-dir", str(run), "--set", "train.steps=4"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--set", "train.loss=mse"], r"mean_squared_error: predictions have shape \(16, 10\) but targets have shape \(16,\)"),
    (["--stop-at", "100"], r"--stop-at 100: expected a step in \[1, train.steps=8\)"),
], ids=["loss_does_not_fit_the_labels", "stop_at_past_the_end"])
def test_errors_that_used_to_come_after_training_started_come_before_the_run_directory(tmp_path, capsys,
                                                                                        args, message):
    from jnn import cli

    run = tmp_path / "run"
    assert cli.main(["train", "--debug", "--run-dir", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not run.exists()


def test_a_full_disk_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """`jnn train` with too little space for its checkpoints: exit 2, one line naming the sizes and
    the fix, no traceback, no run directory; and `Checkpointer.save` refuses before writing."""
    import shutil

    from jnn import cli

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    run = tmp_path / "run"
    assert cli.main(["train", "--debug", "--run-dir", str(run)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(r"jnn train: error: \[Errno 28\] not enough disk space for checkpoints in .*run/checkpoints: "
                     r"4 checkpoint\(s\) of 1\.\d MiB need \d\.\d MiB, but 1\.0 MiB are free\. Fix: ", err), err
    assert not run.exists()

    state = jnn.create_train_state(jnn.models.MLP(hidden_sizes=(4,), num_classes=C), optax.sgd(0.1), X[:1], 0)
    with jnn.Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(OSError, match="not enough disk space") as info:
            ckpt.save(state)
        assert info.value.errno == 28 and ckpt.all_steps() == []
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [".jnn-claim"]  # not even a temporary step folder
