"""Experiment trackers as metric writers: Weights & Biases (`WandbWriter`) and MLflow (`MlflowWriter`).

Each is a writer like the run directory's (`write(step, metrics, split)`, `close()`), so `fit`
and `jnn train` log to it unchanged: the config as the run's parameters, every logged record as
`<split>/<metric>` at its step, the test report at the end (scalars, the per-class table, the
run directory's pictures), and optionally the tested checkpoint as an artifact. `jnn train
--set log.writers=wandb,mlflow` adds them to a run (`jnn.config.LogConfig`).

Both packages are optional (`pip install "jnn[trackers]"`) and imported only when a writer is
made: `import jnn` never imports them. `check_installed` says which is missing, with the
`pip install` to run, before a run starts.

W&B runs offline by default (`mode="offline"`): the run is written under `dir/wandb/offline-run-*`
and uploaded later with `wandb sync <that directory>`. MLflow logs to any tracking URI: a
database (`sqlite:///path/mlflow.db`), a directory (`file:///path/mlruns`; MLflow 3 asks for
`MLFLOW_ALLOW_FILE_STORE=true` to use one) or a server (`http://host:5000`).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Any, Mapping, Sequence

from jnn.writers import scalars

INSTALL = 'pip install "jnn[trackers]"'
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}
_PICTURES = ("curves.png", "confusion.png")


class TrackerNotInstalledError(ValueError):
    """A tracker was asked for whose package is not installed (a ValueError: the `jnn` command
    reports it in one line)."""


def check_installed(names: Sequence[str]) -> None:
    """Raises `TrackerNotInstalledError` naming the `pip install` to run if a tracker's package is
    missing (found without importing it).

    Raises:
      TrackerNotInstalledError: a missing package.
      ValueError: an unknown tracker name.
    """
    unknown = sorted(set(names) - set(_PACKAGES))
    if unknown:
        raise ValueError(f"unknown tracker(s) {unknown}; expected any of {sorted(_PACKAGES)}. "
                         f"Fix: --set log.writers=wandb,mlflow (or one of them).")
    missing = [name for name in names if importlib.util.find_spec(_PACKAGES[name]) is None]
    if missing:
        packages = " ".join(_PACKAGES[name] for name in missing)
        raise TrackerNotInstalledError(
            f"log.writers asks for {', '.join(missing)}, but {packages} is not installed; expected the "
            f"tracker's package in this environment. Fix: {INSTALL} (or: pip install {packages}), or drop "
            f"{', '.join(missing)} from log.writers.")


def check_mlflow_uri(uri: str | None) -> None:
    """Raises a ValueError before a run when MLflow 3 would refuse a file store (`file:` URI or a
    bare path) because `MLFLOW_ALLOW_FILE_STORE` is not set."""
    if uri is None or "://" in uri and not uri.startswith("file:"):
        return
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes"):
        return
    raise ValueError(
        f"log.mlflow_tracking_uri={uri!r} is an MLflow file store, which MLflow 3 uses only when "
        f"MLFLOW_ALLOW_FILE_STORE=true; expected a database or server URI. Fix: "
        f"--set log.mlflow_tracking_uri=sqlite:///{os.path.abspath('mlflow.db')} (a local file), or "
        f"export MLFLOW_ALLOW_FILE_STORE=true to keep the file store.")


def check_log(log: Any) -> None:
    """What `jnn train` checks of a `LogConfig` before anything runs: the trackers are installed,
    and MLflow will take the tracking URI (`check_installed`, `check_mlflow_uri`)."""
    check_installed(log.writers)
    if "mlflow" in log.writers:
        check_mlflow_uri(log.mlflow_tracking_uri)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"learning_rate": 0.1}}` -> `{"optim.learning_rate": 0.1}` (MLflow's flat params)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _status() -> str:
    """The run's end, read from the exception being raised, if any (`close` runs in `finally`)."""
    error = sys.exc_info()[0]
    if error is None:
        return "FINISHED"
    return "KILLED" if issubclass(error, KeyboardInterrupt) else "FAILED"


def _per_class(report: Mapping[str, Any], class_names: Sequence[str] | None) -> list[list]:
    """Rows `[class, precision, recall, f1, support]` of a `jnn.metrics.classification_report`."""
    import numpy as np  # noqa: PLC0415

    support = np.asarray(report["support"])
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(support))]
    return [[names[i], *(float(np.asarray(report[k])[i]) for k in ("precision", "recall", "f1")), int(support[i])]
            for i in range(len(support))]


_COLUMNS = ["class", "precision", "recall", "f1", "support"]


class WandbWriter:
    """Logs to a Weights & Biases run (offline by default: `wandb sync` uploads it later).

    Args:
      project: the W&B project.
      config: the run's configuration (nested dicts), shown as its config.
      name: the run's display name.
      dir: where W&B writes (`<dir>/wandb/...`).
      mode: "offline", "online" or "disabled".
      run_id: an earlier run's id, to continue it (a resumed `jnn train`).
      class_names: names of the per-class rows of the test report.
      files: files uploaded when the writer closes, if they exist (e.g. curves.png).
      checkpoints: a directory of step folders: the test report's step folder is uploaded as a
        "model" artifact (None: no checkpoint).
    """

    def __init__(self, project: str = "jnn", *, config: Mapping[str, Any] | None = None, name: str | None = None,
                 dir: str | os.PathLike = ".", mode: str = "offline", run_id: str | None = None,
                 class_names: Sequence[str] | None = None, files: Sequence[str] = (),
                 checkpoints: str | os.PathLike | None = None):
        import wandb  # noqa: PLC0415 - optional, and slow to import

        self._wandb = wandb
        self.dir = os.fspath(dir)
        os.makedirs(self.dir, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False,
                                  disable_git=True)
        self.run = wandb.init(project=project, config=dict(config or {}), name=name, dir=self.dir, mode=mode,
                              id=run_id, resume="allow" if run_id else None, settings=settings, reinit="create_new")
        self.class_names, self.files = class_names, list(files)
        self.checkpoints = None if checkpoints is None else os.fspath(checkpoints)

    @property
    def id(self) -> str:
        return self.run.id

    @property
    def run_dir(self) -> str:
        """The local directory of the run (`wandb sync` it after an offline run)."""
        return os.path.dirname(self.run.dir.rstrip(os.sep))

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        values = {f"{split}/{k}": v for k, v in scalars(metrics).items()}
        if split != "test":
            self.run.log(values, step=int(step))
            return
        # The test report is the run's result, not a point of its history: its step (the tested
        # checkpoint's) may be earlier than the last logged one, which W&B's history refuses.
        self.run.summary.update({**values, "test/step": int(step)})
        if "report" in metrics:
            self.run.summary["test/per_class"] = self._wandb.Table(
                columns=_COLUMNS, data=_per_class(metrics["report"], self.class_names))
        if self.checkpoints is not None:
            folder = os.path.join(self.checkpoints, str(int(step)))
            if os.path.isdir(folder):
                artifact = self._wandb.Artifact(f"checkpoint-{self.run.id}", type="model",
                                                metadata={"step": int(step), **values})
                for root, _, names in os.walk(folder):  # add_file: add_dir prints a progress line
                    for file in names:
                        path = os.path.join(root, file)
                        artifact.add_file(path, name=os.path.relpath(path, folder))
                self.run.log_artifact(artifact, aliases=["best", f"step-{int(step)}"])

    def close(self) -> None:
        import shutil  # noqa: PLC0415

        for path in self.files:  # copied into the run's files: W&B warns about files it symlinks
            if os.path.exists(path):
                copy = os.path.join(self.run.dir, os.path.basename(path))
                shutil.copyfile(path, copy)
                self.run.save(copy, base_path=self.run.dir, policy="now")
        offline = self.run.settings.mode == "offline"
        self.run.finish(exit_code=0 if _status() == "FINISHED" else 1)
        if offline:
            print(f"W&B offline run {self.run_dir}; upload it with `wandb sync {self.run_dir}`", flush=True)


class MlflowWriter:
    """Logs to an MLflow run through `mlflow.MlflowClient` (no global state: several may coexist).

    Args:
      experiment: the MLflow experiment (created if missing).
      tracking_uri: where to log (None: MLflow's default; see the module docstring).
      run_name: the run's name.
      params: the run's configuration: nested dicts are flattened to `section.key` parameters.
      run_id: an earlier run's id, to continue it (a resumed `jnn train`).
      class_names: names of the per-class rows of the test report.
      files: files uploaded as artifacts when the writer closes, if they exist.
      checkpoints: a directory of step folders: the test report's step folder is uploaded as the
        artifact `checkpoint/` (None: no checkpoint).

    Raises:
      ValueError: MLflow refused the tracking URI (the message says why).
    """

    def __init__(self, experiment: str = "jnn", *, tracking_uri: str | None = None, run_name: str | None = None,
                 params: Mapping[str, Any] | None = None, run_id: str | None = None,
                 class_names: Sequence[str] | None = None, files: Sequence[str] = (),
                 checkpoints: str | os.PathLike | None = None):
        from mlflow import MlflowClient  # noqa: PLC0415 - optional, and slow to import
        from mlflow.exceptions import MlflowException  # noqa: PLC0415

        try:
            self.client = MlflowClient(tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            if run_id is None:
                run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
        except MlflowException as err:
            raise ValueError(f"MLflow could not start a run at tracking URI {tracking_uri or 'default'}: {err}") \
                from None
        self.run_id, self.tracking_uri = run_id, self.client.tracking_uri
        self.class_names, self.files = class_names, list(files)
        self.checkpoints = None if checkpoints is None else os.fspath(checkpoints)
        if params:
            self._log_params(flatten(params))

    @property
    def id(self) -> str:
        return self.run_id

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # noqa: PLC0415

        existing = self.client.get_run(self.run_id).data.params  # a resumed run has them already
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items()) if k not in existing]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        values = scalars(metrics)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{split}/{k}", v, now, int(step))
                                                    for k, v in values.items()])
        if split != "test":
            return
        if "report" in metrics:
            rows = _per_class(metrics["report"], self.class_names)
            self.client.log_dict(self.run_id, {"columns": _COLUMNS, "data": rows}, "test_per_class.json")
        self.client.log_dict(self.run_id, {"step": int(step), **values}, "test_metrics.json")
        if self.checkpoints is not None:
            folder = os.path.join(self.checkpoints, str(int(step)))
            if os.path.isdir(folder):
                self.client.log_artifacts(self.run_id, folder, "checkpoint")
                self.client.set_tag(self.run_id, "checkpoint_step", str(int(step)))

    def close(self) -> None:
        for path in self.files:
            if os.path.exists(path):
                self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id, _status())
        print(f"MLflow run {self.run_id} in {self.tracking_uri}", flush=True)


def make_trackers(log: Any, run_dir: str, config: Mapping[str, Any], *,
                  class_names: Sequence[str] | None = None) -> list:
    """The tracker writers a `LogConfig` asks for, logging the run in `run_dir`.

    A resumed run continues the same tracker runs: their ids are kept in `run_dir/trackers.json`.
    The run directory's pictures are uploaded at the end, and with `log.log_checkpoint` the
    tested checkpoint.
    """
    import json  # noqa: PLC0415

    check_installed(log.writers)
    ids_path = os.path.join(run_dir, "trackers.json")
    ids = json.load(open(ids_path, encoding="utf-8")) if os.path.exists(ids_path) else {}
    name = log.run_name or os.path.basename(os.path.normpath(run_dir))
    common = dict(class_names=class_names, files=[os.path.join(run_dir, f) for f in _PICTURES],
                  checkpoints=os.path.join(run_dir, "checkpoints") if log.log_checkpoint else None)
    writers: list = []
    for tracker in log.writers:
        if tracker == "wandb":
            writers.append(WandbWriter(log.project, config=config, name=name, dir=run_dir, mode=log.wandb_mode,
                                       run_id=ids.get("wandb"), **common))
        else:
            writers.append(MlflowWriter(log.project, tracking_uri=log.mlflow_tracking_uri, run_name=name,
                                        params=config, run_id=ids.get("mlflow"), **common))
        ids[tracker] = writers[-1].id
    with open(ids_path, "w", encoding="utf-8") as f:
        json.dump(ids, f)
    return writers


__all__ = ["INSTALL", "MlflowWriter", "TrackerNotInstalledError", "WandbWriter", "check_installed", "check_log",
           "check_mlflow_uri", "flatten", "make_trackers"]
