"""Python's garbage collector while the `jnn` command starts up.

Starting `jnn train` allocates millions of objects (JAX's, flax's and matplotlib's imports, tracing
and lowering the steps) and almost no garbage cycles: 4,541 unreachable objects in the default
digits run. Python's collector walks the whole heap again and again as it grows: 0.42 s of that
run's 4.3 s with a warm compilation cache (`benchmarks/studies/README.md`). The `jnn` command
(`jnn.cli.console`, a process that ends with its command) turns the collector off while it starts,
then, when training begins, freezes what the start-up built out of the collector's reach and turns
it back on: the steps, evaluations and checkpoints of a long run are collected as usual, and
cheaper, since each full collection no longer walks the start-up's objects. The few start-up
cycles are kept (under 1 MB; collecting them first costs 0.19 s).

A program that calls `jnn.cli.main` or `jnn.experiment.train` itself keeps its collector as it is:
freezing a long-lived process's heap would keep its garbage forever.
"""
from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    """Turns the collector off for the start-up of the `jnn` command (`jnn.cli.console` alone)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """The start-up is over: freezes its objects and turns the collector back on, if `pause` turned it off."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
