"""Preemption: a scheduler's signal ends training at the next step boundary, with a checkpoint.

Schedulers warn before they stop a job: SLURM sends SIGTERM (then SIGKILL after its grace
period, `KillWait`), or a chosen signal before the time limit (`sbatch --signal=USR1@60`);
Kubernetes sends SIGTERM (then SIGKILL after `terminationGracePeriodSeconds`); a terminal sends
SIGINT. A signal that kills the process mid-step loses everything since the last checkpoint, and
one that raises inside a step that donated its state loses the state itself. So `watch_signals`
only records the signal; `fit` checks it between steps, saves a checkpoint of the last completed
step and raises `Preempted` (a `SystemExit` with `PREEMPTED_EXIT_CODE`, 75, "try again"), or
KeyboardInterrupt for SIGINT. A second SIGTERM/SIGUSR1 during the save is ignored (the save is
atomic anyway); a second SIGINT stops at once, as a terminal user expects.

In a multi-process run every process must stop at the same step, or their collectives would
wait for each other forever: they agree every `sync_every` steps with one all-gather of the
signal flags, so one signalled process is enough for all to stop together.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

import numpy as np

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped with a checkpoint; run the same command with --resume
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class Preempted(SystemExit):
    """Training stopped on a signal at a step boundary, with a checkpoint of that step.

    Uncaught, it ends the program with exit code `PREEMPTED_EXIT_CODE` and no traceback.

    Attributes:
      signal_name: "SIGTERM" or "SIGUSR1".
      step: the last completed (and saved) step.
      saved: whether a checkpoint was written (False without a checkpointer).
      result: the `FitResult` at that step (its state is usable).
    """

    def __init__(self, signal_name: str, step: int, saved: bool, result=None):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signal_name, self.step, self.saved, self.result = signal_name, step, saved, result

    def __str__(self) -> str:
        return (f"{self.signal_name}: stopped at step {self.step}"
                + (" with a checkpoint" if self.saved else " (no checkpointer: nothing saved)"))


class _Watch:
    def __init__(self):
        self.signum: int | None = None
        self.depth = 0
        self.previous: dict[int, object] = {}

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            os.write(2, f"jnn: {name} received: finishing the current step, then saving a checkpoint\n".encode())
        elif signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        else:
            os.write(2, f"jnn: {name} received again: already stopping; the checkpoint is being saved\n".encode())


_WATCH = _Watch()


@contextlib.contextmanager
def watch_signals() -> Iterator[None]:
    """Records SIGTERM, SIGUSR1 and SIGINT instead of dying of them (nested uses share one record).

    Only the main thread can install signal handlers; elsewhere this does nothing and signals
    act as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _WATCH.depth == 0:
        _WATCH.signum = None
        for name in SIGNALS:
            signum = getattr(signal, name)
            _WATCH.previous[signum] = signal.signal(signum, _WATCH.handle)
    _WATCH.depth += 1
    try:
        yield
    finally:
        _WATCH.depth -= 1
        if _WATCH.depth == 0:
            for signum, handler in _WATCH.previous.items():
                signal.signal(signum, handler)
            _WATCH.previous.clear()


def watch_signals_until_exit() -> None:
    """`watch_signals` for the rest of the process (the `jnn` command): a signal that arrives after
    training, while the program writes its last files or shuts down, is recorded, not fatal."""
    watch_signals().__enter__()


def requested() -> str | None:
    """The name of the signal received in this process since `watch_signals` started, or None."""
    return None if _WATCH.signum is None else signal.Signals(_WATCH.signum).name


def agreed(step: int, sync_every: int) -> str | None:
    """The signal every process stops for at this step, or None to go on.

    One process: the signal it received. Several: every `sync_every` steps, the processes share
    their flags (one all-gather) and all stop if any was signalled.
    """
    import jax  # noqa: PLC0415

    if jax.process_count() == 1:
        return requested()
    if step % sync_every:
        return None
    from jax.experimental import multihost_utils  # noqa: PLC0415

    flags = np.asarray(multihost_utils.process_allgather(np.int32(_WATCH.signum or 0)))
    return signal.Signals(int(flags.max())).name if flags.max() else None


__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "agreed", "requested", "watch_signals", "watch_signals_until_exit"]
