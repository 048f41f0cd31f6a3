"""The run directory's rules: what may be started, resumed or evaluated there, and its files.

Layout (written by `jnn.experiment.train`):
  config.json       the full config (written first; a resume reads it back)
  metrics.jsonl     one JSON record per log / evaluation (appended, never truncated)
  tb/               TensorBoard event files
  curves.png        loss / accuracy / learning-rate curves
  checkpoints/      orbax steps (latest k + best), with the data iterator's position
  test_metrics.json the final test evaluation, with the per-class report
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from jnn.config import Config, from_dict, to_dict

CONFIG_FILE, TEST_FILE, CHECKPOINTS = "config.json", "test_metrics.json", "checkpoints"


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists already, or has nothing to resume)."""


def has_checkpoints(run_dir: str) -> bool:
    ckpt = os.path.join(run_dir, CHECKPOINTS)
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def check_resumable(run_dir: str) -> None:
    """Raises RunDirError unless `run_dir` holds checkpoints to resume from."""
    run_dir = os.path.abspath(run_dir)
    if not has_checkpoints(run_dir):
        raise RunDirError(
            f"--resume {run_dir}: no checkpoint there; expected {os.path.join(run_dir, CHECKPOINTS)}/<step>. "
            f"Fix: start a new run with `jnn train`, or point --resume to a run that saved checkpoints.")


def read_config(run_dir: str) -> Config:
    """The config a run directory was trained with."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(
            f"{run_dir} has no {CONFIG_FILE}; expected a run directory written by `jnn train`. "
            f"Fix: pass the directory `jnn train` printed at its start.")
    with open(path, encoding="utf-8") as f:
        return from_dict(json.load(f))


def with_data_dir(config: Config, data_dir: str | None) -> Config:
    """`config` reading its data from `data_dir` (the data moved), or unchanged for None."""
    if data_dir is None:
        return config
    return dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=data_dir))


def check_run_dir(config: Config, run_dir: str, resume: bool) -> None:
    """Refuses to overwrite a run, or to resume one with another config (only the data may move)."""
    if resume:
        check_resumable(run_dir)
        if to_dict(with_data_dir(read_config(run_dir), config.data.data_dir)) != to_dict(config):
            raise RunDirError(
                f"--resume {run_dir}: the given config differs from the run's {CONFIG_FILE}; a resumed run "
                f"must use the config it started with. Fix: resume without --preset/--set, or start a new run.")
    elif has_checkpoints(run_dir) or (os.path.exists(os.path.join(run_dir, CONFIG_FILE))
                                      and to_dict(read_config(run_dir)) != to_dict(config)):
        # A directory with only the same config.json is a first attempt that failed before its
        # first checkpoint: starting it again loses nothing.
        raise RunDirError(
            f"run directory {run_dir} already holds a run; refusing to overwrite it. "
            f"Fix: `jnn train --resume {run_dir}` to continue it, or choose another --run-dir.")


def write_json(run_dir: str, name: str, value: Any) -> None:
    with open(os.path.join(run_dir, name), "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def jsonable(tree: Any) -> Any:
    """A metrics tree (dicts of arrays and numbers) as JSON values, arrays as lists."""
    if isinstance(tree, dict):
        return {k: jsonable(v) for k, v in tree.items()}
    value = np.asarray(tree)
    return value.item() if value.ndim == 0 else value.tolist()
