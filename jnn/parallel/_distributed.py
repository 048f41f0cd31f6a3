"""Multi-process JAX: `initialize` and `stop_all_on_failure` (the local launcher is in `_launch`).

How a multi-process run fails, and what each piece here does about it:

- A peer that never starts: JAX waits `initialization_timeout` plus about 5 s, then aborts with
  SIGABRT. `initialize` watches the connection itself and, at `timeout_s`, prints one jnn line
  saying what is missing and how to fix it, and exits with `PEER_EXIT_CODE`.
- A peer that dies mid-run: the others' next collective fails at once (gloo: "Connection closed
  by peer"), as a Python exception. `stop_all_on_failure` turns that into one jnn line and an
  immediate exit with `PEER_EXIT_CODE` (the interpreter's normal exit would wait for JAX's
  shutdown barrier, which the dead peer never reaches). A process that is between collectives is
  aborted by JAX's heartbeat check after `heartbeat_timeout_s` (SIGABRT, JAX's message).
- `launch_local` (`_launch`) owns its children: when one fails it names it and kills the others.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator, Sequence

import jax

from jnn.parallel import _clusters as clusters
from jnn.train.preemption import Preempted

DEFAULT_TIMEOUT_S = 120
PEER_EXIT_CODE = 3  # a multi-process run stopped because a process failed or never connected

def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = DEFAULT_TIMEOUT_S,
               heartbeat_timeout_s: int | None = None, local_device_ids: Sequence[int] | None = None,
               auto_detect: bool = False) -> bool:
    """Joins this process to a multi-process JAX run (`jax.distributed.initialize`).

    Call it first thing, before any other JAX call. Arguments not given are read from the
    environment (`jnn.parallel._clusters`): `JNN_COORDINATOR` ("host:port" of process 0),
    `JNN_NUM_PROCESSES`, `JNN_PROCESS_ID` (or JAX's `JAX_*` names; a Kubernetes Indexed Job's
    `JOB_COMPLETION_INDEX` stands for the id); else a SLURM job step (`srun`) or an Open MPI launch
    (`mpirun`) is recognised from its own variables, and each process takes its node-local
    accelerator when several tasks share a node. `JNN_CLUSTER=off` ignores the schedulers'
    variables. A cluster job that is one process here (an sbatch script without `srun`, a single
    task) says so on stderr and runs alone. With nothing found, it does nothing unless
    `auto_detect`, which lets JAX detect other environments (TPU pods). On CPU the cross-process
    collectives use gloo.

    Example (not run by the docs' tests: it waits for the other host):
      >>> jnn.parallel.initialize("10.0.0.1:1234", num_processes=2, process_id=0,
      ...                         timeout_s=60)  # doctest: +SKIP

    Args:
      coordinator_address: "host:port" where process 0 listens.
      num_processes: total number of processes.
      process_id: this process's index in `[0, num_processes)`.
      timeout_s: how long to wait for all processes to connect before failing (JAX's default is
        300 s; a missing peer then aborts the others after about this long).
      heartbeat_timeout_s: after how long without a heartbeat a peer is declared dead (default
        `timeout_s`).
      local_device_ids: restrict this process to these local accelerators.
      auto_detect: with nothing found, let JAX detect the cluster environment.

    Returns:
      True if this process is now part of a multi-process run, False for a single process.

    When the peers have not all connected after `timeout_s`, this process prints
    "jnn: process I of N: ..." to stderr and exits with `PEER_EXIT_CODE` (JAX itself would abort
    with SIGABRT about 5 s later).

    Raises:
      ValueError: if only some of address / count / id are given, or they are inconsistent.
    """
    if jax.distributed.is_initialized():
        return True
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(
                f"initialize: got {given}; missing {missing}. Fix: pass all three, or set "
                f"JNN_COORDINATOR=host:port, JNN_NUM_PROCESSES and JNN_PROCESS_ID in each process.")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"initialize: process_id={process_id} must lie in [0, num_processes={num_processes}). "
                             f"Fix: number the processes 0..{num_processes - 1}.")
        address, count, index = coordinator_address, num_processes, process_id
    else:
        launch = clusters.detect()
        if isinstance(launch, clusters.NotJoined):
            print(f"jnn: found {launch.reason}.", file=sys.stderr, flush=True)
            return False
        if launch is None:
            if not auto_detect:
                return False
            address = count = index = None  # JAX's own detection fills them in
        else:
            address, count, index = launch.coordinator_address, launch.num_processes, launch.process_id
            if local_device_ids is None and launch.local_device_ids is not None:
                local_device_ids = list(launch.local_device_ids)
            if launch.launcher != "explicit":
                print(f"jnn: {launch.describe()}", file=sys.stderr, flush=True)
    if count == 1:
        return False
    # Gloo only matters for the CPU client; harmless (and needed for CPU collectives) elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    connected = threading.Event()

    def watchdog():  # connect() releases the GIL, so this thread runs while it waits
        if not connected.wait(timeout_s):
            _exit(f"jnn: process {index} of {count}: the {count} processes did not all connect to the "
                  f"coordinator {address} within {timeout_s} s; expected every process 0..{count - 1} "
                  f"to start with the same coordinator address and process count. Fix: start the "
                  f"missing process(es), check that {address} is process 0's reachable address and "
                  f"port, or allow more time (timeout_s / --timeout).")

    threading.Thread(target=watchdog, name="jnn-initialize-watchdog", daemon=True).start()
    known = address is not None
    try:
        jax.distributed.initialize(
            address, count, index, local_device_ids=local_device_ids,
            # what jnn found is complete: JAX must not detect again (it would pin one GPU per process
            # even with one process per node)
            cluster_detection_method="deactivate" if known else None,
            initialization_timeout=int(timeout_s) + 1,  # the watchdog speaks first
            heartbeat_timeout_seconds=int(heartbeat_timeout_s or timeout_s),
            shutdown_timeout_seconds=int(timeout_s))
    finally:
        connected.set()
    return True


def _exit(message: str, code: int = PEER_EXIT_CODE) -> None:
    """Prints `message` and ends the process now, skipping JAX's shutdown barrier (which waits for
    peers that may be gone)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


@contextlib.contextmanager
def stop_all_on_failure(what: str = "jnn", *, hint: str = "") -> Iterator[None]:
    """In a multi-process run, any exception ends this process at once with one line.

    A failed process must not wait in JAX's shutdown barrier for peers that are gone, nor leave
    the others blocked in a collective: it prints `"<what>: error: process I of N: <error>"` to
    stderr and exits with `PEER_EXIT_CODE`; the other processes then fail at their next
    collective and do the same. Outside a multi-process run it changes nothing.

    Example (not run by the docs' tests: `train(args)` stands for your training function):
      >>> with jnn.parallel.stop_all_on_failure("train.py", hint="Resume with --resume."):
      ...     train(args)  # doctest: +SKIP

    Args:
      what: the program name that starts the line.
      hint: what to do next, appended to the line.
    """
    try:
        yield
    except BaseException as err:  # noqa: BLE001 - every exit path of a multi-process run
        if not jax.distributed.is_initialized() or isinstance(err, SystemExit) and not err.code \
                or isinstance(err, Preempted):  # every process stopped at the same step, with a checkpoint
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:500]
        _exit(f"{what}: error: process {jax.process_index()} of {jax.process_count()}: "
              f"{type(err).__name__}: {first}. In a multi-process run one process's failure stops "
              f"them all (this one now; the others at their next collective). {hint}".rstrip())
