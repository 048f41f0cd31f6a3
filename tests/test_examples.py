"""Every script in examples/ runs: one or two steps of its --debug variant, through its main()."""
import importlib.util
import math
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
# A step or two: compiling dominates, so these cover the whole script in seconds.
FEW_STEPS = ["--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.log_every=1"]
PRESET_EXAMPLES = ["train_loop", "lenet5_cifar10", "cnn_finetune", "gpt_char", "lstm_char"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, tmp_path, *extra: str) -> dict:
    run_dir = str(tmp_path / name)
    summary = _load(name).main(["--debug", "--run-dir", run_dir, *FEW_STEPS, *extra])
    assert summary["run_dir"] == run_dir
    return summary


def _check_report(report: dict, num_classes: int = 10) -> None:
    for key in ("precision", "recall", "f1", "support"):
        assert np.shape(report[key]) == (num_classes,), key
    assert 0.0 <= float(report["accuracy"]) <= 1.0


@pytest.mark.parametrize("name", PRESET_EXAMPLES)
def test_example_has_the_common_layout(name):
    module = _load(name)
    doc = module.__doc__
    assert f"python examples/{name}.py --debug" in doc, "the docstring holds the exact debug command"
    assert f"python examples/{name}.py " in doc.replace(f"python examples/{name}.py --debug", ""), "and a full one"
    assert callable(module.main) and callable(module.parse_args)
    args = module.parse_args(["--debug", "--data-dir", "d", "--run-dir", "r", "--set", "a.b=1", "--set", "c.d=2"])
    assert (args.debug, args.data_dir, args.run_dir, args.set) == (True, "d", "r", ["a.b=1", "c.d=2"])


@pytest.mark.parametrize("flavour", [[], ["--nnx"]], ids=["linen", "nnx"])
def test_hand_written_loop_trains_checkpoints_and_reports(flavour, tmp_path):
    summary = _run("train_loop", tmp_path, *flavour)
    assert summary["steps"] == 2 and summary["model"] == ("nnx" if flavour else "linen")
    assert math.isfinite(summary["test"]["loss"])
    assert {r["split"] for r in summary["history"]} == {"train", "eval"}
    assert any(p.name.isdigit() for p in (tmp_path / "train_loop" / "checkpoints").iterdir())


def test_lenet5_example_fits_and_reports(tmp_path):
    summary = _run("lenet5_cifar10", tmp_path)
    assert summary["steps"] == 2 and math.isfinite(summary["test"]["loss"])
    _check_report(summary["test"]["report"])
    assert {r["split"] for r in summary["history"]} == {"train", "eval"}
    assert (tmp_path / "lenet5_cifar10" / "metrics.jsonl").exists()


def test_cnn_finetune_freezes_convolutions_and_reports(tmp_path, capsys):
    summary = _run("cnn_finetune", tmp_path, "--finetune-steps", "2")
    assert summary["frozen_unchanged"]
    assert list(summary["class_names"]) == [str(c) for c in range(10)]  # the digits fallback
    _check_report(summary["after"]["report"])
    for phase in ("before", "after"):
        assert math.isfinite(summary[phase]["loss"]) and 0.0 <= summary[phase]["accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert "weighted avg" in out and "convolutions unchanged: True" in out
    for phase in ("pretrain", "finetune"):
        assert (tmp_path / "cnn_finetune" / phase / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", [pytest.param("gpt_char", marks=pytest.mark.slow), "lstm_char"])
def test_char_model_example_trains_and_samples(name, tmp_path):
    num_chars = 24
    summary = _run(name, tmp_path, "--num-chars", str(num_chars), "--temperature", "0.7")
    assert summary["steps"] == 2 and math.isfinite(summary["test"]["loss"])
    sample = summary["sample"]
    assert len(sample) == num_chars
    assert set(sample) <= set(summary["vocab"])
    assert (tmp_path / name / "sample.txt").read_text(encoding="utf-8") == sample


def test_regularization_example_prints_every_variant(capsys):
    rows = _load("regularization").main(["--debug"])
    assert [r["variant"] for r in rows] == ["baseline", "early stopping", "augmentation", "L2 penalty", "plateau"]
    assert all(math.isfinite(r["test_loss"]) and 0 <= r["test_accuracy"] <= 1 for r in rows)
    assert "train acc test acc" in capsys.readouterr().out


def test_adversarial_example_prints_clean_and_attacked_accuracy(capsys):
    rows = _load("adversarial").main(["--debug"])
    assert [r["training"] for r in rows] == ["standard", "adversarial"]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("clean", "FGSM", "PGD-20"))
    assert "clean    FGSM  PGD-20" in capsys.readouterr().out


@pytest.mark.parametrize("variant", ["lora", "few-shot"])
def test_cnn_finetune_lora_and_few_shot_variants(tmp_path, variant):
    summary = _run("cnn_finetune", tmp_path, "--finetune-steps", "2", "--variant", variant)
    assert summary["variant"] == variant and summary["frozen_unchanged"]
    assert math.isfinite(summary["after"]["loss"])
    if variant == "few-shot":
        assert 0 <= summary["scratch"]["accuracy"] <= 1


def test_pruning_example_reports_sparsity_and_accuracy(capsys):
    rows = _load("pruning").main(["--debug"])
    assert [r["variant"] for r in rows] == ["dense", "50% layer", "90% global"]  # --debug: two variants
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)


def test_mixed_precision_example_trains_every_policy(capsys):
    rows = _load("mixed_precision").main(["--debug"])
    assert [r["policy"] for r in rows] == ["float32", "mixed_bf16", "mixed_f16"]
    assert all(r["params_dtype"] == "float32" for r in rows) and rows[2]["loss_scale"] is not None
    assert "largest gap between the bf16 and float32 loss curves" in capsys.readouterr().out


def test_int8_example_reports_accuracy_logit_difference_and_size(capsys):
    rows = _load("int8").main(["--debug"])
    assert [r["model"] for r in rows] == ["float32", "int8 PTQ", "QAT -> int8"]
    assert rows[1]["bytes"] < rows[0]["bytes"] / 3.5
