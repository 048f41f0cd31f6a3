"""A `jax.profiler` trace of chosen training steps: `fit(..., profile=Profile(10, 12, "run/profile"))`
and `jnn train --profile 10:12`.

The trace starts before step START and stops after step STOP - 1, once the device has finished
it, so it holds the host and device work of exactly those steps, each wrapped in a
`StepTraceAnnotation("train", step_num=step)` (TensorBoard's profile plugin splits the trace into
steps with it). `jax.profiler` writes `<logdir>/plugins/profile/<time>/<host>.xplane.pb` (open
`tensorboard --logdir <logdir>`) and `<host>.trace.json.gz` (drop it on https://ui.perfetto.dev).

Start after the first step (`START >= 1`) to leave compilation out of the trace.

Example:
  >>> profile = jnn.profiling.Profile.parse("2:4", logdir=f"{tmp}/profile")
  >>> result = jnn.fit(state, data, num_steps=4, loss_fn="cross_entropy", profile=profile)
  profile of steps 2-3 written to .../profile/plugins/profile/...
  >>> len(jnn.profiling.trace_files(profile.logdir)) >= 1
  True
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import sys
from typing import Any, TextIO

import jax


@dataclasses.dataclass(frozen=True)
class Profile:
    """Which steps to trace, and where.

    Attributes:
      start: the first traced step: the step call that takes the state from step `start` to
        `start + 1` (0 includes the compilation of the step).
      stop: the trace ends once the state reaches step `stop` (exclusive, as a slice).
      logdir: the directory `jax.profiler.start_trace` writes into.
    """

    start: int
    stop: int
    logdir: str = "profile"

    def __post_init__(self):
        if not (isinstance(self.start, int) and isinstance(self.stop, int) and 0 <= self.start < self.stop):
            raise ValueError(f"profile: steps {self.start}:{self.stop}; expected START:STOP with 0 <= START < "
                             f"STOP, e.g. 10:12 for steps 10 and 11. Fix: pass --profile START:STOP.")

    @classmethod
    def parse(cls, text: str, logdir: str | os.PathLike = "profile") -> "Profile":
        """`"START:STOP"` (as `jnn train --profile` takes it) into a `Profile` writing to `logdir`.

        Raises:
          ValueError: not two integers separated by a colon, or START >= STOP.
        """
        start, sep, stop = str(text).partition(":")
        try:
            steps = (int(start), int(stop)) if sep else None
        except ValueError:
            steps = None
        if steps is None:
            raise ValueError(f"--profile {text!r}: expected START:STOP, two step numbers such as 10:12 "
                             f"(traces steps 10 and 11). Fix: pass --profile 10:12.")
        return cls(*steps, os.fspath(logdir))

    def check(self, first_step: int, num_steps: int) -> None:
        """Raises a ValueError when the steps are not all in the run `[first_step, num_steps)`."""
        if self.start < first_step or self.stop > num_steps:
            raise ValueError(f"profile: steps {self.start}:{self.stop} are not all in this run, which trains "
                             f"steps {first_step}:{num_steps}; expected {first_step} <= START < STOP <= "
                             f"{num_steps}. Fix: pass steps inside the run, e.g. --profile "
                             f"{min(first_step + 1, num_steps - 1)}:{min(first_step + 3, num_steps)}.")


class StepProfiler:
    """Drives `jax.profiler` around the steps of a `Profile` (what `fit` uses).

    `fit` wraps each step call in `with profiler.step(step):` (starting the trace at `start` and
    annotating the step), then calls `profiler.after(step, state)` with the new step count (the
    trace stops at `stop`, after the device finished), and `profiler.close()` at the end (stops a
    trace still running, e.g. after an error or early stopping).
    """

    def __init__(self, profile: Profile | None, out: TextIO | None = None):
        self.profile = profile
        self.active = False
        self.out = out
        self.path: str | None = None
        self._before: set[str] = set()

    def step(self, step: int):
        """A context manager around the step call that takes the state from `step` to `step + 1`."""
        if self.profile is None:
            return contextlib.nullcontext()
        if step == self.profile.start and not self.active:
            os.makedirs(self.profile.logdir, exist_ok=True)
            self._before = set(trace_files(self.profile.logdir))
            jax.profiler.start_trace(self.profile.logdir)
            self.active = True
        if self.active:
            return jax.profiler.StepTraceAnnotation("train", step_num=step)
        return contextlib.nullcontext()

    def after(self, step: int, state: Any) -> None:
        """Called with the state's new step count: ends the trace at `profile.stop`."""
        if self.active and step >= self.profile.stop:
            jax.block_until_ready(state)  # the device work of the last traced step is in the trace
            self._stop()

    def close(self) -> None:
        if self.active:
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.active = False
        new = sorted(set(trace_files(self.profile.logdir)) - self._before)
        self.path = os.path.dirname(new[0]) if new else self.profile.logdir
        print(f"profile of steps {self.profile.start}-{self.profile.stop - 1} written to {self.path} "
              f"(view: `tensorboard --logdir {self.profile.logdir}`, or open the .trace.json.gz in "
              f"https://ui.perfetto.dev)", file=self.out or sys.stdout, flush=True)


def for_run(profile: "Profile | str | None", run_dir: str | os.PathLike) -> "Profile | None":
    """A `Profile` from `jnn train --profile START:STOP` text, tracing into `run_dir/profile`
    (a `Profile` or None is returned as it is)."""
    if profile is None or isinstance(profile, Profile):
        return profile
    return Profile.parse(profile, os.path.join(os.fspath(run_dir), "profile"))


def trace_files(logdir: str | os.PathLike) -> list[str]:
    """The trace files `jax.profiler` wrote under `logdir` (`*.xplane.pb`, `*.trace.json.gz`), sorted."""
    root = os.path.join(os.fspath(logdir), "plugins", "profile")
    return sorted(glob.glob(os.path.join(root, "*", "*.xplane.pb")) +
                  glob.glob(os.path.join(root, "*", "*.trace.json.gz")))


def read_trace_events(path: str | os.PathLike) -> list[dict]:
    """The events of a `.trace.json.gz` file (Chrome trace format) as dicts with at least `name`."""
    import gzip  # noqa: PLC0415
    import json  # noqa: PLC0415

    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return list(data["traceEvents"] if isinstance(data, dict) else data)


__all__ = ["Profile", "StepProfiler", "for_run", "read_trace_events", "trace_files"]
