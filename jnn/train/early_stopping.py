"""EarlyStopping: stop when an evaluation metric stops improving; it saves and restores its
own counters, so a resumed run keeps its best value and patience."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


@dataclasses.dataclass
class EarlyStopping:
    """Stops when `metric` has not improved by `min_delta` for `patience` evaluations.

    It saves and restores its own counters (`state_dict` / `load_state_dict`, as flax's
    `training.early_stopping` does), so a resumed run keeps its best value and patience.

    Attributes:
      metric: an evaluation metric name, e.g. "accuracy" or "loss".
      mode: "max" if larger is better, "min" otherwise.
      patience: evaluations without improvement before stopping.
      min_delta: the smallest change that counts as an improvement.
      best, best_step, best_record: the best value, its step and its whole evaluation record.
      wait: evaluations since the best one.
    """

    metric: str = "accuracy"
    mode: str = "max"
    patience: int = 5
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    wait: int = 0
    best_record: dict | None = None

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"EarlyStopping.mode must be 'max' or 'min'; got {self.mode!r}.")

    @property
    def should_stop(self) -> bool:
        return self.wait >= self.patience

    def improved(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        delta = value - self.best if self.mode == "max" else self.best - value
        return delta > self.min_delta

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Records an evaluation; returns True when training should stop."""
        if self.metric not in metrics:
            raise ValueError(
                f"EarlyStopping: metric {self.metric!r} is not among the evaluation metrics "
                f"{sorted(metrics)}. Fix: choose one of those.")
        value = float(metrics[self.metric])
        if self.improved(value):
            self.best, self.best_step, self.wait = value, step, 0
            self.best_record = {"step": step, **metrics}
            return False
        self.wait += 1
        return self.should_stop

    def state_dict(self) -> dict:
        """The counters, JSON-serialisable (saved with each checkpoint's data state)."""
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step,
                "wait": self.wait, "best_record": self.best_record}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restores counters saved by `state_dict`.

        Raises:
          ValueError: they were saved for another metric or mode.
        """
        if (saved.get("metric"), saved.get("mode")) != (self.metric, self.mode):
            raise ValueError(
                f"fit: the checkpoint's early-stopping counters are for metric {saved.get('metric')!r} "
                f"({saved.get('mode')}), but early_stopping watches {self.metric!r} ({self.mode}). Fix: resume "
                f"with the same EarlyStopping, or drop 'early_stopping' from data_state to start its "
                f"patience anew.")
        self.best, self.best_step, self.wait = saved["best"], saved["best_step"], saved["wait"]
        self.best_record = saved.get("best_record")
