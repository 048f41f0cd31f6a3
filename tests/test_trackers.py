"""Weights & Biases and MLflow writers against the real libraries, read back with their own readers:
W&B's offline run file (its protobuf records) and the MLflow client."""
import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from jnn import cli, config, metrics, trackers, writers


def read_wandb_run(run_dir):
    """The records of W&B offline runs under `run_dir/wandb`, parsed with W&B's own protobuf
    classes: {"id", "name", "project", "config", "history": {step: {key: value}}, "summary", "exit",
    "files", "artifacts"} per run file, in the order the runs were made.

    The `.wandb` file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB
    blocks of chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)
    and a piece of a serialised `Record`.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B"
        pos, chunks, pending = 7, [], b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (length == 0 and kind == 0):  # block padding
                pos += left if left >= 7 else left
                continue
            piece, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                chunks.append(pending + piece)
                pending = b""
            else:
                pending += piece
        run = {"history": {}, "summary": {}, "files": [], "artifacts": []}
        for record in map(pb.Record.FromString, chunks):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, name=record.run.display_name, project=record.run.project,
                           config=_items(record.run.config.update))
            elif kind == "history":
                run["history"].setdefault(record.history.step.num, {}).update(_items(record.history.item))
            elif kind == "summary":
                run["summary"].update(_items(record.summary.update))
            elif kind == "files":
                run["files"] += [f.path for f in record.files.files]
            elif kind == "artifact":
                run["artifacts"].append((record.artifact.type, record.artifact.name,
                                         [m.path for m in record.artifact.manifest.contents]))
            elif kind == "exit":
                run["exit"] = record.exit.exit_code
        runs.append(run)
    return runs


def _items(items):
    """{key: value} of W&B's key/value records (a key is `key`, or `nested_key` joined by "/")."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _report():
    confusion = np.array([[5, 1], [2, 7]])
    return {"accuracy": 12 / 15, "loss": 0.4, "confusion": confusion,
            "report": metrics.classification_report(confusion)}


def test_jnn_train_logs_to_wandb_and_mlflow_then_resumes_the_same_runs(tmp_path, capsys, monkeypatch):
    """`--set log.writers=wandb,mlflow`: config, metrics per split, test report, pictures and the tested
    checkpoint, in W&B offline files and an MLflow sqlite store; a resumed run continues both runs.
    Also `--summary` and `--profile` on the same run, and `jnn eval`'s confusion matrix."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts a sqlite store's artifacts in ./mlruns
    run, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    args = ["train", "--debug", "--run-dir", str(run), "--set", "log.writers=wandb,mlflow",
            "--set", f"log.mlflow_tracking_uri={uri}", "--set", "log.log_checkpoint=true", "--set", "log.project=p"]
    assert cli.main([*args, "--stop-at", "4", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "DigitsCNN on float32[1,8,8,1]" in out and "optimizer state: 143,512" in out  # the summary
    assert cli.main(["train", "--resume", str(run), "--profile", "5:7"]) == 0
    out = capsys.readouterr().out
    assert f"profile of steps 5-6 written to {run}/profile/plugins/profile/" in out
    assert "upload it with `wandb sync" in out and f"MLflow run " in out
    test = json.load(open(run / "test_metrics.json"))

    # W&B: two offline run files of one run id (the resume continued it).
    first, resumed = read_wandb_run(run)
    assert first["id"] == resumed["id"] == json.load(open(run / "trackers.json"))["wandb"]
    assert first["project"] == "p" and first["name"] == "run"
    saved = json.load(open(run / "config.json"))
    assert first["config"]["optim"] == saved["optim"] and first["config"]["train"] == saved["train"]
    assert first["config"]["log"]["writers"] == ["wandb", "mlflow"]
    logged = writers.read_jsonl(run / "metrics.jsonl")
    for split in ("train", "eval"):
        for record in (r for r in logged if r["split"] == split):
            part = first if record["step"] <= 4 else resumed
            assert part["history"][record["step"]][f"{split}/loss"] == pytest.approx(record["loss"])
    assert "exit" in first and first["exit"] == 0 and resumed["exit"] == 0
    assert resumed["summary"]["test/accuracy"] == pytest.approx(test["accuracy"])
    assert resumed["summary"]["test/step"] == 8
    assert resumed["summary"]["test/per_class"]["_type"] == "table-file"
    assert {"curves.png", "confusion.png"} <= set(resumed["files"])
    [(name, files)] = [(name, files) for kind, name, files in resumed["artifacts"] if kind == "model"]
    assert name == f"checkpoint-{first['id']}" and files

    # MLflow: one run, read back with the client.
    client = MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "p"]
    [mlrun] = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_id == json.load(open(run / "trackers.json"))["mlflow"] and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["optim.learning_rate"] == str(saved["optim"]["learning_rate"])
    assert mlrun.data.params["train.steps"] == "8" and mlrun.data.params["log.writers"] == "['wandb', 'mlflow']"
    history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "eval/accuracy"))
    evals = [(r["step"], r["accuracy"]) for r in logged if r["split"] == "eval"]
    assert [s for s, _ in history] == [s for s, _ in evals] == [4, 8]
    assert [v for _, v in history] == pytest.approx([v for _, v in evals])
    assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss")) == [
        r["step"] for r in logged if r["split"] == "train"] == [2, 4, 6, 8]
    assert mlrun.data.metrics["test/accuracy"] == pytest.approx(test["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"curves.png", "confusion.png", "test_metrics.json", "test_per_class.json", "checkpoint"} <= artifacts
    per_class = json.load(open(client.download_artifacts(mlrun.info.run_id, "test_per_class.json", str(tmp_path))))
    assert [row[0] for row in per_class["data"]] == [str(c) for c in range(10)]
    assert [row[4] for row in per_class["data"]] == test["report"]["support"]

    # jnn eval draws the confusion matrix of the checkpoint it evaluates.
    assert cli.main(["eval", str(run), "--step", "4"]) == 0
    assert f"confusion matrix: {run}/confusion-step4.png" in capsys.readouterr().out


def test_mlflow_file_store_and_run_status(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(ValueError, match=r"is an MLflow file store, which MLflow 3 uses only when "
                                         r"MLFLOW_ALLOW_FILE_STORE=true; .* Fix: .*sqlite:///"):
        trackers.check_log(config.LogConfig(writers=("mlflow",), mlflow_tracking_uri=uri))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    trackers.check_log(config.LogConfig(writers=("mlflow",), mlflow_tracking_uri=uri))
    writer = writers.MlflowWriter("e", tracking_uri=uri, run_name="r", params={"a": {"b": 1, "c": (2, 3)}},
                                  class_names=["cat", "dog"])
    writer.write(1, {"loss": 2.0, "accuracy": 0.5, "confusion": np.eye(2)}, "train")
    writer.write(2, {"loss": 1.0}, "train")
    writer.write(2, _report(), "test")
    writer.close()
    failing = writers.MlflowWriter("e", tracking_uri=uri, run_name="failing")
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("a crash mid-run")
        finally:
            failing.close()
    client = MlflowClient(uri)
    run = client.get_run(writer.run_id)
    assert run.data.params == {"a.b": "1", "a.c": "(2, 3)"} and run.info.run_name == "r"
    assert [(m.step, m.value) for m in client.get_metric_history(writer.run_id, "train/loss")] == [(1, 2.0), (2, 1.0)]
    assert "train/confusion" not in run.data.metrics and run.data.metrics["test/accuracy"] == pytest.approx(0.8)
    per_class = json.load(open(client.download_artifacts(writer.run_id, "test_per_class.json", str(tmp_path))))
    assert per_class["data"][1][:2] == ["dog", pytest.approx(7 / 8)]
    assert (run.info.status, client.get_run(failing.run_id).info.status) == ("FINISHED", "FAILED")


def test_a_tracker_that_is_not_installed_is_one_line_before_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(trackers._PACKAGES, "wandb", "wandb_is_not_here")  # as if wandb were not installed
    run = tmp_path / "run"
    assert cli.main(["train", "--debug", "--run-dir", str(run), "--set", "log.writers=mlflow,wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jnn train: error: log.writers asks for wandb, but wandb_is_not_here is not installed; expected "
                   "the tracker's package in this environment. Fix: pip install \"jnn[trackers]\" (or: pip install "
                   "wandb_is_not_here), or drop wandb from log.writers.")
    assert not run.exists()


def test_log_config_errors_and_lazy_imports():
    with pytest.raises(ValueError, match=r"LogConfig: writers=\('wandb', 'tensorboard'\); expected writers a "
                                         r"subset of \('wandb', 'mlflow'\), each once"):
        config.override(config.Config(), ["log.writers=wandb,tensorboard"])
    with pytest.raises(ValueError, match=r"writers=\('mlflow', 'mlflow'\); expected writers a subset"):
        config.LogConfig(writers="mlflow,mlflow")
    with pytest.raises(ValueError, match=r"wandb_mode='cloud'; expected wandb_mode one of"):
        config.LogConfig(wandb_mode="cloud")
    assert config.override(config.Config(), ["log.writers=wandb, mlflow"]).log.writers == ("wandb", "mlflow")
    code = ("import sys, jnn; "
            "assert not {'wandb', 'mlflow'} & set(sys.modules), sorted({'wandb', 'mlflow'} & set(sys.modules)); "
            "assert jnn.writers.MlflowWriter.__module__ == 'jnn.trackers' and 'mlflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
