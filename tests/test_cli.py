"""The `jnn` command end to end: train, resume bit for bit, eval, info, and every user error."""
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from jnn import cli, experiment, presets
from jnn.checkpoint import Checkpointer


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _params(run_dir, step=None):
    config = experiment.read_config(run_dir)
    exp = experiment.build(config)
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        state, _ = ckpt.restore(exp.state, step=step)
    return state


@pytest.mark.slow
def test_default_train_reaches_99_percent_on_digits(tmp_path, capsys):
    code, out, _ = _run(["train", "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 0, out
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert test["accuracy"] >= 0.99, out
    assert "weighted avg" in out and "test accuracy" in out
    for name in ("config.json", "metrics.jsonl", "curves.png", "tb", "checkpoints"):
        assert (tmp_path / "run" / name).exists(), name


def test_debug_run_then_eval_and_files(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = _run(["train", "--debug", "--run-dir", str(run), "--set", "optim.learning_rate=0.01"], capsys)
    assert code == 0, out
    config = json.loads((run / "config.json").read_text())
    assert config["optim"]["learning_rate"] == 0.01 and config["train"]["steps"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "eval", "test"}
    code, out, _ = _run(["eval", str(run)], capsys)
    assert code == 0 and "test accuracy" in out


def test_stop_and_resume_is_bit_for_bit_identical_to_straight_run(tmp_path, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _run(["train", "--debug", "--run-dir", str(straight)], capsys)[0] == 0
    code, out, _ = _run(["train", "--debug", "--run-dir", str(stopped), "--stop-at", "3"], capsys)
    assert code == 0 and "--resume" in out
    assert not (stopped / "test_metrics.json").exists()
    code, out, _ = _run(["train", "--resume", str(stopped)], capsys)
    assert code == 0 and "resumed" in out, out
    a, b = _params(str(straight), step=8), _params(str(stopped), step=8)
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.opt_state, b.opt_state)
    np.testing.assert_array_equal(jax.random.key_data(a.rng), jax.random.key_data(b.rng))


def test_info_lists_backend_and_versions(capsys):
    code, out, _ = _run(["info"], capsys)
    assert code == 0 and "jax backend: cpu" in out and "flax:" in out and "devices (8)" in out


def test_presets_and_models_are_listed(capsys):
    _, out, _ = _run(["presets"], capsys)
    assert all(name in out for name in presets.names())
    _, out, _ = _run(["models"], capsys)
    assert "resnet20" in out and "gpt2_small" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "resnet"], "unknown preset 'resnet'; expected one of"),
    (["train", "--debug", "--set", "optim.lr=1"], "unknown config key 'optim.lr'; expected one of ['optim.name'"),
    (["train", "--debug", "--set", "model.depth=3"], "has no attribute(s) ['depth']. Valid overrides"),
    (["train", "--preset", "mlp_mnist", "--debug", "--data-dir", "{tmp}/nothing"], "train-images-idx3-ubyte"),
    (["train", "--preset", "lenet5_cifar10", "--debug", "--data-dir", "{tmp}/empty"], "cifar"),
    (["train", "--resume", "{tmp}/empty"], "no checkpoint there"),
    (["eval", "{tmp}/empty"], "no config.json"),
    (["train", "--debug", "--set", "train.seed=-1"], "an int seed must be in [0, 2**32)"),
    (["train", "--debug", "--set", "train.loss=nll", "--set", "train.label_smoothing=0.1"],
     "loss 'nll' takes no option(s) ['label_smoothing']"),
])
def test_user_errors_are_one_clear_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err


def test_missing_data_dir_points_to_digits(tmp_path, capsys):
    code, _, err = _run(["train", "--preset", "mlp_mnist", "--debug", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "jnn train" in err and "digits" in err


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(["train", "--debug", "--run-dir", str(run)], capsys)[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".jnn-claim"}
    code, _, err = _run(["train", "--debug", "--run-dir", str(run)], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    code, _, err = _run(["train", "--resume", str(run), "--set", "optim.learning_rate=0.5"], capsys)
    assert code == 2 and "--resume continues a run with the config it started with; got --set" in err
    code, _, err = _run(["train", "--resume", str(run), "--stop-at", "3"], capsys)
    assert code == 2 and "--stop-at 3: the run is already at step 8" in err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".jnn-claim"}
    assert after == before, "nothing already written in a run directory is lost or changed (the claim names its last holder)"


def test_failed_first_attempt_can_be_started_again(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _run(["train", "--debug", "--run-dir", str(run), "--set", "train.loss=mse"], capsys)
    assert code == 2  # mse on integer class labels vs (B, 10) logits: refused before anything is written
    assert not (run / "checkpoints").exists()
    # An attempt that died before its first checkpoint leaves only config.json.
    assert _run(["train", "--debug", "--run-dir", str(run), "--set", "train.steps=2"], capsys)[0] == 0
    shutil.rmtree(run / "checkpoints")
    code, _, err = _run(["train", "--debug", "--run-dir", str(run), "--set", "train.steps=2"], capsys)
    assert "already holds a run" not in err  # the same config may start again
    shutil.rmtree(run / "checkpoints")
    code, _, err = _run(["train", "--debug", "--run-dir", str(run)], capsys)
    assert code == 2 and "already holds a run" in err  # a different config may not


def test_incompatible_checkpoint_is_reported(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(["train", "--debug", "--run-dir", str(run)], capsys)[0] == 0
    config = json.loads((run / "config.json").read_text())
    config["model"]["kwargs"] = {"hidden_sizes": [7]}  # the config no longer matches the weights
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = _run(["eval", str(run)], capsys)
    assert code == 2 and "could be restored into the current model" in err


def test_a_restore_error_is_one_line_without_tracebacks(tmp_path, capfd):
    run = tmp_path / "run"
    assert cli.main(["train", "--debug", "--run-dir", str(run), "--set", "train.steps=2"]) == 0
    config = json.loads((run / "config.json").read_text())
    config["model"]["kwargs"] = {"features": [7, 8]}  # a changed model
    (run / "config.json").write_text(json.dumps(config))
    capfd.readouterr()
    code = cli.main(["eval", str(run)])
    err = capfd.readouterr().err  # file-descriptor level: orbax's and asyncio's logs included
    assert code == 2 and "Traceback" not in err and "Event loop is closed" not in err
    assert err.count("\n") == 1 and "params/" in err and "checkpoint (" in err



@pytest.mark.slow
def test_fine_tune_from_a_run_with_lora_from_the_command_line(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert cli.main(["train", "--debug", "--run-dir", str(pre)]) == 0
    run = tmp_path / "tuned"
    assert cli.main(["train", "--debug", "--run-dir", str(run), "--set", f"train.init_from={pre}",
                     "--set", "train.lora_rank=2", "--set", "optim.lr_groups=(('conv', 0.5),)"]) == 0
    out = capsys.readouterr().out
    assert f"initialised from {pre}: loaded 8 array(s), initialised 0 new" in out
    assert "LoRA rank 2: 1,958 trainable parameters" in out
    with Checkpointer(run / "checkpoints") as ckpt:
        saved = ckpt.restore(experiment.build(experiment.read_config(str(run))).state)[0]
    pretrained = Checkpointer(pre / "checkpoints").restore(experiment.build(experiment.read_config(str(pre))).state)[0]
    chex.assert_trees_all_equal(saved.params["base"], pretrained.params)  # the base stayed frozen


@pytest.mark.slow
def test_the_toolbox_from_the_command_line(tmp_path, capsys):
    """One debug run with every technique of the toolbox set from the command line: a plateau
    schedule (mode "max" on the loss: every evaluation after the first halves the rate), the L2
    penalty, pruning to 50%, PGD adversarial training on half of each batch, QAT, and int8
    quantization of the result."""
    run = tmp_path / "run"
    assert cli.main(["train", "--debug", "--run-dir", str(run), "--set", "train.steps=12",
                     "--set", "train.eval_every=4", "--set", "train.log_every=2",
                     "--set", "optim.schedule=plateau", "--set", "optim.plateau_mode=max",
                     "--set", "optim.plateau_patience=1", "--set", "optim.l2=1e-4",
                     "--set", "optim.prune_sparsity=0.5", "--set", "optim.prune_end_step=8",
                     "--set", "train.adversarial=pgd", "--set", "train.adversarial_steps=2",
                     "--set", "train.adversarial_mix=0.5", "--set", "train.qat=true",
                     "--set", "train.quantize=int8"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["learning_rate"] for r in records if r["split"] == "train"]
    lr = presets.get("digits", debug=True).optim.learning_rate
    assert rates == pytest.approx([lr] * 4 + [lr / 2] * 2)  # halved by the evaluation at step 8
    assert "pruned: 50.00% of the pruned kernels' weights" in out
    with Checkpointer(run / "checkpoints") as ckpt:
        state = ckpt.restore(experiment.build(experiment.read_config(str(run))).state)[0]
    kernels = [np.asarray(x) for x in jax.tree.leaves(state.params) if np.ndim(x) > 1]
    assert sum(int((k == 0).sum()) for k in kernels) == sum(round(0.5 * k.size) for k in kernels)
    test = json.loads((run / "test_metrics.json").read_text())
    assert 0.0 <= test["adversarial_accuracy"] <= 1.0 and test["adversarial_loss"] > 0
    assert "under the training attack (pgd, epsilon 0.1): accuracy" in out
    assert 0 <= test["int8_accuracy"] <= 1 and test["int8_bytes"] < test["float_bytes"] / 3.5
    assert "int8 (qwix PTQ, w8a8): accuracy" in out


@pytest.mark.parametrize("setting, message", [
    ("train.adversarial=pgdd", "adversarial='pgdd'; expected adversarial 'pgd', 'fgsm' or None"),
    ("optim.plateau_metric=acc", "optim.plateau_metric='acc' is not an evaluation metric"),
], ids=["unknown_attack", "unknown_plateau_metric"])
def test_toolbox_settings_are_checked_before_the_run_directory(tmp_path, capsys, setting, message):
    bad = tmp_path / "bad"
    assert cli.main(["train", "--debug", "--run-dir", str(bad), "--set", "optim.schedule=plateau",
                     "--set", setting]) == 2
    assert message in capsys.readouterr().err and not bad.exists()


_GC_PROBE = """
import gc, json, os, sys
from jnn import cli, experiment
seen = {}
def report():
    print("PROBE", json.dumps(seen), file=sys.stderr, flush=True)
def probe(name, fn):
    def wrapped(*args, **kwargs):
        seen[name] = [gc.isenabled(), gc.get_freeze_count()]
        if name == "fit":  # what the test looks at is over: the rest of the run is not needed
            report()
            os._exit(0)
        return fn(*args, **kwargs)
    return wrapped
experiment.build = probe("build", experiment.build)
experiment.fit = probe("fit", experiment.fit)
cli._info = probe("info", cli._info)
import jnn.parallel._launch
jnn.parallel._launch.launch_local = probe("launch", lambda *args, **kwargs: 0)  # `--processes 2`
import atexit
atexit.register(report)
sys.argv = ["jnn", *sys.argv[1:]]
cli.console() if sys.argv[1] != "--main" else sys.exit(cli.main(sys.argv[2:]))
"""


_LAUNCH_PROBE = """
import json, sys
import jnn.parallel._launch
def launched(argv, num_processes, **kwargs):
    print("PROBE", json.dumps({"jax": sorted(m for m in sys.modules if m.partition(".")[0] in ("jax", "jaxlib", "flax")),
                               "argv": argv, "processes": num_processes, **kwargs}), flush=True)
    return 0
jnn.parallel._launch.launch_local = launched
from jnn import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_the_launcher_of_processes_n_starts_its_children_without_importing_jax(tmp_path):
    """`jnn train --processes N` starts N copies of itself and only watches them: it imports no JAX
    (0.5 s before any child could start, and its memory while they train), nor flax."""
    import subprocess
    import sys

    run = str(tmp_path / "run")
    out = subprocess.run([sys.executable, "-c", _LAUNCH_PROBE, "train", "--debug", "--processes", "2", "--run-dir", run],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.rpartition("PROBE ")[2])
    assert seen["jax"] == []
    assert seen["processes"] == 2 and seen["devices_per_process"] == 1
    assert seen["argv"] == [sys.executable, "-m", "jnn.cli", "train", "--debug", "--processes", "2", "--run-dir", run]


@pytest.mark.parametrize("how", ["console", "main"])
def test_the_jnn_command_collects_no_garbage_while_it_starts(tmp_path, how):
    """`jnn train` (the console command) starts with the collector off, then freezes the start-up's
    objects and turns it back on for training; other commands turn it back on at once. A program
    that calls `cli.main` keeps its collector on and its heap unfrozen."""
    import subprocess
    import sys

    def run(*argv):
        prefix = ["--main"] if how == "main" else []
        out = subprocess.run([sys.executable, "-c", _GC_PROBE, *prefix, *argv], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stderr.rpartition("PROBE ")[2])

    seen = run("train", "--debug", "--run-dir", str(tmp_path / "run"))
    info = run("info")
    launcher = run("train", "--debug", "--processes", "2", "--run-dir", str(tmp_path / "launched"))
    if how == "console":
        assert seen["build"] == [False, 0]  # the start-up: no collections, nothing frozen yet
        assert seen["fit"][0] is True and seen["fit"][1] > 100_000  # training: collected, past a frozen heap
        assert info["info"][0] is True and launcher["launch"][0] is True
    else:
        assert seen["build"] == [True, 0] and seen["fit"] == [True, 0] and info["info"] == [True, 0]
        assert launcher["launch"] == [True, 0]
